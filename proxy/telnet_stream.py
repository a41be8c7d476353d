"""A client's connection on an RFC 2217 port (listen_rfc2217): a trio Stream of data bytes over Telnet, which
answers the client's COM-PORT-OPTION requests through the device's line control (proxy.line_control)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio
from loguru import logger

from proxy.rfc2217 import (
    MODEM_CD,
    MODEM_CTS,
    MODEM_DSR,
    MODEM_RI,
    PARITY_CODES,
    PARITY_NAMES,
    PURGE_BOTH,
    PURGE_RECEIVE,
    PURGE_TRANSMIT,
    STOPSIZE_CODES,
    STOPSIZE_VALUES,
    Command,
    ComPortMessage,
    Control,
    Malformed,
    TelnetCodec,
    escape,
    modem_changes,
)

if TYPE_CHECKING:
    from proxy.device import Device
    from proxy.line_control import LineSettings

READ_SIZE = 65536
# While the client has suspended the data sent to it (FLOWCONTROL-SUSPEND), this much waits here and
# send_all() returns at once, so that a device's answer is taken and the device goes on serving others;
# beyond it, send_all() waits for FLOWCONTROL-RESUME (client_write_timeout then applies).
SUSPENDED_BUFFER = 65536
# While a client has asked for modem-state notifications, the lines are read this often (TIOCMGET), and
# only while the client's task reads its connection (session sharing: while it holds the device).
MODEM_POLL_INTERVAL = 0.5
# TIOCM_ bits -> NOTIFY-MODEMSTATE bits.
_TIOCM_TO_MODEMSTATE = (
    (0x020, MODEM_CTS),  # TIOCM_CTS
    (0x100, MODEM_DSR),  # TIOCM_DSR
    (0x080, MODEM_RI),  # TIOCM_RI
    (0x040, MODEM_CD),  # TIOCM_CD
)
_FLOW = {(False, False): Control.FLOW_NONE, (False, True): Control.FLOW_XONXOFF, (True, False): Control.FLOW_HARDWARE}
_INBOUND_FLOW = {
    Control.FLOW_NONE: Control.INBOUND_FLOW_NONE,
    Control.FLOW_XONXOFF: Control.INBOUND_FLOW_XONXOFF,
    Control.FLOW_HARDWARE: Control.INBOUND_FLOW_HARDWARE,
}
# What each command may carry besides 0 (a query); anything else is answered with the value in force.
_OFFERED = {
    Command.SET_DATASIZE: frozenset({5, 6, 7, 8}),
    Command.SET_PARITY: frozenset(PARITY_NAMES),
    Command.SET_STOPSIZE: frozenset(STOPSIZE_VALUES),
    Command.SET_CONTROL: frozenset(range(Control.REQUEST_FLOW, Control.INBOUND_FLOW_HARDWARE + 1)),
    Command.PURGE_DATA: frozenset({PURGE_RECEIVE, PURGE_TRANSMIT, PURGE_BOTH}),
}
_FLOW_SETTINGS = {
    Control.FLOW_NONE: (False, False),
    Control.FLOW_XONXOFF: (False, True),
    Control.FLOW_HARDWARE: (True, False),
    Control.INBOUND_FLOW_NONE: (False, False),
    Control.INBOUND_FLOW_XONXOFF: (False, True),
    Control.INBOUND_FLOW_HARDWARE: (True, False),
}


def modem_state(tiocm: int) -> int:
    """NOTIFY-MODEMSTATE's line bits for the TIOCM_ bits of a port."""
    return sum(bit for tiocm_bit, bit in _TIOCM_TO_MODEMSTATE if tiocm & tiocm_bit)


class ComPortStream(trio.abc.Stream):
    """The data bytes of a Telnet connection with the COM-PORT-OPTION (RFC 2217), as the sharing modes see
    a client: receive_some() gives only data (IAC IAC as 0xFF) and answers commands as it reads them;
    send_all() doubles 0xFF.

    Every SET is answered with the value in force afterwards: the holder's change on a local serial port
    under session sharing, else the configured value, with one log line for the client saying why
    nothing changed. Modem-state notifications go out while the client's task reads (in session
    sharing, while it holds the device) and the port has modem lines to read. After FLOWCONTROL-SUSPEND,
    data waits here (up to SUSPENDED_BUFFER) until FLOWCONTROL-RESUME.

    Resource handling: `transport_stream` is the client's connection (wire.socket_of finds its socket);
    closing this closes it. Error handling: the transport's errors propagate as they are; a malformed
    request is logged once and ignored. Cancelling receive_some() loses no data: what was decoded waits
    for the next call.
    """

    def __init__(self, transport: trio.abc.Stream, device: Device, client: str) -> None:
        self.transport_stream = transport
        self._device = device
        self._line = device.line
        self._client = client
        self._codec = TelnetCodec(server=True)
        # Data decoded and not yet taken, and Telnet bytes owed to the client (at first, the negotiation).
        self._data = bytearray()
        self._control = bytearray(self._codec.data_to_send())
        self._eof = False
        self._send_lock = trio.StrictFIFOLock()
        # Cleared by the client's FLOWCONTROL-SUSPEND: data waits in _suspended until FLOWCONTROL-RESUME.
        self._resumed = trio.Event()
        self._resumed.set()
        self._suspended = bytearray()
        self._modem_mask = 0
        # The lines last notified; None while they cannot be read (then no notifications are sent).
        self._modem_last: int | None = None
        self._refusal_logged = self._malformed_logged = self._unoffered_logged = False

    # -- trio.abc.Stream -----------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            if self._control:
                await self._send_control()
            if self._data:
                size = len(self._data) if max_bytes is None else max_bytes
                chunk = bytes(self._data[:size])
                del self._data[:size]
                return chunk
            if self._eof:
                return b""
            raw = None
            polling = self._modem_mask and self._modem_last is not None
            with trio.move_on_after(MODEM_POLL_INTERVAL if polling else math.inf):
                raw = await self.transport_stream.receive_some(READ_SIZE)
            if raw is None:
                self._notify_modem_state(poll=False)
            elif not raw:
                self._eof = True
            else:
                data, events = self._codec.feed(raw)
                self._data += data
                self._control += self._codec.data_to_send()
                for event in events:
                    self._handle(event)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._resumed.is_set():
            if len(self._suspended) < SUSPENDED_BUFFER:
                self._suspended += escape(bytes(data))
                return
            await self._resumed.wait()
        async with self._send_lock:
            out = bytes(self._control) + escape(bytes(data))
            self._control.clear()
            await self.transport_stream.send_all(out)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()

    async def _send_control(self) -> None:
        async with self._send_lock:
            out = bytes(self._control)
            self._control.clear()
            if out:
                await self.transport_stream.send_all(out)

    # -- COM-PORT-OPTION requests --------------------------------------------------------------------

    def _answer(self, command: Command, value: int | None = None, text: bytes = b"") -> None:
        self._control += self._codec.message(command, value, text)

    def _handle(self, event: ComPortMessage | Malformed) -> None:
        if isinstance(event, Malformed):
            self._log_once("_malformed_logged", "sent a malformed RFC 2217 request ({}); ignored", event.what)
            return
        command, value = event.command, event.value
        in_force = self._line.in_force
        if value and command in _OFFERED and value not in _OFFERED[command]:
            self._log_once(
                "_unoffered_logged",
                "asked for {} {}, which is not offered; answered with the value in force",
                command.name,
                value,
            )
        if command is Command.SIGNATURE:
            if not event.text:
                self._answer(command, text=f"devproxy {self._device.name}".encode())
        elif command is Command.SET_BAUDRATE:
            settings = self._change(baudrate=value) if value else in_force
            self._answer(command, settings.baudrate)
        elif command is Command.SET_DATASIZE:
            settings = self._change(bytesize=value) if value in (5, 6, 7, 8) else in_force
            self._answer(command, settings.bytesize)
        elif command is Command.SET_PARITY:
            settings = self._change(parity=PARITY_NAMES[value]) if value in PARITY_NAMES else in_force
            self._answer(command, PARITY_CODES[settings.parity])
        elif command is Command.SET_STOPSIZE:
            settings = self._change(stopbits=STOPSIZE_VALUES[value]) if value in STOPSIZE_VALUES else in_force
            self._answer(command, STOPSIZE_CODES.get(settings.stopbits, 1))
        elif command is Command.SET_CONTROL:
            self._answer(command, self._control_answer(value))
        elif command is Command.NOTIFY_LINESTATE:
            self._answer(command, 0)  # a tty reports no line errors to read
        elif command is Command.NOTIFY_MODEMSTATE:
            self._notify_modem_state(poll=True)
        elif command is Command.FLOWCONTROL_SUSPEND:
            if self._resumed.is_set():
                self._resumed = trio.Event()
        elif command is Command.FLOWCONTROL_RESUME:
            # What waited goes out now, ahead of any later data.
            self._control += self._suspended
            self._suspended.clear()
            self._resumed.set()
        elif command is Command.SET_LINESTATE_MASK:
            self._answer(command, value)
        elif command is Command.SET_MODEMSTATE_MASK:
            self._modem_mask = value
            self._answer(command, value)
            self._modem_last = None
            if value:
                self._notify_modem_state(poll=True)
        elif command is Command.PURGE_DATA:
            if value in (PURGE_RECEIVE, PURGE_TRANSMIT, PURGE_BOTH) and self._line.why_fixed(self._client) is None:
                self._line.purge(receive=value != PURGE_TRANSMIT, transmit=value != PURGE_RECEIVE)
            self._answer(command, value)

    def _control_answer(self, value: int) -> int:
        """SET-CONTROL: applies a setting, and returns the answer (the value in force for what it asked)."""
        settings = self._line.in_force
        if value in _FLOW_SETTINGS:
            rtscts, xonxoff = _FLOW_SETTINGS[value]
            settings = self._change(rtscts=rtscts, xonxoff=xonxoff)
        elif value in (Control.BREAK_ON, Control.BREAK_OFF):
            settings = self._change(break_on=value == Control.BREAK_ON)
        elif value in (Control.DTR_ON, Control.DTR_OFF):
            settings = self._change(dtr=value == Control.DTR_ON)
        elif value in (Control.RTS_ON, Control.RTS_OFF):
            settings = self._change(rts=value == Control.RTS_ON)
        # A port opened with "keep" has DTR and RTS on (Linux raises them at open).
        flow = _FLOW.get((settings.rtscts, settings.xonxoff), Control.FLOW_HARDWARE)
        if value in (Control.REQUEST_BREAK, Control.BREAK_ON, Control.BREAK_OFF):
            return Control.BREAK_ON if settings.break_on else Control.BREAK_OFF
        if value in (Control.REQUEST_DTR, Control.DTR_ON, Control.DTR_OFF):
            return Control.DTR_OFF if settings.dtr is False else Control.DTR_ON
        if value in (Control.REQUEST_RTS, Control.RTS_ON, Control.RTS_OFF):
            return Control.RTS_OFF if settings.rts is False else Control.RTS_ON
        if value in (Control.REQUEST_INBOUND_FLOW, *_INBOUND_FLOW.values()):
            return _INBOUND_FLOW[flow]
        return flow  # outbound flow control, asked or set; DCD, DTR and DSR flow control are not offered

    def _change(self, **changes: object) -> LineSettings:
        reason = self._line.why_fixed(self._client)
        if reason is None:
            return self._line.change(self._client, **changes)
        if any(getattr(self._line.in_force, key) != value for key, value in changes.items()):
            self._log_once(
                "_refusal_logged",
                "asked to change the line ({}); not applied: {}; answered with the values in force",
                ", ".join(f"{key} = {value}" for key, value in changes.items()),
                reason,
            )
        return self._line.in_force

    def _notify_modem_state(self, *, poll: bool) -> None:
        """Sends NOTIFY-MODEMSTATE when the lines changed under the client's mask (or when it asked: `poll`)."""
        tiocm = self._line.modem_state()
        if tiocm is None:
            self._modem_last = None
            return
        state = modem_state(tiocm)
        previous = self._modem_last if self._modem_last is not None else state
        self._modem_last = state
        notified = (state | modem_changes(previous, state)) & (self._modem_mask if not poll else 0xFF)
        if poll or (state ^ previous) & self._modem_mask:
            self._answer(Command.NOTIFY_MODEMSTATE, notified)

    def _log_once(self, flag: str, message: str, *args: object) -> None:
        if getattr(self, flag):
            return
        setattr(self, flag, True)
        name = self._device.name
        logger.info("{}: client {} " + message, name, self._client, *args, device=name, client=self._client)


class ComPortListener(trio.abc.Listener[trio.SocketStream]):
    """A TCP listener whose clients speak RFC 2217 (listen_rfc2217): its kind tells serve_clients to put
    ComPortStream around each client once it is admitted. Resource handling: aclose() closes the TCP
    listener."""

    def __init__(self, transport: trio.SocketListener) -> None:
        self.transport = transport

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.transport.socket

    async def accept(self) -> trio.SocketStream:
        return await self.transport.accept()

    async def aclose(self) -> None:
        await self.transport.aclose()
