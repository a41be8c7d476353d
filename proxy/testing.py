"""Simulated devices for a POS maker's own tests: start one, point the driver at it, assert on what it saw.

    async with simulated_device("custom") as device:        # a new pseudo-terminal
        await my_driver.beep(device.path)
        assert device.exchanges[0].request == BEEP

    with simulated_device_sync("shtrih", tcp=True) as device:  # for tests that are not async
        my_driver.connect(*device.address)
        ...

A device runs one of devproxy's protocol simulators (`devproxy simulate`'s) on a new pty, whose slave side
is reached through a symlink in a temporary directory (`device.path`), or on a TCP port of 127.0.0.1
(`device.address`; every connection gets a device of its own, as with `devproxy simulate --listen`).
`device.exchanges` lists what the host sent and what the device answered so far; `set_faults`,
`go_offline` and `go_online` change its behaviour while it runs. The pytest plugin (proxy.pytest_plugin)
gives the synchronous device as a fixture and shows its exchanges when a test fails.

This module's names and their documented behaviour are a stable interface; names starting with an
underscore are not.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from proxy.config import SIMULATED_PROTOCOLS
from proxy.simulators import close_pty, model_factory, open_pty, serve_stream, wait_until_read
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import Fault, FaultScript, ScriptRun, as_run, as_script

__all__ = [
    "NO_FAULTS",
    "BackgroundDevice",
    "Exchange",
    "Fault",
    "FaultScript",
    "Faults",
    "RunningDevice",
    "simulated_device",
    "simulated_device_sync",
]

# How long BackgroundDevice.wait_for_exchanges waits by default before it gives up.
WAIT_LIMIT = 10.0


@attrs.frozen
class Exchange:
    """One request from the host and the device's answer to it.

    request: the bytes the host sent, from the end of the previous exchange up to the read that
    completed a message (a message split across reads is one request; messages that arrive in one read
    are one request). writes: each write the device made in answer, in order (an ACK, then the answer
    frame, say); answer: the same bytes joined. A dropped answer (Faults.drop_every) is not among them.
    received_at: time.monotonic() when the request was complete; answered_at: time.monotonic() when the
    last write went out, None while one is still to go out (a delayed answer) or when there is none.
    connection: on TCP, which connection (1 for the first); 0 on a pty. offline: the request came while
    the device was offline (go_offline) and went unanswered.
    """

    request: bytes
    writes: tuple[bytes, ...]
    received_at: float
    answered_at: float | None = None
    connection: int = 0
    offline: bool = False

    @property
    def answer(self) -> bytes:
        return b"".join(self.writes)

    def describe(self, since: float) -> str:
        """One line: the time since `since`, the connection, the request and the answer in hex."""
        where = f" #{self.connection}" if self.connection else ""
        answer = " | ".join(write.hex(" ") for write in self.writes) or ("(offline)" if self.offline else "-")
        took = "" if self.answered_at is None else f" ({(self.answered_at - self.received_at) * 1000:.1f} ms)"
        return f"+{self.received_at - since:.3f}s{where} host: {self.request.hex(' ') or '-'} -> device: {answer}{took}"


class RunningDevice:
    """A simulated device started by simulated_device(); use it from the trio run that started it.

    Reading `exchanges` (and log()) is safe from any thread.
    """

    def __init__(self, protocol: str, faults: Faults, script: FaultScript | list[Fault] | None = None) -> None:
        self.protocol = protocol
        # One run of the fault script for the device: its match counts go on across connections.
        self._script: ScriptRun | None = as_run(script)
        self.path: Path | None = None
        self.tty: str | None = None
        self.address: tuple[str, int] | None = None
        self.started_at = time.monotonic()
        self._faults = faults
        self._offline = False
        self._lock = threading.Lock()
        self._grew = threading.Condition(self._lock)
        self._exchanges: list[Exchange] = []
        self._changed = trio.Event()
        # Each stream being served: its model and the cancel scope that restarts its serving.
        self._serving: dict[_RecordingModel, trio.CancelScope] = {}
        self._connections = 0
        # Links a scripted "drop" has ended so far; on a pty, the new one behind `path` is numbered so.
        self.drops = 0

    @property
    def exchanges(self) -> list[Exchange]:
        """The exchanges so far, oldest first (a copy: later ones do not appear in it)."""
        with self._lock:
            return list(self._exchanges)

    @property
    def faults(self) -> Faults:
        return self._faults

    @property
    def offline(self) -> bool:
        return self._offline

    def log(self) -> str:
        """The exchanges so far as text, one a line, for a report or a failing assertion's message."""
        where = self.path or (f"{self.address[0]}:{self.address[1]}" if self.address else "")
        lines = [f"simulated {self.protocol} device on {where} ({self._faults})"]
        lines += [exchange.describe(self.started_at) for exchange in self.exchanges] or ["no exchanges"]
        return "\n".join(lines)

    def clear_exchanges(self) -> None:
        """Forgets the exchanges so far (an answer still going out is not recorded as sent)."""
        with self._lock:
            self._exchanges.clear()
            for model in self._serving:
                model.outstanding.clear()

    def set_faults(self, faults: Faults) -> None:
        """The fault knobs from the next request on, for every connection and those to come.

        A changed delay (or reaction time) restarts the serving of each stream: an answer still waiting
        out the old delay is then never sent, so change it between exchanges.
        """
        self._faults = faults
        for model, scope in list(self._serving.items()):
            delay = model.answer_delay
            model.faults = faults
            if model.answer_delay != delay:
                scope.cancel()

    def go_offline(self) -> None:
        """The device stops answering: what the host sends from now on is recorded and ignored."""
        self._offline = True

    def go_online(self) -> None:
        """The device answers again, from the next request on."""
        self._offline = False

    async def wait_for_exchanges(self, count: int) -> list[Exchange]:
        """Waits until at least `count` exchanges are recorded, then returns them all."""
        while True:
            exchanges = self.exchanges
            if len(exchanges) >= count:
                return exchanges
            await self._changed.wait()

    # -- for the serving tasks --

    async def wait_for_drops(self, count: int) -> None:
        """Waits until scripted drops have ended `count` links and, on a pty, a new one is up."""
        while self.drops < count or (self.path is not None and self._replugging):
            await self._changed.wait()

    @property
    def _replugging(self) -> bool:
        return self.tty is None or not self.path.exists() or os.readlink(self.path) != self.tty

    def _record(self, exchange: Exchange) -> int:
        with self._lock:
            self._exchanges.append(exchange)
            index = len(self._exchanges) - 1
            self._grew.notify_all()
        self._changed_now()
        return index

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _answered(self, index: int, when: float) -> None:
        with self._lock:
            if index < len(self._exchanges):
                self._exchanges[index] = attrs.evolve(self._exchanges[index], answered_at=when)

    async def _serve(self, stream: trio.abc.Stream, connection: int) -> bool:
        """Serves `stream` until the host closes it (False) or a scripted fault drops the link (True);
        a changed delay restarts the serving."""
        model = _recording_model(self.protocol, self._faults, self._script, self, connection)
        try:
            while True:
                with trio.CancelScope() as scope:
                    self._serving[model] = scope
                    return await serve_stream(stream, model)
                model.outstanding.clear()  # those answers were never sent
        finally:
            del self._serving[model]


class _RecordingModel(SimulatedDevice):
    """Marks the recording subclass made for each protocol's model (see _recording_model)."""

    outstanding: dict[int, tuple[Write, int]]


def _recording_model(
    protocol: str, faults: Faults, script: ScriptRun | None, device: RunningDevice, connection: int
) -> _RecordingModel:
    """The protocol's model, made to record each exchange in `device` and to keep quiet while offline."""
    base: Any = model_factory(protocol)

    class Recording(base, _RecordingModel):
        def __init__(self) -> None:
            super().__init__(faults, script=script)
            self.request = bytearray()
            self.outstanding = {}  # id(write) -> (write, index of its exchange): writes not yet sent

        def feed(self, data: bytes) -> list[Write]:
            self.request += data
            if device.offline:
                self._finish([], offline=True)
                return []
            writes = super().feed(data)
            if writes or not self.mid_frame:
                self._finish(writes)
            return writes

        def line_idle(self) -> list[Write]:
            writes = super().line_idle()
            if device.offline:
                writes = []
            if writes or self.request:
                self._finish(writes)
            return writes

        def sent(self, write: Write) -> None:
            super().sent(write)
            _, index = self.outstanding.pop(id(write), (write, -1))
            if index >= 0 and not any(i == index for _, i in self.outstanding.values()):
                device._answered(index, time.monotonic())

        def _finish(self, writes: list[Write], offline: bool = False) -> None:
            exchange = Exchange(
                request=bytes(self.request),
                writes=tuple(write.data for write in writes if write.data),  # not a hang-up's marker
                received_at=time.monotonic(),
                connection=connection,
                offline=offline,
            )
            self.request.clear()
            index = device._record(exchange)
            for write in writes:
                self.outstanding[id(write)] = (write, index)

    Recording.__name__ = Recording.__qualname__ = f"Recording{base.__name__}"
    return Recording()


def _check(protocol: str, pty: bool, tcp: bool, script: FaultScript | list[Fault] | None = None) -> None:
    if protocol not in SIMULATED_PROTOCOLS:
        raise ValueError(
            f"no simulated device for protocol {protocol!r}; choose one of {', '.join(SIMULATED_PROTOCOLS)}"
        )
    if pty and tcp:
        raise ValueError("a simulated device is on a pty or on TCP, not both")
    checked = as_script(script)
    if checked is not None:
        checked.check(protocol)  # ScriptError (a ValueError) for a fault the protocol cannot take


@contextlib.asynccontextmanager
async def simulated_device(
    protocol: str,
    *,
    pty: bool = False,
    tcp: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Faults = NO_FAULTS,
    script: FaultScript | list[Fault] | None = None,
) -> AsyncIterator[RunningDevice]:
    """A simulated `protocol` device, running until the block ends.

    On a new pseudo-terminal by default (pty=True says so explicitly): `device.path` is a symlink to
    its slave side in a new temporary directory, `device.tty` the slave itself. With tcp=True it listens
    on `host`:`port` (port 0: a free one) and `device.address` is the (host, port) it is bound to.
    `faults` are the device's fault knobs from the start, `script` its scripted faults
    (proxy.simulators.script: which request fails and how); a scripted "drop" closes a TCP connection,
    or hangs the pty up and makes a new one behind the same `device.path`.

    Raises ValueError for a protocol with no simulator, or for both pty and tcp. Resource handling: the
    pty pair, the symlink and its directory, or the listening socket and every connection, are closed
    and removed when the block ends, however it ends.
    """
    _check(protocol, pty, tcp, script)
    device = RunningDevice(protocol, faults, script)
    if tcp:
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            bound = listeners[0].socket.getsockname()
            device.address = (bound[0], bound[1])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve_tcp, device, listeners)
                yield device
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        return
    directory = Path(tempfile.mkdtemp(prefix="devproxy-"))
    try:
        device.path = directory / f"tty{protocol.upper().replace('-', '_')}"
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_pty, device)
            yield device
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _serve_pty(device: RunningDevice, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serves a pty behind device.path; after a scripted drop, a new one behind the same path."""
    assert device.path is not None
    while True:
        stream: trio.lowlevel.FdStream | None = None
        try:
            # The slave closes before the master (as serve_pty does), so that what was written before a
            # scripted drop still reaches the host.
            with _pty(device.path) as (master, slave_path, slave):
                device.tty = slave_path
                stream = trio.lowlevel.FdStream(master)
                if device.drops == 0:
                    task_status.started()
                else:
                    device._changed_now()
                dropped = await device._serve(stream, device.drops)
                if dropped:
                    await wait_until_read(slave)
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)
        if not dropped:
            return
        device.drops += 1


@contextlib.contextmanager
def _pty(link: Path) -> Iterator[tuple[int, str, int]]:
    """A raw pty pair with `link` pointing at its slave: (master, slave path, slave). The caller owns the master
    once this yields; the slave stays open here, so that a host closing it causes no EIO on the master
    side, and is closed, and the link removed, after."""
    master, slave, slave_path = open_pty(link)
    try:
        yield master, slave_path, slave
    finally:
        close_pty(link, slave)


async def _serve_tcp(device: RunningDevice, listeners: list[trio.SocketListener]) -> None:
    async def serve_one(stream: trio.SocketStream) -> None:
        device._connections += 1
        # A host that goes away (or resets) ends its own connection only; serve_stream's nursery wraps
        # the error in an ExceptionGroup, hence except*.
        try:
            async with stream:
                await device._serve(stream, device._connections)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_listeners(serve_one, listeners)


class BackgroundDevice:
    """A simulated device running in a thread of its own, for tests that are not async
    (simulated_device_sync). Every method is safe to call from any thread but the device's own."""

    def __init__(self, device: RunningDevice, token: trio.lowlevel.TrioToken) -> None:
        self._device = device
        self._token = token

    @property
    def protocol(self) -> str:
        return self._device.protocol

    @property
    def path(self) -> Path | None:
        """The symlink to the pty's slave side; None on TCP."""
        return self._device.path

    @property
    def tty(self) -> str | None:
        """The pty's slave side itself (/dev/pts/N); None on TCP."""
        return self._device.tty

    @property
    def address(self) -> tuple[str, int] | None:
        """The (host, port) the device listens on; None on a pty."""
        return self._device.address

    @property
    def exchanges(self) -> list[Exchange]:
        """The exchanges so far, oldest first (a copy)."""
        return self._device.exchanges

    @property
    def faults(self) -> Faults:
        return self._device.faults

    def log(self) -> str:
        """The exchanges so far as text, one a line."""
        return self._device.log()

    def clear_exchanges(self) -> None:
        self._call(self._device.clear_exchanges)

    def set_faults(self, faults: Faults) -> None:
        """As RunningDevice.set_faults; in effect when this returns."""
        self._call(self._device.set_faults, faults)

    def go_offline(self) -> None:
        self._call(self._device.go_offline)

    def go_online(self) -> None:
        self._call(self._device.go_online)

    def wait_for_exchanges(self, count: int, timeout: float = WAIT_LIMIT) -> list[Exchange]:
        """Blocks until at least `count` exchanges are recorded and returns them all; TimeoutError
        after `timeout` seconds, with the log so far."""
        device = self._device
        with device._grew:
            if not device._grew.wait_for(lambda: len(device._exchanges) >= count, timeout):
                raise TimeoutError(f"{count} exchanges awaited, {len(device._exchanges)} came")
            return list(device._exchanges)

    @property
    def drops(self) -> int:
        """Links a scripted "drop" has ended so far (as RunningDevice.drops)."""
        return self._device.drops

    def wait_for_drops(self, count: int, timeout: float = WAIT_LIMIT) -> None:
        """Blocks until scripted drops have ended `count` links and, on a pty, a new one is up;
        TimeoutError after `timeout` seconds."""
        device = self._device

        async def wait() -> None:
            with trio.move_on_after(timeout) as scope:
                await device.wait_for_drops(count)
            if scope.cancelled_caught:
                raise TimeoutError(f"{count} drops awaited, {device.drops} came")

        trio.from_thread.run(wait, trio_token=self._token)

    def _call(self, function: Any, *args: Any) -> None:
        trio.from_thread.run_sync(function, *args, trio_token=self._token)


class _Thread:
    """Runs simulated_device() in a trio run on a thread of its own until stop()."""

    def __init__(self, protocol: str, options: dict[str, Any]) -> None:
        self._protocol = protocol
        self._options = options
        self._started: queue.SimpleQueue[BackgroundDevice | BaseException] = queue.SimpleQueue()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"devproxy simulated {protocol}", daemon=True)

    def start(self) -> BackgroundDevice:
        self._thread.start()
        started = self._started.get()
        if isinstance(started, BaseException):
            self._thread.join()
            raise started
        return started

    def stop(self) -> None:
        """Ends the device and its thread; raises what ended the device early, if anything did."""
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stop_soon, trio_token=self._token)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _stop_soon(self) -> None:
        assert self._stop is not None
        self._stop.set()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:
            if self._token is None:
                self._started.put(error)  # start() raises it
            else:
                self._error = error  # stop() raises it

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with simulated_device(self._protocol, **self._options) as device:
            self._token = trio.lowlevel.current_trio_token()
            self._started.put(BackgroundDevice(device, self._token))
            await self._stop.wait()


@contextlib.contextmanager
def simulated_device_sync(
    protocol: str,
    *,
    pty: bool = False,
    tcp: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Faults = NO_FAULTS,
    script: FaultScript | list[Fault] | None = None,
) -> Iterator[BackgroundDevice]:
    """simulated_device() for tests that are not async: the device runs in a trio run on a thread of its
    own until the block ends, then the thread is joined. The arguments and the errors are
    simulated_device()'s; an error that ended the device early is raised when the block ends."""
    _check(protocol, pty, tcp, script)
    runner = _Thread(protocol, {"pty": pty, "tcp": tcp, "host": host, "port": port, "faults": faults, "script": script})
    device = runner.start()
    try:
        yield device
    finally:
        runner.stop()
