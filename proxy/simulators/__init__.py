"""Simulated devices: a protocol model served over any trio Stream, a pseudo-terminal or a TCP port."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import importlib
import math
import os
import struct
import termios
import tty
from collections.abc import Callable
from pathlib import Path

import trio
from loguru import logger

from proxy.config import SIMULATED_PROTOCOLS, Address
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import Fault, FaultScript, ScriptLike, ScriptRun, as_run, load_script

# Before a scripted drop hangs a pty up: how long the host may take to read what came before it, how
# often that is looked at, and how long an empty slave side must stay empty when no byte was seen there.
DROP_DRAIN_LIMIT = 1.0
DROP_DRAIN_POLL = 0.005
DROP_DRAIN_QUIET = 0.05

__all__ = [
    "BYTE_TIMEOUT",
    "Fault",
    "FaultScript",
    "Faults",
    "ScriptRun",
    "load_script",
    "model_factory",
    "serve_pty",
    "serve_stream",
    "serve_tcp",
    "wait_until_read",
]

# A pause this long inside a frame makes the simulated device abandon it, as a real one's byte timeout.
BYTE_TIMEOUT = 0.05


def model_factory(protocol: str) -> Callable[..., SimulatedDevice]:
    """The simulated device class for `protocol`; KeyError when there is none. Only its module is
    imported."""
    if protocol not in SIMULATED_PROTOCOLS:
        raise KeyError(protocol)
    return importlib.import_module(f"proxy.simulators.{protocol.replace('-', '_')}").DEVICE


async def serve_stream(stream: trio.abc.Stream, model: SimulatedDevice) -> bool:
    """Answers the host on `stream` until it closes the stream; the caller closes it.

    The device reads on while an answer waits out its delay, as a real one does: an ENQ sent while a
    command runs is answered at once (Shtrih), and an ACK goes out before a slow response.

    Returns True when a scripted fault dropped the link (the caller closes it), False when the host
    closed the stream.
    """
    delay = model.answer_delay
    model.clock = trio.current_time
    send_write, receive_write = trio.open_memory_channel[tuple[float, Write]](math.inf)
    hung_up: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_in_time, stream, model, receive_write, hung_up, nursery.cancel_scope)
        while True:
            with trio.move_on_after(BYTE_TIMEOUT if model.mid_frame else math.inf) as quiet:
                data = await stream.receive_some()
            if quiet.cancelled_caught:
                writes = model.line_idle()
            elif not data:
                nursery.cancel_scope.cancel()
                return False
            else:
                writes = model.feed(data)
            # Within one batch a write never overtakes the one before it (the device handles messages in
            # order); a later batch's immediate write (an ACK to ENQ) may overtake a waiting answer.
            due = trio.current_time()
            for write in writes:
                due = max(due, trio.current_time() + delay if write.answer else due) + write.delay
                send_write.send_nowait((due, write))
    return bool(hung_up)


async def _write_in_time(
    stream: trio.abc.Stream,
    model: SimulatedDevice,
    writes: trio.MemoryReceiveChannel,
    hung_up: list[bool],
    scope: trio.CancelScope,
) -> None:
    """Sends each write when it is due, in the order it was made among writes due at the same time; a
    write with `hangup` ends the device's service (hung_up gets True and `scope` is cancelled)."""
    due: list[tuple[float, int, Write]] = []
    order = 0
    while True:
        if due:
            with trio.move_on_at(due[0][0]):
                when, write = await writes.receive()
                heapq.heappush(due, (when, order := order + 1, write))
                continue
            _, _, write = heapq.heappop(due)
            if write.data:
                await stream.send_all(write.data)
            model.sent(write)
            if write.hangup:
                hung_up.append(True)
                scope.cancel()
                return
        else:
            when, write = await writes.receive()
            heapq.heappush(due, (when, order := order + 1, write))


def _knobs_and_script(
    faults: Faults | ScriptLike, script: ScriptLike | ScriptRun | None
) -> tuple[Faults, ScriptRun | None]:
    """`faults` may be the global knobs, or (for convenience) a FaultScript or a list of Fault."""
    if not isinstance(faults, Faults):
        if script is not None:
            raise TypeError("give a fault script as faults= or as script=, not both")
        faults, script = NO_FAULTS, faults
    return faults, as_run(script)


async def serve_pty(
    protocol: str,
    link: Path,
    faults: Faults | FaultScript | list[Fault] = NO_FAULTS,
    *,
    script: FaultScript | list[Fault] | ScriptRun | None = None,
    model: Callable[[], SimulatedDevice] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the device on a new pseudo-terminal; `link` becomes a symlink to its slave side.

    task_status gets a line for the user naming the slave path. `faults` are the global knobs (or a
    fault script), `script` the scripted faults (proxy.simulators.script). `model`, when given, makes
    the device instead of `protocol`'s simulator (a replayed recording: proxy.simulators.replay), and
    `protocol` only names it.

    Resource handling: the pty pair and the symlink are removed when this returns or is cancelled.
    A host that closes the slave side does not end the device: the next open finds it again. A
    scripted "drop" hangs the pty up (the host's reads end, its writes fail) and makes a new one at
    the same link, as a device that is unplugged and plugged in again.
    """
    faults, run = _knobs_and_script(faults, script)
    started = False
    while True:
        master, slave, slave_path = open_pty(link)
        stream = trio.lowlevel.FdStream(master)
        try:
            if not started:
                task_status.started(f"simulated {protocol} device on {slave_path} (link {link})")
                started = True
            device = model() if model is not None else model_factory(protocol)(faults, script=run)
            # Keeping the slave open here means a host that closes it causes no EIO on the master side.
            dropped = await serve_stream(stream, device)
            if dropped:
                await wait_until_read(slave)
        finally:
            close_pty(link, slave)
            await stream.aclose()
        if not dropped:
            return
        logger.info("simulated {} device dropped its link (scripted); a new pty at {}", protocol, link)


async def wait_until_read(slave: int) -> None:
    """Waits until the host has read what the device wrote before a scripted drop, for at most
    DROP_DRAIN_LIMIT: a pty's hang-up throws away what its slave side has not read yet, which a drop
    `after` K bytes must not. Bytes cross from the master side a moment after they were written (the
    kernel's worker moves them), so an empty slave side counts only once bytes were seen there, or
    after DROP_DRAIN_QUIET of seeing none.
    """
    seen = False
    with trio.move_on_after(DROP_DRAIN_LIMIT):
        started = trio.current_time()
        while True:
            await trio.sleep(DROP_DRAIN_POLL)
            if _unread(slave):
                seen = True
            elif seen or trio.current_time() - started >= DROP_DRAIN_QUIET:
                return


def _unread(slave: int) -> int:
    """Bytes waiting on the slave side of a pty for the host to read them."""
    try:
        return struct.unpack("i", fcntl.ioctl(slave, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def open_pty(link: Path) -> tuple[int, int, str]:
    """A raw pty pair with `link` pointing at its slave: (master, slave, slave path). The slave is kept
    open by the device's side, so that a host closing it causes no EIO on the master side. A symlink
    already at `link` (a previous run's) is replaced; anything else there is left alone. Error
    handling: OSError when the link cannot be made (FileExistsError for a file that is no symlink),
    with both descriptors closed."""
    if os.path.lexists(link) and not link.is_symlink():
        raise FileExistsError(errno.EEXIST, "a file that is not a symlink is in the way", str(link))
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        slave_path = os.ttyname(slave)
        link.unlink(missing_ok=True)
        link.symlink_to(slave_path)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave, slave_path


def close_pty(link: Path, slave: int) -> None:
    """Removes `link`, unless another program has put its own there since, and closes the slave kept
    open by open_pty()."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == os.ttyname(slave):
            link.unlink()
    os.close(slave)


async def serve_tcp(
    protocol: str,
    address: Address,
    faults: Faults | FaultScript | list[Fault] = NO_FAULTS,
    *,
    script: FaultScript | list[Fault] | ScriptRun | None = None,
    model: Callable[[], SimulatedDevice] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the device on a TCP port; every connection gets a device of its own (`model()` when given,
    as for serve_pty).

    task_status gets a line for the user naming the bound address (port 0 picks a free one). The
    connections share one run of the fault script: match counts go on from one to the next, and while
    the device is offline a new connection is accepted but never answered. A scripted "drop" closes
    the connection.
    """
    faults, run = _knobs_and_script(faults, script)
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    bound = listeners[0].socket.getsockname()
    address = Address(bound[0], bound[1])
    task_status.started(f"simulated {protocol} device listening on {address}")

    async def serve_one(stream: trio.SocketStream) -> None:
        # One host's trouble, or a simulator bug, ends that host's connection only.
        try:
            # serve_stream's nursery wraps a reset host's error in an ExceptionGroup, hence except*.
            try:
                await serve_stream(
                    stream, model() if model is not None else model_factory(protocol)(faults, script=run)
                )
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                logger.info("simulated {} device: host went away", protocol)
        except Exception:
            logger.exception("simulated {} device failed; this host's connection is closed", protocol)

    await trio.serve_listeners(serve_one, listeners)
