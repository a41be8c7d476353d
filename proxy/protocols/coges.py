"""The COGES ECS Programmer's envelope (protocols.md 3): '<' payload '>' HH.

HH is the uppercase hex of the 8-bit sum of the payload's ASCII (brackets excluded). Only the envelope is
known; what the payloads mean, and that the device answers in the same envelope, are hypotheses (a key
press is "00002" + the key's code here, a price "000032" + 4 hex digits, a manager code "000034"/"000038"
+ the code, from the four worked examples).
"""

from __future__ import annotations

from proxy.protocols import DeviceProtocol, ProtocolError
from proxy.protocols.framing import ScanningFramer, Seeker, pattern_finder

OPEN, CLOSE = ord("<"), ord(">")
MAX_PAYLOAD = 256
HEX_DIGITS = frozenset(b"0123456789ABCDEFabcdef")
# Key codes: digits are themselves; the rest are this project's guess (only "N" appears in an example).
KEYS = {"ENT": "N", "ESC": "E", "DEL": "D", ">>": "R", "<<": "L", **{str(d): str(d) for d in range(10)}}


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def build_frame(payload: str) -> bytes:
    data = payload.encode("ascii")
    if any(not 0x20 <= b <= 0x7E or b in (OPEN, CLOSE) for b in data):
        raise ProtocolError(f"payload {payload!r} must be printable ASCII without '<' or '>'")
    return b"<" + data + b">" + f"{checksum(data):02X}".encode()


def decode(frame: bytes) -> str:
    """The payload of an envelope; ProtocolError on a bad checksum."""
    payload, digits = frame[1:-3], frame[-2:]
    if frame[:1] != b"<" or frame[-3:-2] != b">" or int(digits, 16) != checksum(payload):
        raise ProtocolError(f"bad COGES envelope {frame!r}")
    return payload.decode("ascii")


def key_payload(key: str) -> str:
    if key.upper() not in KEYS:
        raise ProtocolError(f"unknown key {key!r}; keys: {', '.join(KEYS)}")
    return "00002" + KEYS[key.upper()]


def price_payload(price: int) -> str:
    if not 0 <= price <= 0xFFFF:
        raise ProtocolError(f"price {price} does not fit 4 hex digits")
    return f"000032{price:04X}"


def manager_code_payload(code: str) -> str:
    if not code.isdigit() or len(code) not in (4, 8):
        raise ProtocolError(f"manager code {code!r} must be 4 or 8 digits")
    return ("000034" if len(code) == 4 else "000038") + code


class Framer(ScanningFramer):
    """'<', printable ASCII, '>', two hex digits; CR, LF and anything else between envelopes is Junk.

    The first byte after a '<' that cannot be payload decides: '>' ends the envelope, anything else
    (another '<' among it) proves the start false. A Seeker finds it, so no byte is looked at twice.
    """

    starts = frozenset((OPEN,))
    max_frame = MAX_PAYLOAD + 4

    def __init__(self) -> None:
        super().__init__()
        self._stop = Seeker(pattern_finder(rb"[^\x20-\x3b\x3d\x3f-\x7e]"))
        self._seekers.append(self._stop)

    def _frame_size(self, position: int) -> int | None:
        buffer = self._buffer
        limit = min(len(buffer), position + MAX_PAYLOAD + 2)
        stop = self._stop.first(buffer, position + 1, limit)
        if stop < 0:
            return 0 if limit - position >= MAX_PAYLOAD + 2 else None
        if buffer[stop] != CLOSE:
            return 0
        if len(buffer) - stop < 3:
            return None
        digits_ok = buffer[stop + 1] in HEX_DIGITS and buffer[stop + 2] in HEX_DIGITS
        return stop + 3 - position if digits_ok else 0


class CogesProtocol(DeviceProtocol):
    """Complete on the first envelope from the device."""

    name = "coges"
    framer = Framer
    partial_timeout = 0.3


PROTOCOL = CogesProtocol()
