"""RFC 2217, the Telnet COM-PORT-OPTION, sans-IO: option negotiation, IAC escaping and the COM-PORT
subnegotiations of both sides, with no I/O and no event loop (the server's stream is
proxy.telnet_stream, the client's proxy.connect).

A TelnetCodec takes the bytes its peer sent and gives back the data bytes among them and the COM-PORT
messages; its answers to option negotiation wait in data_to_send(). feed() is linear in its input: runs
of data are copied with bytes.find between IAC bytes, every other byte is looked at once, and a
subnegotiation is kept only up to MAX_SUBNEGOTIATION bytes, so a hostile peer costs O(n) and bounded
memory.
"""

from __future__ import annotations

import enum
import struct

import attrs

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
IAC_BYTE = bytes([IAC])
# Telnet options (RFC 856, 858, 2217). ECHO is refused: a serial line echoes nothing of its own.
BINARY, ECHO, SGA, COM_PORT_OPTION = 0, 1, 3, 44
# The server's COM-PORT messages carry the client's command code plus this.
SERVER_OFFSET = 100
# Longer subnegotiations (a peer's signature text) are cut here and reported as malformed.
MAX_SUBNEGOTIATION = 512


class Command(enum.IntEnum):
    """COM-PORT-OPTION commands, as the client sends them (the server answers with SERVER_OFFSET added)."""

    SIGNATURE = 0
    SET_BAUDRATE = 1
    SET_DATASIZE = 2
    SET_PARITY = 3
    SET_STOPSIZE = 4
    SET_CONTROL = 5
    NOTIFY_LINESTATE = 6
    NOTIFY_MODEMSTATE = 7
    FLOWCONTROL_SUSPEND = 8
    FLOWCONTROL_RESUME = 9
    SET_LINESTATE_MASK = 10
    SET_MODEMSTATE_MASK = 11
    PURGE_DATA = 12


class Control(enum.IntEnum):
    """SET-CONTROL values: requests (a value of 0 or a REQUEST_ code asks for the value in force) and settings."""

    REQUEST_FLOW = 0
    FLOW_NONE = 1
    FLOW_XONXOFF = 2
    FLOW_HARDWARE = 3
    REQUEST_BREAK = 4
    BREAK_ON = 5
    BREAK_OFF = 6
    REQUEST_DTR = 7
    DTR_ON = 8
    DTR_OFF = 9
    REQUEST_RTS = 10
    RTS_ON = 11
    RTS_OFF = 12
    REQUEST_INBOUND_FLOW = 13
    INBOUND_FLOW_NONE = 14
    INBOUND_FLOW_XONXOFF = 15
    INBOUND_FLOW_HARDWARE = 16
    FLOW_DCD = 17
    FLOW_DTR = 18
    FLOW_DSR = 19


# SET-PARITY and SET-STOPSIZE codes; 0 asks for the value in force.
PARITY_CODES = {"N": 1, "O": 2, "E": 3, "M": 4, "S": 5}
PARITY_NAMES = {code: name for name, code in PARITY_CODES.items()}
STOPSIZE_CODES = {1.0: 1, 2.0: 2, 1.5: 3}
STOPSIZE_VALUES = {code: bits for bits, code in STOPSIZE_CODES.items()}
# PURGE-DATA values.
PURGE_RECEIVE, PURGE_TRANSMIT, PURGE_BOTH = 1, 2, 3
# NOTIFY-MODEMSTATE bits: the lines, and the changes since the last notification.
MODEM_CD, MODEM_RI, MODEM_DSR, MODEM_CTS = 0x80, 0x40, 0x20, 0x10
DELTA_CD, TRAILING_RI, DELTA_DSR, DELTA_CTS = 0x08, 0x04, 0x02, 0x01

# Commands whose value is a 4-byte number, and those that carry none (or none when they are a poll).
_FOUR_BYTES = frozenset({Command.SET_BAUDRATE})
_NO_VALUE = frozenset({Command.FLOWCONTROL_SUSPEND, Command.FLOWCONTROL_RESUME})
_OPTIONAL_VALUE = frozenset({Command.NOTIFY_LINESTATE, Command.NOTIFY_MODEMSTATE})


@attrs.frozen
class ComPortMessage:
    """One COM-PORT-OPTION subnegotiation: `value` is the number it carries (None for a poll, a flow
    control suspend or resume, or a signature), `text` a signature's text."""

    command: Command
    value: int | None = None
    text: bytes = b""


@attrs.frozen
class Malformed:
    """A subnegotiation that could not be read; `what` says why, for a log line."""

    what: str


Event = ComPortMessage | Malformed


def escape(data: bytes) -> bytes:
    """Data as it goes on a Telnet connection: every 0xFF doubled."""
    return data.replace(IAC_BYTE, b"\xff\xff")


def modem_changes(previous: int, current: int) -> int:
    """The NOTIFY-MODEMSTATE delta bits for a change of lines from `previous` to `current`."""
    changed = previous ^ current
    deltas = 0
    if changed & MODEM_CD:
        deltas |= DELTA_CD
    if changed & MODEM_DSR:
        deltas |= DELTA_DSR
    if changed & MODEM_CTS:
        deltas |= DELTA_CTS
    if previous & MODEM_RI and not current & MODEM_RI:
        deltas |= TRAILING_RI
    return deltas


class _State(enum.Enum):
    DATA = enum.auto()
    COMMAND = enum.auto()  # after IAC
    OPTION = enum.auto()  # after IAC WILL/WONT/DO/DONT
    SUBNEGOTIATION = enum.auto()
    SUBNEGOTIATION_IAC = enum.auto()


class TelnetCodec:
    """One side of a Telnet connection with the COM-PORT-OPTION: the server (`server=True`) or the client.

    Both sides offer and accept BINARY and SUPPRESS-GO-AHEAD both ways and the COM-PORT-OPTION (the
    client WILL, the server DO); any other option is refused. Negotiation follows RFC 854's rule that a
    request for a state already in force is not answered, so two sides never loop.
    """

    def __init__(self, *, server: bool) -> None:
        self.server = server
        # Messages the peer sends carry this offset; ours carry the other.
        self._their_offset = 0 if server else SERVER_OFFSET
        self._our_offset = SERVER_OFFSET if server else 0
        self._our_options = frozenset({BINARY, SGA, COM_PORT_OPTION})
        self._their_options = frozenset({BINARY, SGA, COM_PORT_OPTION})
        # (True: our side, False: theirs, option) pairs in force, and those we asked for and await.
        self._enabled: set[tuple[bool, int]] = set()
        self._pending: set[tuple[bool, int]] = set()
        self._outgoing = bytearray()
        self._state = _State.DATA
        self._verb = 0
        self._sub = bytearray()
        self._sub_cut = False
        for option in (BINARY, SGA):
            self._request(True, option)
            self._request(False, option)
        self._request(not server, COM_PORT_OPTION)

    def _request(self, ours: bool, option: int) -> None:
        self._pending.add((ours, option))
        self._outgoing += bytes([IAC, WILL if ours else DO, option])

    def data_to_send(self) -> bytes:
        """Negotiation bytes owed to the peer (at first, the side's own requests); empties the buffer."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    @property
    def com_port_ready(self) -> bool:
        """The peer agreed to the COM-PORT-OPTION."""
        return (not self.server, COM_PORT_OPTION) in self._enabled

    def feed(self, data: bytes) -> tuple[bytes, list[Event]]:
        """The data bytes in what the peer sent (IAC IAC as one 0xFF), and its COM-PORT messages.

        Negotiation is answered into data_to_send(); other Telnet commands (NOP, GA, ...) are dropped.
        """
        out = bytearray()
        events: list[Event] = []
        i, size = 0, len(data)
        while i < size:
            state = self._state
            if state is _State.DATA:
                j = data.find(IAC_BYTE, i)
                if j < 0:
                    out += data[i:]
                    break
                out += data[i:j]
                i = j + 1
                self._state = _State.COMMAND
            elif state is _State.SUBNEGOTIATION:
                j = data.find(IAC_BYTE, i)
                end = size if j < 0 else j
                self._keep(data[i:end])
                if j < 0:
                    break
                i = j + 1
                self._state = _State.SUBNEGOTIATION_IAC
            else:
                byte = data[i]
                i += 1
                if state is _State.COMMAND:
                    self._command(byte, out)
                elif state is _State.OPTION:
                    self._negotiate(self._verb, byte)
                    self._state = _State.DATA
                elif byte == IAC:  # SUBNEGOTIATION_IAC: a doubled 0xFF inside it
                    self._keep(IAC_BYTE)
                    self._state = _State.SUBNEGOTIATION
                else:
                    # IAC SE ends it; any other command after IAC ends it too (a peer that forgot SE).
                    events.append(self._subnegotiation())
                    self._state = _State.DATA
                    if byte != SE:
                        self._command(byte, out)
        return bytes(out), events

    def _command(self, byte: int, out: bytearray) -> None:
        if byte == IAC:
            out.append(IAC)
            self._state = _State.DATA
        elif byte in (WILL, WONT, DO, DONT):
            self._verb = byte
            self._state = _State.OPTION
        elif byte == SB:
            self._sub.clear()
            self._sub_cut = False
            self._state = _State.SUBNEGOTIATION
        else:
            self._state = _State.DATA

    def _keep(self, chunk: bytes) -> None:
        room = MAX_SUBNEGOTIATION - len(self._sub)
        if len(chunk) > room:
            self._sub_cut = True
            chunk = chunk[:room]
        self._sub += chunk

    def _negotiate(self, verb: int, option: int) -> None:
        ours = verb in (DO, DONT)
        positive = verb in (WILL, DO)
        key = (ours, option)
        supported = option in (self._our_options if ours else self._their_options)
        agree, refuse = (WILL, WONT) if ours else (DO, DONT)
        was_pending = key in self._pending
        self._pending.discard(key)
        if positive and not supported:
            self._outgoing += bytes([IAC, refuse, option])
        elif positive and key not in self._enabled:
            self._enabled.add(key)
            if not was_pending:
                self._outgoing += bytes([IAC, agree, option])
        elif not positive and key in self._enabled:
            self._enabled.discard(key)
            if not was_pending:
                self._outgoing += bytes([IAC, refuse, option])

    def _subnegotiation(self) -> Event:
        sub = bytes(self._sub)
        if not sub or sub[0] != COM_PORT_OPTION:
            return Malformed(f"subnegotiation of option {sub[0]} ignored") if sub else Malformed("empty subnegotiation")
        if self._sub_cut:
            return Malformed(f"COM-PORT subnegotiation longer than {MAX_SUBNEGOTIATION} bytes ignored")
        if len(sub) < 2:
            return Malformed("COM-PORT subnegotiation with no command")
        try:
            command = Command(sub[1] - self._their_offset)
        except ValueError:
            return Malformed(f"unknown COM-PORT command {sub[1]}")
        value = sub[2:]
        if command is Command.SIGNATURE:
            return ComPortMessage(command, None, value)
        if command in _FOUR_BYTES:
            if len(value) != 4:
                return Malformed(f"{command.name} with {len(value)} value bytes, not 4")
            return ComPortMessage(command, struct.unpack("!I", value)[0])
        if command in _NO_VALUE or (command in _OPTIONAL_VALUE and not value):
            return ComPortMessage(command)
        if len(value) != 1:
            return Malformed(f"{command.name} with {len(value)} value bytes, not 1")
        return ComPortMessage(command, value[0])

    def message(self, command: Command, value: int | None = None, text: bytes = b"") -> bytes:
        """The bytes of one COM-PORT message from this side (a server's answer or notification, a
        client's request), with 0xFF doubled in its value."""
        if command in _FOUR_BYTES:
            body = struct.pack("!I", value)
        elif value is None:
            body = text
        else:
            body = bytes([value])
        return bytes([IAC, SB, COM_PORT_OPTION, command + self._our_offset]) + escape(body) + bytes([IAC, SE])
