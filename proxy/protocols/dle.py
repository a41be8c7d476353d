"""The Italian cash-register protocol "DLE STX NUM ID UF UF COD" (protocols.md 2, FORUM only).

DLE STX | NUM | ID | 00 | 00 | COD | DATA | DLE ETX | CRC, with every 10 inside sent as 10 10 and one raw
byte after DLE ETX. The CRC's algorithm is not public: the proxy passes it through and never checks it,
and the simulator uses an 8-bit sum of NUM..DATA, a choice of ours. A host frame is answered by one
ECR frame or a single ACK/NAK byte, which completes the exchange.
"""

from __future__ import annotations

import re

import attrs

from proxy.protocols import Control, DeviceProtocol, Event, Exchange, Frame, ProtocolError
from proxy.protocols.framing import ScanningFramer, Seeker

DLE, STX, ETX, ENQ, ACK, NAK = 0x10, 0x02, 0x03, 0x05, 0x06, 0x15
CONTROLS = (ENQ, ACK, NAK)
KEYBOARD = ord("A")
MAX_FRAME = 1024


@attrs.frozen
class Message:
    num: int
    node: int
    code: int
    data: bytes
    crc: int


def checksum(body: bytes) -> int:
    """The simulator's CRC: the 8-bit sum of NUM..DATA, unstuffed (the real algorithm is unknown)."""
    return sum(body) & 0xFF


def build_frame(num: int, node: int, code: int, data: bytes = b"") -> bytes:
    body = bytes((num & 0xFF, node & 0xFF, 0, 0, code)) + data
    return b"\x10\x02" + body.replace(b"\x10", b"\x10\x10") + b"\x10\x03" + bytes((checksum(body),))


def decode(frame: bytes) -> Message:
    """The fields of a frame (the CRC as sent; it is not checked)."""
    if len(frame) < 10 or frame[:2] != b"\x10\x02" or frame[-3:-1] != b"\x10\x03":
        raise ProtocolError(f"not a DLE STX frame: {frame.hex(' ')}")
    body = frame[2:-3].replace(b"\x10\x10", b"\x10")
    if len(body) < 5:
        raise ProtocolError(f"frame too short for NUM ID UF UF COD: {frame.hex(' ')}")
    return Message(body[0], body[1], body[4], body[5:], frame[-1])


DLE_RUN = re.compile(rb"\x10+")


def _significant_dle(buffer: bytearray, start: int, end: int) -> tuple[int, int]:
    """The first DLE in buffer[start:end] that is not half of a doubled DLE, with the byte after it there.

    In a run of DLEs the pairs are literal 10s; an odd run's last DLE gives the next byte a meaning (ETX
    ends the frame, anything else proves the start false). A run is judged whole, so it never depends
    on where a candidate began.
    """
    index = start
    while (run := DLE_RUN.search(buffer, index, end)) is not None:
        if run.end() >= end:
            return -1, run.start()  # the run may go on in bytes not yet here: search it again then
        if (run.end() - run.start()) % 2:
            return run.end() - 1, run.end()
        index = run.end()
    return -1, end


class Framer(ScanningFramer):
    """DLE STX to DLE ETX plus exactly one byte; DLE DLE is a literal 10."""

    starts = frozenset((DLE,))
    controls = frozenset(CONTROLS)
    max_frame = MAX_FRAME

    def __init__(self) -> None:
        super().__init__()
        self._dle = Seeker(_significant_dle)
        self._seekers.append(self._dle)

    def _frame_size(self, position: int) -> int | None:
        buffer = self._buffer
        if len(buffer) - position < 2:
            return None
        if buffer[position + 1] != STX:
            return 0
        limit = min(len(buffer), position + MAX_FRAME - 1)
        dle = self._dle.first(buffer, position + 2, limit)
        if dle < 0:
            return 0 if limit - position >= MAX_FRAME - 1 else None
        if buffer[dle + 1] != ETX:
            return 0  # DLE followed by anything else: not inside a frame, so the start was false
        return dle + 3 - position if dle + 2 < len(buffer) else None


class DleExchange(Exchange):
    def on_device(self, event: Event) -> bytes:
        if isinstance(event, Frame) or (isinstance(event, Control) and event.byte in (ACK, NAK)):
            self.complete = True
        return b""


class DleProtocol(DeviceProtocol):
    name = "dle"
    framer = Framer

    def exchange(self, request: Event) -> DleExchange:
        return DleExchange()


PROTOCOL = DleProtocol()
