"""ATOL protocol v2, the legacy one (protocols.md 1.3): STX | data, DLE-stuffed | ETX | CRC, with ENQ/ACK/EOT.

Inside the data, DLE (10) and ETX (03) are sent as DLE DLE and DLE ETX; an unescaped ETX ends it, and one
CRC byte follows: the XOR of every byte after STX up to and including ETX, stuffing included. The host's
turn is ENQ, ACK, frame, ACK, EOT; the device answers ENQ, the host ACKs, the device sends its frame,
the host ACKs, and the device's EOT completes the exchange.
"""

from __future__ import annotations

from functools import reduce
from operator import xor

from proxy.protocols import Control, DeviceProtocol, Event, Exchange, Frame, ProtocolError
from proxy.protocols.framing import ScanningFramer, Seeker

STX, ETX, EOT, ENQ, ACK, DLE, NAK = 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x15
CONTROLS = (EOT, ENQ, ACK, NAK)
MAX_FRAME = 1024


def stuff(data: bytes) -> bytes:
    return data.replace(b"\x10", b"\x10\x10").replace(b"\x03", b"\x10\x03")


def unstuff(stuffed: bytes) -> bytes:
    out, index = bytearray(), 0
    while index < len(stuffed):
        if stuffed[index] == DLE and index + 1 < len(stuffed):
            index += 1
        out.append(stuffed[index])
        index += 1
    return bytes(out)


def build_frame(data: bytes) -> bytes:
    """STX, the stuffed data, ETX and the CRC."""
    body = stuff(data) + bytes((ETX,))
    return bytes((STX,)) + body + bytes((reduce(xor, body, 0),))


def decode(frame: bytes) -> bytes:
    """The data of a frame; ProtocolError on a bad CRC."""
    if len(frame) < 3 or frame[0] != STX or frame[-2] != ETX:
        raise ProtocolError(f"not an ATOL v2 frame: {frame.hex(' ')}")
    if reduce(xor, frame[1:-1], 0) != frame[-1]:
        raise ProtocolError(f"CRC {frame[-1]:02X} should be {reduce(xor, frame[1:-1], 0):02X}")
    return unstuff(frame[1:-2])


def _unescaped_etx(buffer: bytearray, start: int, end: int) -> tuple[int, int]:
    """The first ETX in buffer[start:end] that no DLE escapes.

    Whether an ETX is escaped depends only on the run of DLEs right before it (odd: escaped), and that
    run never reaches back past a frame's STX, so the answer holds for every candidate before it.
    """
    index = start
    while (etx := buffer.find(ETX, index, end)) >= 0:
        before = etx - 1
        while before >= 0 and buffer[before] == DLE:
            before -= 1
        if (etx - 1 - before) % 2 == 0:
            return etx, etx
        index = etx + 1
    return -1, end


class Framer(ScanningFramer):
    """STX to the first unescaped ETX, plus the CRC byte.

    The end is found by the stuffing alone; the CRC (a running XOR, O(1) a candidate) then tells a
    frame from a false start (an STX in line noise), which is rescanned so that a frame behind it is
    not lost.
    """

    starts = frozenset((STX,))
    controls = frozenset(CONTROLS)
    max_frame = MAX_FRAME
    prefix = xor

    def __init__(self) -> None:
        super().__init__()
        self._etx = Seeker(_unescaped_etx)
        self._seekers.append(self._etx)

    def _frame_size(self, position: int) -> int | None:
        buffer = self._buffer
        limit = min(len(buffer), position + MAX_FRAME - 1)
        etx = self._etx.first(buffer, position + 1, limit)
        if etx < 0:
            return 0 if limit - position >= MAX_FRAME - 1 else None
        if etx + 1 >= len(buffer):
            return None
        return etx + 2 - position if self.prefix_of(position + 1, etx + 1) == buffer[etx + 1] else 0


class Atol2Exchange(Exchange):
    """From the host's ENQ to the device's closing EOT; every host message in between belongs to it.

    The host's turn is ENQ, frame, EOT; then the device's: ENQ, frame, EOT, each acknowledged by the
    host. When the host is gone, the proxy plays the rest of its part: it waits for the device's answer
    to the ENQ, ends the host's turn with EOT, and acknowledges the device's ENQ and frame, so the
    device reaches its closing EOT and nothing of this exchange is left for the next one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enq_answered = False
        self.command_sent = False
        self.host_done = False
        self.answering = False
        # The device sent its ENQ or its frame and waits for the host's ACK.
        self.owed_ack = False

    def belongs(self, event: Event) -> bool:
        """The device's answer frame comes in its own turn, after the host's EOT."""
        return not isinstance(event, Frame) or self.host_done

    def on_device(self, event: Event) -> bytes:
        if isinstance(event, Frame):
            self.answering = self.owed_ack = True
            return self._acknowledge()
        if not isinstance(event, Control):
            return b""
        byte = event.byte
        if byte == EOT and self.answering:
            self.complete = True
        elif byte == ENQ and self.host_done:
            self.owed_ack = True
            return self._acknowledge()
        elif byte in (ACK, NAK) and not self.enq_answered:
            self.enq_answered = True
            if byte == NAK:
                self.complete = True  # the device refused the host's ENQ: there is no exchange
            elif self.orphaned and not self.command_sent:
                self.complete = True  # the host left before its command: end its turn now
                return bytes((EOT,))
        elif byte == NAK and self.orphaned and not self.answering:
            # The device wants the command again, and nobody is there to send it: end the host's turn.
            self.complete = True
            return bytes((EOT,))
        return b""

    def from_host(self, event: Event) -> bool:
        if isinstance(event, Frame):
            self.command_sent = True
        elif isinstance(event, Control) and event.byte == EOT:
            self.host_done = True
        elif isinstance(event, Control) and event.byte in (ACK, NAK):
            self.owed_ack = False
        return True

    def host_gone(self) -> bytes:
        if self.orphaned:
            return b""
        self.orphaned = True
        if self.owed_ack:
            return self._acknowledge()
        if self.host_done:
            return b""
        if self.command_sent:
            self.host_done = True
            return bytes((EOT,))
        if self.enq_answered:
            self.complete = True
            return bytes((EOT,))
        return b""  # the device has not answered the ENQ yet: its answer is awaited (on_device)

    def _acknowledge(self) -> bytes:
        if not self.orphaned or not self.owed_ack:
            return b""
        self.owed_ack = False
        return bytes((ACK,))


class Atol2Protocol(DeviceProtocol):
    name = "atol2"
    framer = Framer
    host_speaks_during_exchange = True

    def is_request(self, event: Event) -> bool:
        return isinstance(event, Control) and event.byte == ENQ

    def exchange(self, request: Event) -> Atol2Exchange:
        return Atol2Exchange()


PROTOCOL = Atol2Protocol()
