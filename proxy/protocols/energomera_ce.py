"""Energomera "CE" binary protocol (protocols.md 4.2): SLIP-framed packets with a CRC-8 (poly 0xB5).

C0 | payload, escaped (C0 -> DB DC, DB -> DB DD) | C0. A request's payload is OPT (48) | DST (2, LE) | SRC
(2, LE) | PASS (4, LE) | SERV | CMD (2, BE) | DATA | CRC; a reply has no PASS. SERV: bit 7 request, bits
6-4 class (5 normal, 7 error), bits 3-0 the data length. The CRC covers OPT..DATA, unescaped. One reply
completes the exchange.
"""

from __future__ import annotations

import struct

import attrs

from proxy.protocols import DeviceProtocol, ProtocolError, crc
from proxy.protocols.framing import ScanningFramer, Seeker, byte_finder

END, ESC, ESC_END, ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD
OPT = 0x48
HOST_ADDRESS = 0x00FD
DEFAULT_PASSWORD = 777777
MAX_FRAME = 256
CLASS_NORMAL, CLASS_ERROR = 5, 7
READ_DATE_TIME, READ_SERIAL = 0x0120, 0x011A


def crc8(data: bytes) -> int:
    return crc.crc8(data, 0xB5, 0)


def escape(payload: bytes) -> bytes:
    return payload.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")


def unescape(body: bytes) -> bytes:
    return body.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")


@attrs.frozen
class Packet:
    destination: int
    source: int
    password: int | None
    request: bool
    service_class: int
    command: int
    data: bytes


def build(packet: Packet) -> bytes:
    """The framed packet, CRC included."""
    if len(packet.data) > 15:
        raise ProtocolError(f"{len(packet.data)} data bytes do not fit SERV's 4 bits")
    serv = (0x80 if packet.request else 0) | packet.service_class << 4 | len(packet.data)
    payload = struct.pack("<BHH", OPT, packet.destination, packet.source)
    if packet.password is not None:
        payload += struct.pack("<I", packet.password)
    payload += struct.pack(">BH", serv, packet.command) + packet.data
    return bytes((END,)) + escape(payload + bytes((crc8(payload),))) + bytes((END,))


def decode(frame: bytes, *, request: bool) -> Packet:
    """A framed request or reply; ProtocolError on a bad CRC or length."""
    payload = unescape(frame.strip(b"\xc0"))
    header = 9 if request else 5
    if len(payload) < header + 4 or payload[0] != OPT:
        raise ProtocolError(f"not a CE packet: {frame.hex(' ')}")
    if crc8(payload[:-1]) != payload[-1]:
        raise ProtocolError(f"CRC {payload[-1]:02X} should be {crc8(payload[:-1]):02X}")
    destination, source = struct.unpack_from("<HH", payload, 1)
    password = struct.unpack_from("<I", payload, 5)[0] if request else None
    serv, command = struct.unpack_from(">BH", payload, header)
    data = payload[header + 3 : -1]
    if len(data) != serv & 0x0F:
        raise ProtocolError(f"SERV says {serv & 0x0F} data bytes, the packet has {len(data)}")
    return Packet(destination, source, password, bool(serv & 0x80), serv >> 4 & 0x07, command, data)


class Framer(ScanningFramer):
    """C0 to the next C0; an empty C0 C0 is the end of one packet and the start of the next."""

    starts = frozenset((END,))
    max_frame = MAX_FRAME

    def __init__(self) -> None:
        super().__init__()
        self._end = Seeker(byte_finder(END))
        self._seekers.append(self._end)

    def _frame_size(self, position: int) -> int | None:
        buffer = self._buffer
        limit = min(len(buffer), position + MAX_FRAME)
        end = self._end.first(buffer, position + 1, limit)
        if end < 0:
            return 0 if limit - position >= MAX_FRAME else None
        if end == position + 1:
            return 0  # C0 C0: the first C0 closed a packet already seen (or noise); start again here
        return end + 1 - position


class CeProtocol(DeviceProtocol):
    """One reply frame (normal or error class) completes an exchange."""

    name = "energomera-ce"
    framer = Framer


PROTOCOL = CeProtocol()
