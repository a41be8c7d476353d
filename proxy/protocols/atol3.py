"""ATOL transport protocol v3 (protocols.md 1.2): FE | LEN0 | LEN1 | ID | DATA | CRC, DATA and CRC escaped.

LEN = len(unescaped DATA) = LEN0 | LEN1 << 7. In DATA and CRC, FE is sent as FD EE and FD as FD ED, so
FE only ever starts a packet. CRC-8 (poly 0x31, init 0xFF) covers ID and the unescaped DATA. The device
answers with the packet's ID; a final task result (A3, A4, A6, A7) is acknowledged by the host's C2
(or C5) packet, and the exchange lasts until the device has answered that too. ID F0 carries
asynchronous results.
"""

from __future__ import annotations

from proxy.protocols import DeviceProtocol, Event, Exchange, Frame, ProtocolError, crc
from proxy.protocols.framing import ScanningFramer

START, ESCAPE = 0xFE, 0xFD
ESCAPED = {0xEE: 0xFE, 0xED: 0xFD}
ASYNC_ID = 0xF0
# Host packet IDs run 00..DF and wrap.
HOST_IDS = 0xE0

MAX_DATA = 0x3FFF
ADD, ACK_RESULT, REQUEST, ABORT, ACK_ADD = 0xC1, 0xC2, 0xC3, 0xC4, 0xC5
RESULT = 0xA3
FINAL_RESULTS = (RESULT, 0xA4, 0xA6, 0xA7)
PENDING = 0xA1
ASYNC_FLAG = 0x04


def crc8(data: bytes) -> int:
    return crc.crc8(data, 0x31, 0xFF)


def escape(data: bytes) -> bytes:
    return data.replace(b"\xfd", b"\xfd\xed").replace(b"\xfe", b"\xfd\xee")


def build_packet(packet_id: int, data: bytes) -> bytes:
    """A packet with its length, ID, escaped data and CRC."""
    if len(data) > MAX_DATA or not 0 <= packet_id <= 0xFF:
        raise ProtocolError(f"packet of {len(data)} bytes or ID {packet_id} out of range")
    crc = crc8(bytes((packet_id,)) + data)
    return bytes((START, len(data) & 0x7F, len(data) >> 7, packet_id)) + escape(data + bytes((crc,)))


def decode(packet: bytes) -> tuple[int, bytes]:
    """(ID, unescaped DATA) of a packet; ProtocolError on a bad length or CRC."""
    if len(packet) < 5 or packet[0] != START:
        raise ProtocolError(f"not an ATOL v3 packet: {packet.hex(' ')}")
    body = _unescape(packet[4:])
    length = packet[1] | packet[2] << 7
    if len(body) != length + 1:
        raise ProtocolError(f"LEN {length} does not match {len(body) - 1} data bytes")
    if crc8(packet[3:4] + body[:-1]) != body[-1]:
        raise ProtocolError(f"CRC {body[-1]:02X} should be {crc8(packet[3:4] + body[:-1]):02X}")
    return packet[3], body[:-1]


def _unescape(data: bytes) -> bytes:
    out, index = bytearray(), 0
    while index < len(data):
        if data[index] == ESCAPE and index + 1 < len(data):
            out.append(ESCAPED.get(data[index + 1], data[index + 1]))
            index += 2
        else:
            out.append(data[index])
            index += 1
    return bytes(out)


class Framer(ScanningFramer):
    """FE starts a packet; LEN counts unescaped data bytes, so the escapes are walked to find the end.

    FE is always escaped inside a packet, so a raw FE cuts the candidate short and is the next
    candidate: walks never overlap. Runs without FD are stepped over with bytes.find, and a packet that
    arrives in pieces resumes its walk where the last piece ended, so the work stays O(n).
    """

    starts = frozenset((START,))
    max_frame = 4 + 2 * (MAX_DATA + 1)

    def __init__(self) -> None:
        super().__init__()
        # (candidate position, index reached, unescaped bytes still wanted) of a packet cut by a feed.
        self._walk: tuple[int, int, int] | None = None

    def _consumed(self, count: int) -> None:
        if self._walk is not None:
            position, index, wanted = self._walk
            self._walk = (position - count, index - count, wanted) if position >= count else None

    def _frame_size(self, position: int) -> int | None:
        buffer = self._buffer
        if len(buffer) - position < 4:
            return None
        if buffer[position + 1] > 0x7F or buffer[position + 2] > 0x7F or buffer[position + 3] == START:
            return 0
        if self._walk is not None and self._walk[0] == position:
            _, index, wanted = self._walk
        else:
            index, wanted = position + 4, (buffer[position + 1] | buffer[position + 2] << 7) + 1  # DATA and CRC
        length = len(buffer)
        while wanted and index < length:
            stop = min(length, index + wanted)
            escape = buffer.find(ESCAPE, index, stop)
            plain_end = stop if escape < 0 else escape
            if buffer.find(START, index, plain_end) >= 0:
                return 0  # FE is always escaped inside a packet: this one was cut short
            wanted -= plain_end - index
            index = plain_end
            if escape < 0:
                continue
            if index + 1 >= length:
                break
            if buffer[index + 1] == START:
                return 0
            index += 2
            wanted -= 1
        if wanted:
            self._walk = (position, index, wanted)
            return None
        self._walk = None
        return index - position


class Atol3Exchange(Exchange):
    """The device's packet with the request's ID, and whatever the result still needs.

    A task added with the async flag is answered "pending" (A1) and its result comes later in an
    asynchronous packet (ID F0) with the same task ID: the exchange waits for it. After a final result
    (A3, A4, A6, A7) it lasts until the host's C2 (or C5) packet has been answered too. When the host is
    gone, the proxy sends that C2 itself, so the result does not stay in the device's task buffer.
    """

    def __init__(self, request: bytes) -> None:
        super().__init__()
        self.packet_id = request[3] if len(request) > 3 else -1
        data = _unescape(request[4:]) if len(request) > 4 else b""
        self.waits_async = len(data) >= 3 and data[0] in (ADD, ACK_ADD) and bool(data[1] & ASYNC_FLAG)
        self.task_id = data[2] if len(data) >= 3 else (data[1] if len(data) == 2 else -1)
        self.awaiting_ack = False
        self.ack_sent = False
        # Packet IDs as the device sees them -> as the client sent them (renumbered in exchange sharing).
        self._client_ids: dict[int, int] = {}
        # IDs for the host's status polls (C3) of an async task while its result is awaited.
        self._poll_ids: list[int] = []

    def request_bytes(self, request: bytes, number: int) -> bytes:
        """The request's ID is `number`; then its C2's, and two for status polls (NUMBERS_PER_REQUEST)."""
        self.packet_id = number % HOST_IDS
        self._poll_ids = [(number + 2) % HOST_IDS, (number + 3) % HOST_IDS]
        return self._renumber(request, self.packet_id)

    def host_bytes(self, event: Event) -> bytes:
        """The host's C2 goes under the number after the request's (from_host moved packet_id there); a
        status poll under a poll number."""
        if not self._client_ids or not isinstance(event, Frame):
            return event.raw
        if self._is_poll(event):
            self._poll_ids.reverse()
            return self._renumber(event.raw, self._poll_ids[1])
        return self._renumber(event.raw, self.packet_id)

    def client_bytes(self, event: Event) -> bytes:
        if not isinstance(event, Frame) or len(event.raw) < 5 or event.raw[3] not in self._client_ids:
            return event.raw
        try:
            packet_id, data = decode(event.raw)
        except ProtocolError:
            return event.raw  # not a packet we can rebuild: the client's own driver finds it bad
        return build_packet(self._client_ids[packet_id], data)

    def _renumber(self, packet: bytes, number: int) -> bytes:
        """`packet` with ID `number`, remembering the client's ID to give the reply back under."""
        try:
            client_id, data = decode(packet)
        except ProtocolError:
            return packet
        self._client_ids[number] = client_id
        return build_packet(number, data)

    def belongs(self, event: Event) -> bool:
        """A packet answers this exchange when it carries its ID (or is the awaited async result)."""
        if not isinstance(event, Frame) or len(event.raw) < 5:
            return True
        packet_id, data = event.raw[3], _unescape(event.raw[4:])
        if packet_id == ASYNC_ID:
            return self.waits_async and data[1:2] == bytes((self.task_id,))
        if packet_id in self._poll_ids and packet_id in self._client_ids:
            return True  # the answer to the host's status poll
        if packet_id != self.packet_id:
            return False
        # Every client numbers its packets from 0, so an ID alone can match a stale answer to another
        # client: a result names its task, which must be this one's.
        return data[:1] != bytes((RESULT,)) or self.task_id < 0 or data[1:2] == bytes((self.task_id,))

    def on_device(self, event: Event) -> bytes:
        if not isinstance(event, Frame) or len(event.raw) < 5:
            return b""
        packet_id, data = event.raw[3], _unescape(event.raw[4:])
        if packet_id in self._poll_ids and packet_id != self.packet_id:
            return b""  # the state of the task the host polled: the exchange goes on
        if packet_id == ASYNC_ID and self.waits_async and data[1:2] == bytes((self.task_id,)):
            self.waits_async = False
            self.awaiting_ack = data[:1] != b"" and data[0] in FINAL_RESULTS
            self.complete = not self.awaiting_ack
        elif packet_id != self.packet_id:
            return b""
        elif self.ack_sent:
            self.complete = True
        elif data[:1] and data[0] in FINAL_RESULTS:
            self.awaiting_ack = True
            if len(data) > 1:
                self.task_id = data[1]
        elif not (self.waits_async and data[:1] == bytes((PENDING,))):
            self.complete = True
        return self._acknowledge() if self.orphaned else b""

    def _is_poll(self, event: Event) -> bool:
        """A status poll (C3 REQ) of the task whose async result this exchange awaits."""
        if not self.waits_async or not isinstance(event, Frame) or len(event.raw) < 6:
            return False
        return _unescape(event.raw[4:])[:2] == bytes((REQUEST, self.task_id & 0xFF))

    def from_host(self, event: Event) -> bool:
        if self._is_poll(event):
            return True
        if self.awaiting_ack and isinstance(event, Frame) and len(event.raw) > 4:
            data = _unescape(event.raw[4:])
            if data[:1] in (bytes((ACK_RESULT,)), bytes((ACK_ADD,))):
                # Renumbered, the C2 goes with the next number after the request's (host_bytes).
                self.packet_id = (self.packet_id + 1) % HOST_IDS if self._client_ids else event.raw[3]
                self.ack_sent = True
                return True
        return False

    def host_gone(self) -> bytes:
        self.orphaned = True
        return self._acknowledge()

    def _acknowledge(self) -> bytes:
        """The C2 the absent host owes a final result, once; the exchange ends at its reply."""
        if not self.awaiting_ack or self.ack_sent or self.complete:
            return b""
        self.ack_sent = True
        self.packet_id = (self.packet_id + 1) % HOST_IDS if self.packet_id >= 0 else 0
        return build_packet(self.packet_id, bytes((ACK_RESULT, self.task_id & 0xFF)))


class Atol3Protocol(DeviceProtocol):
    name = "atol3"
    framer = Framer
    host_speaks_during_exchange = True

    def exchange(self, request: Event) -> Atol3Exchange:
        return Atol3Exchange(request.raw)


PROTOCOL = Atol3Protocol()
