"""Shtrih-M fiscal registers (protocols.md 1.5): STX | LEN | CMD | DATA | LRC, with ENQ/ACK/NAK.

LEN = len(CMD + DATA), one byte; LRC = XOR of LEN..DATA. The host sends ENQ (the device answers NAK
when idle, ACK when an answer is pending) or a frame (ACK, then the response frame, which the host
acknowledges). The exchange lasts until that host ACK (or NAK).
"""

from __future__ import annotations

from functools import reduce
from operator import xor

from proxy.protocols import Control, DeviceProtocol, Event, Exchange, Frame, Junk, ProtocolError
from proxy.protocols.framing import ScanningFramer

STX = 0x02
ENQ = 0x05
ACK = 0x06
NAK = 0x15
CONTROLS = (ENQ, ACK, NAK)
DEFAULT_PASSWORD = 30
SHORT_STATUS = 0x10


def lrc(body: bytes) -> int:
    """XOR of LEN..DATA."""
    return reduce(xor, body, 0)


def build_frame(command: int, data: bytes = b"") -> bytes:
    """A frame for a one-byte command (or a two-byte one given as 0xFFxx) with its LRC."""
    code = command.to_bytes(2 if command > 0xFF else 1, "big")
    body = bytes((len(code) + len(data),)) + code + data
    if body[0] != len(code) + len(data) or len(code) + len(data) > 255:
        raise ProtocolError(f"frame of {len(code) + len(data)} bytes exceeds 255")
    return bytes((STX,)) + body + bytes((lrc(body),))


def decode(frame: bytes) -> tuple[int, bytes]:
    """(command, data) of a frame; ProtocolError on a wrong length or LRC."""
    if len(frame) < 4 or frame[0] != STX or frame[1] != len(frame) - 3:
        raise ProtocolError(f"not a Shtrih frame: {frame.hex(' ')}")
    if lrc(frame[1:-1]) != frame[-1]:
        raise ProtocolError(f"LRC {frame[-1]:02X} should be {lrc(frame[1:-1]):02X}")
    if frame[2] == 0xFF and len(frame) > 4:
        return 0xFF00 | frame[3], bytes(frame[4:-1])
    return frame[2], bytes(frame[3:-1])


class Framer(ScanningFramer):
    """Length-driven frames; a candidate whose LRC fails is a false start and is rescanned.

    The LRC comes from a running XOR, so a candidate costs O(1) whatever its LEN: a stream of
    `02 ff` pairs is scanned in linear time.
    """

    starts = frozenset((STX,))
    controls = frozenset(CONTROLS)
    max_frame = 255 + 3
    prefix = xor

    def _frame_size(self, position: int) -> int | None:
        buffer = self._buffer
        if len(buffer) - position < 2:
            return None
        length = buffer[position + 1]
        if length == 0:
            return 0
        size = length + 3
        if len(buffer) - position < size:
            return None
        return size if self.prefix_of(position + 1, position + size - 1) == buffer[position + size - 1] else 0


class ShtrihExchange(Exchange):
    """ENQ or a frame, the device's ACK/NAK, its response frame, and the host's ACK of it.

    An ENQ from the host mid-exchange (its answer timeout fired) goes to the device, which answers ACK
    while it prepares the answer or sends the pending one. A host NAK of the response leaves the answer
    pending in the register until the host's next ENQ, so the exchange goes on until an ACK. When the
    host is gone, the proxy ACKs the response in its place, as a driver would, fetching it first with
    ENQ if the host had NAKed it: an answer left pending would go to whoever sends ENQ next.
    """

    def __init__(self, request: Event) -> None:
        super().__init__()
        self.answer_pending = False
        # The response repeats the command; an ENQ's answer may be any pending one.
        self._command = request.raw[2:3] if isinstance(request, Frame) and request.raw[2:3] != b"\xff" else b""
        self._acked = False
        self._refused_by_host = False

    def belongs(self, event: Event) -> bool:
        """A frame answers this request only after the register's ACK, and repeats its command."""
        if isinstance(event, Frame):
            return self._acked and (not self._command or event.raw[2:3] == self._command)
        return True

    def on_device(self, event: Event) -> bytes:
        if isinstance(event, Control) and event.byte == ACK:
            self._acked = True
        if isinstance(event, Control) and event.byte == NAK:
            # To ENQ: idle, nothing pending. To a frame: an interface error, the host may resend.
            self.complete = True
        elif isinstance(event, Frame):
            self.answer_pending = True
            self._refused_by_host = False
            if self.orphaned:
                self.complete = True
                return bytes((ACK,))
        return b""

    def from_host(self, event: Event) -> bool:
        if not isinstance(event, Control):
            return False
        if self.answer_pending and event.byte == ACK:
            self.complete = True
            return True
        if self.answer_pending and event.byte == NAK:
            self._refused_by_host = True
            return True
        return event.byte == ENQ

    def host_gone(self) -> bytes:
        if self.orphaned:
            return b""
        self.orphaned = True
        if self._refused_by_host:
            return bytes((ENQ,))  # the register answers with the pending response, which is then ACKed
        if self.answer_pending:
            self.complete = True
            return bytes((ACK,))
        return b""


class ShtrihProtocol(DeviceProtocol):
    name = "shtrih"
    framer = Framer
    host_speaks_during_exchange = True

    def is_request(self, event: Event) -> bool:
        return isinstance(event, Frame) or (isinstance(event, Control) and event.byte == ENQ)

    def exchange(self, request: Event) -> ShtrihExchange:
        return ShtrihExchange(request)

    def reject_answer(self, junk: Junk) -> bytes | None:
        return bytes((NAK,)) if junk.raw[:1] == bytes((STX,)) else None


PROTOCOL = ShtrihProtocol()
