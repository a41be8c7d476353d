"""Real devices for the tests: pseudo-terminals and TCP servers on 127.0.0.1, and a running proxy."""

from __future__ import annotations

import contextlib
import os
import struct
import termios
import tty
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from loguru import logger

from proxy.app import Running, serve
from proxy.config import Address, Settings, parse
from proxy.device import UP_STATES, Device

WAIT_LIMIT = 20.0
# A Custom register's beep and its answer (protocols.md 1.1).
BEEP = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")
BEEP_ANSWER = bytes.fromhex("06 01 04 00 13 00 00 63 7A")
# A second device beside the one under test: it must keep answering whatever the first one does.
OTHER = {"name": "other", "type": "simulator", "protocol": "custom"}


def settings_for(*devices: dict, **proxy: object) -> Settings:
    """Settings through the real parser; each device listens on a free port unless it says otherwise."""
    tables = [{"listen": ["127.0.0.1:0"], **device} for device in devices]
    return parse({"proxy": {"status": "", **proxy}, "device": tables})


@asynccontextmanager
async def running_proxy(settings: Settings) -> AsyncIterator[Running]:
    """The proxy serving `settings` inside the test; cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve, settings)
        yield running
        nursery.cancel_scope.cancel()


async def connect(running: Running, name: str) -> trio.SocketStream:
    address = running.addresses[name][0]
    return await trio.open_tcp_stream(address.host, address.port)


async def other_device_answers(running: Running) -> None:
    """The simulated register beside the device under test answers a beep."""
    async with await connect(running, "other") as client:
        await client.send_all(BEEP)
        assert await receive_exactly(client, 9) == BEEP_ANSWER


def reset_on_close(stream: trio.SocketStream) -> None:
    """Makes the next close send a TCP reset, as a crashed POS program's connection does."""
    stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))


async def wait_for(device: Device, condition: Callable[[], bool]) -> None:
    """Waits until `condition()` holds, checking it at each change the device reports."""
    with trio.fail_after(WAIT_LIMIT):
        while not condition():
            await device.changed()


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = bytearray()
    with trio.fail_after(WAIT_LIMIT):
        while len(data) < count:
            chunk = await stream.receive_some(count - len(data))
            if not chunk:
                raise AssertionError(f"end of stream after {len(data)} of {count} bytes: {bytes(data)[:64]!r}")
            data += chunk
    return bytes(data)


async def receive_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the peer sends before it closes the connection."""
    data = bytearray()
    with trio.fail_after(WAIT_LIMIT):
        while chunk := await stream.receive_some():
            data += chunk
    return bytes(data)


def dialin_settings(tmp_path: Path, **keys: object) -> Settings:
    """A [dialin] table; direct ports chosen by the system, as every port a test binds."""
    table = {
        "listen": ["127.0.0.1:0"],
        "registry": str(tmp_path / "registry.sqlite3"),
        "direct_ports": "any",
        "identify_timeout": 5,
        "ping_after": 0,
        **keys,
    }
    return parse({"proxy": {"status": ""}, "dialin": table})


async def modem(running: Running, identity: bytes) -> trio.SocketStream:
    """A GPRS modem: connects to the dial-in port and sends its id packet."""
    address = running.dialin[0]
    stream = await trio.open_tcp_stream(address.host, address.port)
    await stream.send_all(identity)
    return stream


async def meter(stream: trio.SocketStream) -> None:
    """Answers each request with ANS: and the request, as a meter behind the modem would."""
    with trio.move_on_after(WAIT_LIMIT), contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        while data := await stream.receive_some():
            await stream.send_all(b"ANS:" + data)


async def device_named(running: Running, device_id: str) -> Device:
    """The dial-in device with this id, once it has started."""
    with trio.fail_after(WAIT_LIMIT):
        while True:
            for device in running.devices.values():
                if device.config.path == device_id and device.dialin is not None:
                    return device
            await running.device_started()


async def online(device: Device) -> None:
    """Waits until the device's link is up."""
    await wait_for(device, lambda: device.state in UP_STATES)


async def logged(text: str, log_lines: list[str], times: int = 1) -> None:
    """Waits until `times` log lines hold `text` (for what only the log tells, like the registry's failures)."""
    while sum(text in line for line in log_lines) < times:
        seen = trio.Event()
        sink = logger.add(lambda message, seen=seen: seen.set() if text in message else None, level="DEBUG")
        try:
            with trio.fail_after(WAIT_LIMIT):
                await seen.wait()
        finally:
            logger.remove(sink)


class PtyDevice:
    """The device end of a pseudo-terminal; the proxy opens `path`, a symlink to the slave side.

    plug() makes a new pty behind the same path, as a USB device that is unplugged and plugged back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stream: trio.lowlevel.FdStream | None = None
        self._slave: int | None = None

    def plug(self) -> trio.lowlevel.FdStream:
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        self.path.unlink(missing_ok=True)
        self.path.symlink_to(os.ttyname(slave))
        self.stream, self._slave = trio.lowlevel.FdStream(master), slave
        # The slave stays open here until the proxy has opened it, so the master sees no hang-up.
        return self.stream

    def line_speed(self) -> int:
        """The baud rate the proxy set on the line (termios, read through this side's slave descriptor)."""
        speed = termios.tcgetattr(self._slave)[4]
        return next(
            int(name[1:])
            for name in dir(termios)
            if name[1:].isdigit() and getattr(termios, name) == speed and name[0] == "B"
        )

    def release_slave(self) -> None:
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None

    async def unplug(self) -> None:
        """Closes the master side: the proxy sees the device vanish."""
        self.release_slave()
        self.path.unlink(missing_ok=True)
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


class TcpDevice:
    """A device on a TCP port of 127.0.0.1: each connection the proxy makes arrives on `connections`."""

    def __init__(self) -> None:
        self.send_connection, self.connections = trio.open_memory_channel[trio.SocketStream](10)
        self.address: Address | None = None
        self.accepted = 0

    async def serve(self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = Address(host, port)
        task_status.started(self.address)

        async def handler(stream: trio.SocketStream) -> None:
            self.accepted += 1
            await self.send_connection.send(stream)
            await trio.sleep_forever()

        await trio.serve_listeners(handler, listeners)

    async def next_connection(self) -> trio.SocketStream:
        with trio.fail_after(WAIT_LIMIT):
            return await self.connections.receive()
