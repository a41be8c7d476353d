"""devproxy connect: a local virtual serial port (a pseudo-terminal) for a program that only knows a COM
port, joined to a device port of the proxy (or any RFC 2217 server) over TCP.

With RFC 2217, the rate, stop bits and flow control the program sets on the pty are sent to the remote
port as it changes them; Linux keeps no data size or parity on a pty (it forces 8 bits, no parity) and a
pty has no modem lines, so those cannot be seen and the remote port keeps its own. Modem-state
notifications from the remote port are logged.
"""

from __future__ import annotations

import contextlib
import signal
import termios
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import attrs
import trio
from loguru import logger

from proxy.config import Address
from proxy.rfc2217 import STOPSIZE_CODES, Command, ComPortMessage, Control, TelnetCodec, escape
from proxy.simulators import close_pty, open_pty

RECONNECT_INTERVAL = 2.0
CONNECT_TIMEOUT = 10.0
# How often the pty's termios is read for the program's changes (a pty reports none by itself).
TERMIOS_POLL_INTERVAL = 0.1
READ_SIZE = 65536


@attrs.frozen
class PtyLine:
    """What a program can set on a pty that the other end can see: the rate, stop bits and flow control."""

    baudrate: int
    stopbits: float
    rtscts: bool
    xonxoff: bool

    @classmethod
    def read(cls, fd: int) -> PtyLine:
        """The pty's settings now (read on the master, which shows the slave's termios)."""
        from proxy.links.serial import SPEEDS

        iflag, _, cflag, _, _, ospeed, _ = termios.tcgetattr(fd)
        return cls(
            baudrate=SPEEDS.get(ospeed, 0),
            stopbits=2.0 if cflag & termios.CSTOPB else 1.0,
            rtscts=bool(cflag & termios.CRTSCTS),
            xonxoff=bool(iflag & termios.IXON),
        )

    def requests(self, codec: TelnetCodec, before: PtyLine | None) -> bytes:
        """The COM-PORT requests for what differs from `before` (all of it when None)."""
        out = b""
        if before is None or self.baudrate != before.baudrate:
            out += codec.message(Command.SET_BAUDRATE, self.baudrate)
        if before is None or self.stopbits != before.stopbits:
            out += codec.message(Command.SET_STOPSIZE, STOPSIZE_CODES[self.stopbits])
        if before is None or (self.rtscts, self.xonxoff) != (before.rtscts, before.xonxoff):
            flow = Control.FLOW_HARDWARE if self.rtscts else Control.FLOW_XONXOFF if self.xonxoff else Control.FLOW_NONE
            out += codec.message(Command.SET_CONTROL, flow)
        return out


async def connect(
    address: Address, link: Path, *, rfc2217: bool = False, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Makes a pty with `link` pointing at its slave side and joins it to `address` until cancelled,
    connecting again RECONNECT_INTERVAL after the connection fails or drops.

    task_status gets a line for the user naming the pty. Resource handling: the pty pair and the link are
    removed when this returns or is cancelled. While the remote cannot be reached, what the program
    writes is dropped, as on a serial cable that is not plugged in (see _reach).
    """
    master, slave, slave_path = open_pty(link)
    pty = trio.lowlevel.FdStream(master)
    # The rate, stop bits and flow control as the pty was made: the program's own start where they differ.
    made = PtyLine.read(master)
    changed = False
    try:
        task_status.started(f"{slave_path} (link {link}) for {address}{' with RFC 2217' if rfc2217 else ''}")
        delay = 0.0
        while True:
            tcp = await _reach(address, pty, delay)
            delay = RECONNECT_INTERVAL
            logger.info("connect: {} joined to {}", link, address)
            async with tcp:
                if rfc2217:
                    session = _ComPortSession(tcp, pty, master, made, changed)
                    why = await session.run()
                    changed = session.changed
                else:
                    why = await _join(tcp, pty)
            logger.warning(
                "connect: connection to {} lost ({}); reconnecting in {:g} s", address, why, RECONNECT_INTERVAL
            )
    finally:
        close_pty(link, slave)
        with trio.CancelScope(shield=True):
            await pty.aclose()


BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _reach(address: Address, pty: trio.lowlevel.FdStream, delay: float) -> trio.SocketStream:
    """A connection to `address`, after `delay` and then every RECONNECT_INTERVAL until one is made.

    Bytes the program writes before the first attempt ends wait and go out on that connection. Once an
    attempt has failed, or after a connection was lost (`delay` > 0), what the program writes is read
    and dropped: held back, it would reach the device late, as a stale request beside the program's
    own retry (and a full pty would block the program). How much was dropped is logged when the
    connection is back.
    """
    dropped = 0

    async def drop_input() -> None:
        nonlocal dropped
        with contextlib.suppress(*BROKEN):
            while data := await pty.receive_some(READ_SIZE):
                dropped += len(data)

    async with trio.open_nursery() as nursery:
        if delay:
            nursery.start_soon(drop_input)
            await trio.sleep(delay)
        while True:
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    tcp = await trio.open_tcp_stream(address.host, address.port)
                break
            except (OSError, trio.TooSlowError) as exc:
                why = "timed out" if isinstance(exc, trio.TooSlowError) else exc.strerror or str(exc)
                logger.warning("connect: cannot reach {}: {}; retrying in {:g} s", address, why, RECONNECT_INTERVAL)
                if not delay:
                    nursery.start_soon(drop_input)
                    delay = RECONNECT_INTERVAL
                await trio.sleep(RECONNECT_INTERVAL)
        nursery.cancel_scope.cancel()
    if dropped:
        logger.warning("connect: dropped {} bytes the program wrote while {} was not connected", dropped, address)
    return tcp


async def _join(tcp: trio.SocketStream, pty: trio.lowlevel.FdStream) -> str:
    """Plain bytes both ways until the connection ends; returns why."""

    async def tcp_to_pty() -> None:
        while data := await tcp.receive_some(READ_SIZE):
            await pty.send_all(data)

    async def pty_to_tcp() -> None:
        while True:
            await tcp.send_all(await pty.receive_some(READ_SIZE))

    return await _both_ways(tcp_to_pty, pty_to_tcp)


async def _both_ways(*directions: Callable[[], Awaitable[None]]) -> str:
    """Runs the directions until the first one ends (the connection closed) or fails; returns why."""
    why = "closed by the other end"
    async with trio.open_nursery() as nursery:

        async def direction(run: Callable[[], Awaitable[None]]) -> None:
            nonlocal why
            try:
                await run()
            except BROKEN as exc:
                why = str(exc) or type(exc).__name__
            nursery.cancel_scope.cancel()

        for run in directions:
            nursery.start_soon(direction, run)
    return why


class _ComPortSession:
    """One connection's RFC 2217 client side: data both ways with 0xFF doubled, the pty's changes sent as
    requests, the server's answers and notifications logged."""

    def __init__(
        self, tcp: trio.SocketStream, pty: trio.lowlevel.FdStream, master: int, made: PtyLine, changed: bool
    ) -> None:
        self.tcp, self.pty, self.master = tcp, pty, master
        self.codec = TelnetCodec(server=False)
        self.made = made
        # Whether the program has set the pty (then its settings go out at each connection).
        self.changed = changed
        self.sent: PtyLine | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._modem: int | None = None

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.tcp.send_all(data)

    async def run(self) -> str:
        """Serves the connection until it ends; returns why."""
        await self._send(self.codec.data_to_send() + self.codec.message(Command.SET_MODEMSTATE_MASK, 0xFF))
        return await _both_ways(self._tcp_to_pty, self._pty_to_tcp, self._follow_termios)

    async def _tcp_to_pty(self) -> None:
        while raw := await self.tcp.receive_some(READ_SIZE):
            data, events = self.codec.feed(raw)
            if owed := self.codec.data_to_send():
                await self._send(owed)
            for event in events:
                self._heard(event)
            if data:
                await self.pty.send_all(data)

    async def _pty_to_tcp(self) -> None:
        while True:
            await self._send(escape(await self.pty.receive_some(READ_SIZE)))

    async def _follow_termios(self) -> None:
        """Sends the program's rate, stop bits and flow control when they change (and at once when it has
        set them before this connection)."""
        while True:
            now = PtyLine.read(self.master)
            self.changed = self.changed or now != self.made
            if self.changed and now != self.sent:
                await self._send(now.requests(self.codec, self.sent))
                logger.info(
                    "connect: the program set {} baud, {:g} stop bits{}", now.baudrate, now.stopbits, _flow(now)
                )
                self.sent = now
            await trio.sleep(TERMIOS_POLL_INTERVAL)

    def _heard(self, event: object) -> None:
        if not isinstance(event, ComPortMessage):
            logger.debug("connect: {}", event)
            return
        command, value, sent = event.command, event.value, self.sent
        if command is Command.NOTIFY_MODEMSTATE and value != self._modem:
            self._modem = value
            lines = [name for name, bit in (("CTS", 0x10), ("DSR", 0x20), ("RI", 0x40), ("CD", 0x80)) if value & bit]
            logger.info("connect: remote modem lines on: {}", ", ".join(lines) or "none")
        elif command is Command.SET_BAUDRATE and sent is not None and value != sent.baudrate:
            logger.warning("connect: the remote port stays at {} baud (asked {})", value, sent.baudrate)
        else:
            logger.debug("connect: remote answered {} {}", command.name, value)


def _flow(line: PtyLine) -> str:
    return ", RTS/CTS" if line.rtscts else ", XON/XOFF" if line.xonxoff else ""


def run(address: Address, link: Path, *, rfc2217: bool) -> None:
    """`devproxy connect`: until SIGTERM (returns) or Ctrl-C (KeyboardInterrupt, as for every command).

    Error handling: OSError when the pty or its link cannot be made.
    """

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:  # a clean stop: the link is removed
            async with trio.open_nursery() as nursery:
                print(await nursery.start(partial(connect, address, link, rfc2217=rfc2217)), flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # nursery.start raises the pty's error before it was ready as a group of one; unwrap it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
