"""IEC 61107 / IEC 62056-21 mode C, with Energomera's variants (protocols.md 4.3).

Messages: '/' ... CR LF (sign-on, identification); ACK or NAK alone; ACK V Z Y CR LF (option select,
from the host); SOH or STX ... ETX or EOT, then one BCC byte. The BCC is 7-bit: standard XOR, or
Energomera's sum; both are accepted and neither is needed to find a message's end (data is 7-bit, so
ETX cannot occur inside). A sign-on opens a session that lasts until the host's break (SOH B0 ETX);
a message outside a session is answered by one reply.
"""

from __future__ import annotations

from functools import reduce
from operator import xor

from proxy.protocols import MAX_MESSAGE, Control, DeviceProtocol, Event, Exchange, Frame, ProtocolError
from proxy.protocols.framing import ScanningFramer, Seeker, pattern_finder

SOH, STX, ETX, EOT, ACK, NAK = 0x01, 0x02, 0x03, 0x04, 0x06, 0x15
SLASH, CR, LF = ord("/"), 0x0D, 0x0A
MAX_FRAME = 1024
BREAK = b"\x01B0\x03"
BUSY = "ERR19"


def bcc_xor(body: bytes) -> int:
    return reduce(xor, body, 0) & 0x7F


def bcc_sum(body: bytes) -> int:
    """Energomera's "IEC-add" BCC: the 7-bit sum."""
    return sum(body) & 0x7F


def build_block(head: bytes, *, energomera: bool = False) -> bytes:
    """SOH/STX ... ETX with its BCC over everything after the first byte."""
    bcc = bcc_sum(head[1:]) if energomera else bcc_xor(head[1:])
    return head + bytes((bcc,))


def command(code: str, data: str = "", *, energomera: bool = False) -> bytes:
    """SOH code STX data ETX BCC, e.g. command("R1", "VOLTA()"); a bare code has no STX part."""
    body = b"\x01" + code.encode() + (b"\x02" + data.encode() if data else b"") + b"\x03"
    return build_block(body, energomera=energomera)


def data_block(data: str, *, energomera: bool = False) -> bytes:
    return build_block(b"\x02" + data.encode() + b"\x03", energomera=energomera)


def bcc_ok(message: bytes) -> bool:
    """True when the BCC matches either method."""
    body = message[1:-1]
    return message[-1] in (bcc_xor(body), bcc_sum(body))


def block_data(message: bytes) -> str:
    """The text between STX (or SOH) and ETX/EOT of a block; ProtocolError on a bad BCC."""
    if not bcc_ok(message):
        raise ProtocolError(f"bad BCC in {message!r}")
    return message[1:-2].decode("ascii", "replace")


def _line_end(buffer: bytearray, start: int, end: int) -> tuple[int, int]:
    found = buffer.find(b"\r\n", start, end)
    # A CR as the last byte may still meet its LF: search it again with the next bytes.
    return found, max(start, end - 1)


class Framer(ScanningFramer):
    """One IEC message at a time; `from_host` decides what ACK followed by a digit means.

    Each kind of end (CR LF, ETX or EOT) and each byte that proves a block false (not 7-bit, or a
    second SOH or STX) has a Seeker, so the scan stays O(n) whatever the bytes are.
    """

    max_frame = MAX_FRAME

    def __init__(self, *, from_host: bool) -> None:
        self.starts = frozenset((SLASH, SOH, STX, ACK) if from_host else (SLASH, SOH, STX))
        super().__init__((ACK, NAK))
        self._line = Seeker(_line_end)
        self._block_end = Seeker(pattern_finder(rb"[\x03\x04]"))
        self._bad_after_soh = Seeker(pattern_finder(rb"[\x80-\xff\x01]"))
        self._bad_after_stx = Seeker(pattern_finder(rb"[\x80-\xff\x01\x02]"))
        self._seekers += [self._line, self._block_end, self._bad_after_soh, self._bad_after_stx]

    def _frame_size(self, position: int) -> int | None:
        buffer = self._buffer
        first = buffer[position]
        if first == ACK:
            # From the host, ACK followed by a digit is an option select, ending in CR LF.
            if len(buffer) - position < 2:
                return None
            if not 0x30 <= buffer[position + 1] <= 0x39:
                return 0
        if first in (SLASH, ACK):
            limit = min(len(buffer), position + MAX_FRAME)
            end = self._line.first(buffer, position + 1, limit)
            if end >= 0:
                return end + 2 - position
            return None if limit - position < MAX_FRAME else 0
        limit = min(len(buffer), position + MAX_FRAME - 1)
        end = self._block_end.first(buffer, position + 1, limit)
        bad = (self._bad_after_soh if first == SOH else self._bad_after_stx).first(
            buffer, position + 1, limit if end < 0 else end
        )
        if bad >= 0:
            return 0  # not 7-bit text inside a block: the start was false
        if end < 0:
            return None if limit - position < MAX_FRAME - 1 else 0
        return end + 2 - position if end + 1 < len(buffer) else None


def is_sign_on(message: bytes) -> bool:
    """/?[address]!CR LF, which opens a session (a broadcast like /?CTIME(...)! does not)."""
    return message.startswith(b"/?") and message.endswith(b"!\r\n") and b"(" not in message


# The baud rates of mode C's Z digit (identification and option select): 0..6.
BAUD_RATES = (300, 600, 1200, 2400, 4800, 9600, 19200)


def option_select(message: bytes) -> tuple[int | None, bool] | None:
    """ACK V Z Y CR LF: (the baud rate Z agrees, or None; whether Y asks for the data readout, which
    ends the session), or None when `message` is no option select."""
    if len(message) != 6 or message[0] != ACK or message[-2:] != b"\r\n":
        return None
    rate = BAUD_RATES[message[2] - 0x30] if 0x30 <= message[2] <= 0x36 else None
    return rate, message[3:4] == b"0"


class IecExchange(Exchange):
    """A session from sign-on to break (or to the end of a data readout), or one message and its reply.

    The option select may agree a baud rate (`line_rate`), which the line takes after it.

    Each host message in a session waits for the meter's reply. When the host is gone, the proxy lets
    the reply it waits for finish (acknowledging partial blocks so the meter reaches the last one), then
    sends the break with the BCC the meter itself uses, and the session ends.
    """

    def __init__(self, request: bytes) -> None:
        super().__init__()
        self.session = is_sign_on(request)
        # The host said something after its sign-on (an option select, a read): no mode A/B readout then.
        self._identified = self._host_spoke = False
        # A broadcast (/?CTIME(...)!) and a break get no answer.
        self.complete = (request.startswith(b"/?") and not self.session) or request[:4] == BREAK
        self._awaiting_reply = not self.complete
        self._readout = False
        self._block_pending = False
        self._energomera_bcc = False

    def on_device(self, event: Event) -> bytes:
        partial = isinstance(event, Frame) and event.raw[-2:-1] == bytes((EOT,))
        if self.session and isinstance(event, Frame) and event.raw[:1] == b"/":
            self._identified = True
        elif self.session and self._identified and not self._host_spoke and not partial:
            # Modes A and B: the meter sends its readout right after its identification.
            self._readout = self._readout or (isinstance(event, Frame) and event.raw[:1] == b"\x02")
        if isinstance(event, Frame) and event.raw[:1] in (b"\x01", b"\x02"):
            body = event.raw[1:-1]
            self._energomera_bcc = event.raw[-1] == bcc_sum(body) != bcc_xor(body)
        if partial:
            # A partial block: the host ACKs for the next one (the proxy does, for a host that left).
            self._awaiting_reply = False
            self._block_pending = True
            return self._acknowledge_block() if self.orphaned else b""
        if not isinstance(event, (Frame, Control)):
            return b""
        self._awaiting_reply = False
        if not self.session or self._readout:
            self.complete = True
        elif self.orphaned:
            return self._end_session()
        return b""

    def from_host(self, event: Event) -> bool:
        if self._block_pending and isinstance(event, Control):
            self._block_pending = False
            self._awaiting_reply = True  # the next block
            return True
        if self.session:
            self._host_spoke = True
            selected = option_select(event.raw) if isinstance(event, Frame) else None
            if isinstance(event, Frame) and event.raw[:4] == BREAK:
                self.complete = True
            elif selected is not None:
                self.line_rate, self._readout = selected
            # The meter answers a message, and a NAK (by repeating its last one); not a lone ACK with no
            # block pending, nor bytes that form no message.
            answered = isinstance(event, Frame) or (isinstance(event, Control) and event.byte == NAK)
            self._awaiting_reply = not self.complete and answered
            return True
        return False

    def host_gone(self) -> bytes:
        self.orphaned = True
        if self._block_pending:
            return self._acknowledge_block()
        if self.session and not self._awaiting_reply and not self.complete:
            return self._end_session()
        return b""

    def _acknowledge_block(self) -> bytes:
        """The ACK a partial block asks the host for; the meter then sends the next block."""
        self._block_pending = False
        self._awaiting_reply = True
        return bytes((ACK,))

    def _end_session(self) -> bytes:
        self.complete = True
        return command("B0", energomera=self._energomera_bcc)


class IecProtocol(DeviceProtocol):
    name = "iec61107"
    host_speaks_during_exchange = True
    partial_timeout = 0.2
    request_byte_timeout = 1.5  # IEC 62056-21 allows 1500 ms between characters

    def host_framer(self, max_message: int = MAX_MESSAGE) -> Framer:
        return Framer(from_host=True)

    def device_framer(self) -> Framer:
        return Framer(from_host=False)

    def exchange(self, request: Event) -> IecExchange:
        return IecExchange(request.raw)

    def busy_answer(self, request: Event) -> bytes | None:
        """STX (ERR19) ETX BCC: "BusyAccess", as the meter answers when another port holds it, with the
        BCC method of the request (an Energomera port may be set to the sum)."""
        raw = request.raw
        body = raw[1:-1]
        energomera = raw[:1] in (b"\x01", b"\x02") and raw[-1] == bcc_sum(body) != bcc_xor(body)
        return data_block(f"({BUSY})", energomera=energomera)


PROTOCOL = IecProtocol()
