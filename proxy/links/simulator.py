"""In-process simulated devices: the device runs as a task at the far end of a socket pair."""

from __future__ import annotations

import os

import trio
from loguru import logger

from proxy.config import DeviceConfig
from proxy.simulators import model_factory, serve_stream
from proxy.simulators.base import NO_FAULTS
from proxy.simulators.script import ScriptError, ScriptRun, as_run, load_script

# Each simulated device's run of its fault_script, by device name and script path: the match counts go on
# across the links the proxy opens (a scripted drop's "nth = 1" fires once, not at every reopen). The
# script file's mtime and size go with the run, so that an edited script is loaded anew (after SIGHUP).
_script_runs: dict[tuple[str, str], tuple[tuple[int, int] | None, ScriptRun | None]] = {}


async def open_simulator(config: DeviceConfig, nursery: trio.Nursery) -> trio.SocketStream:
    """Starts the simulated device in `nursery` and returns the proxy's end of the pair.

    Resource handling: closing the returned stream ends the simulated device, which closes its end.
    """
    ours, theirs = trio.socket.socketpair()
    device_end = trio.SocketStream(theirs)
    nursery.start_soon(_run, config, device_end)
    return trio.SocketStream(ours)


async def _run(config: DeviceConfig, stream: trio.SocketStream) -> None:
    """Error handling: a simulator bug is logged and ends this simulated device only; the proxy sees
    its link lost and opens a new one, as with a real device that was reset."""
    async with stream:
        try:
            # The serving's nursery wraps the proxy end's closing in an ExceptionGroup.
            try:
                await serve_stream(stream, model_factory(config.protocol)(NO_FAULTS, script=_script_run(config)))
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                logger.debug("{}: simulated device: proxy end closed", config.name)
        except Exception:
            logger.exception("{}: simulated device failed; it restarts with the next open", config.name)


def _script_run(config: DeviceConfig) -> ScriptRun | None:
    """The device's fault script run (None without one). A script that became unreadable since `check`
    is logged and the device runs without faults."""
    key = (config.name, config.fault_script)
    version = _version(config.fault_script) if config.fault_script else None
    cached = _script_runs.get(key)
    if cached is not None and cached[0] == version:
        return cached[1]
    run = None
    if config.fault_script:
        try:
            run = as_run(load_script(config.fault_script))
        except ScriptError as exc:
            logger.error("{}: simulated device runs without its fault script: {}", config.name, exc)
    _script_runs[key] = (version, run)
    return run


def _version(path: str) -> tuple[int, int] | None:
    """The file's (mtime in ns, size); None when it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
