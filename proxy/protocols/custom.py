"""The Custom ("Custom ru") fiscal register protocol: framing, checksum, frame building, exchanges.

Frame, both directions (protocols.md 1.1): 01 | LEN (2 bytes LE) = len(CMD+DATA) | CMD | DATA | CS, where
CS = (S & 0xFF) ^ (S >> 8 & 0xFF) and S is the 16-bit sum of LEN..DATA. The device answers a good frame
with ACK 06 at once, then a response frame whose DATA starts with a 2-byte LE error code; a bad frame
gets NAK 15. The host never acknowledges, so an exchange is complete with the response frame (or NAK).
"""

from __future__ import annotations

import struct
from operator import add

import attrs

from proxy.protocols import MAX_MESSAGE, Control, DeviceProtocol, Event, Exchange, Frame, Junk, ProtocolError
from proxy.protocols.framing import ScanningFramer

START = 0x01
ACK = 0x06
NAK = 0x15
# The PDF's largest parameter block is 909 bytes; a bigger LEN is a false start, not a frame.
MAX_LENGTH = 4096
DEFAULT_PASSWORD = 999999
ERROR_PROTOCOL_BUSY = 3503
ERROR_HELD_ELSEWHERE = 3505
HEADER = 3


def checksum(body: bytes) -> int:
    """CS over LEN..DATA: the low byte of the 16-bit sum XOR its high byte."""
    total = sum(body) & 0xFFFF
    return (total & 0xFF) ^ (total >> 8)


def build_frame(command: int, data: bytes = b"") -> bytes:
    """A complete frame for `command` with `data`, checksum included."""
    if not 0 <= command <= 0xFF:
        raise ProtocolError(f"command {command} is not a byte")
    length = 1 + len(data)
    if length > MAX_LENGTH:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_LENGTH}")
    body = struct.pack("<HB", length, command) + data
    return bytes((START,)) + body + bytes((checksum(body),))


def password_bytes(password: int = DEFAULT_PASSWORD) -> bytes:
    """A command's password field: 4 bytes little-endian."""
    return struct.pack("<I", password)


@attrs.frozen
class Message:
    """A decoded frame: its command and data; for a response, `error` and the rest."""

    command: int
    data: bytes

    @property
    def error(self) -> int:
        """A response's error code (0 = OK); responses always start with it."""
        if len(self.data) < 2:
            raise ProtocolError(f"response to {self.command:02X}h has {len(self.data)} data bytes, no error code")
        return struct.unpack_from("<H", self.data)[0]


def decode(frame: bytes) -> Message:
    """Splits a frame into command and data; ProtocolError on a wrong length or checksum."""
    if len(frame) < HEADER + 2 or frame[0] != START:
        raise ProtocolError(f"not a Custom frame: {frame.hex(' ')}")
    length = struct.unpack_from("<H", frame, 1)[0]
    if len(frame) != HEADER + length + 1:
        raise ProtocolError(f"LEN {length} does not match a frame of {len(frame)} bytes")
    expected = checksum(frame[1:-1])
    if frame[-1] != expected:
        raise ProtocolError(f"checksum {frame[-1]:02X} should be {expected:02X}")
    return Message(frame[3], bytes(frame[4:-1]))


class Framer(ScanningFramer):
    """Incremental framer for one direction of a Custom link.

    `from_device=True` also reports lone ACK/NAK bytes as Control events; from the host they are Junk.
    Boundaries come from LEN alone. A candidate whose checksum fails is taken as a false start: its
    01 becomes Junk and scanning resumes at the next byte, so a valid frame hidden behind garbage is
    still found. Checksums come from a running prefix sum, so no byte is ever summed twice and the work
    stays O(n) even on adversarial garbage full of 01 bytes.
    """

    starts = frozenset((START,))
    max_frame = HEADER + MAX_LENGTH + 1
    prefix = add

    def __init__(self, *, from_device: bool, max_length: int = MAX_LENGTH) -> None:
        super().__init__((ACK, NAK) if from_device else ())
        self._max_length = max_length

    def _frame_size(self, position: int) -> int | None:
        buffer, available = self._buffer, len(self._buffer) - position
        if available < HEADER:
            return None
        length = buffer[position + 1] | buffer[position + 2] << 8
        if not 1 <= length <= self._max_length:
            return 0
        size = HEADER + length + 1
        if available < size:
            return None
        total = self.prefix_of(position + 1, position + size - 1) & 0xFFFF
        valid = buffer[position + size - 1] == (total & 0xFF) ^ (total >> 8)
        return size if valid else 0


class CustomExchange(Exchange):
    """Complete when the response frame has arrived, or a NAK refused the request.

    The register ACKs (or NAKs) a request before it answers, and answers with the request's command: a
    frame before this request's ACK, or for another command, answers an earlier request.
    """

    def __init__(self, request: bytes) -> None:
        super().__init__()
        self._command = request[3] if len(request) > 3 else -1
        self._acked = False

    def belongs(self, event: Event) -> bool:
        if isinstance(event, Control):
            return not self._acked
        if isinstance(event, Frame):
            return self._acked and event.raw[3:4] == bytes((self._command,))
        return True

    def on_device(self, event: Event) -> bytes:
        if isinstance(event, Control):
            self._acked = True
            self.complete = event.byte == NAK
        elif isinstance(event, Frame):
            self.complete = True
        return b""


class CustomProtocol(DeviceProtocol):
    name = "custom"
    # The register's own per-stage byte timeouts are well under a second.
    partial_timeout = 1.0
    request_byte_timeout = 1.0

    def host_framer(self, max_message: int = MAX_MESSAGE) -> Framer:
        return Framer(from_device=False)

    def device_framer(self) -> Framer:
        return Framer(from_device=True)

    def exchange(self, request: Event) -> CustomExchange:
        return CustomExchange(request.raw)

    def busy_answer(self, request: Event) -> bytes | None:
        """ACK, then a response with error 3505 ("protocol held by another connection")."""
        command = request.raw[3] if len(request.raw) > 3 else 0
        return bytes((ACK,)) + build_frame(command, struct.pack("<H", ERROR_HELD_ELSEWHERE))

    def reject_answer(self, junk: Junk) -> bytes | None:
        """A frame whose checksum or length is wrong gets the NAK the register would send."""
        return bytes((NAK,)) if junk.raw[:1] == bytes((START,)) else None


PROTOCOL = CustomProtocol()
