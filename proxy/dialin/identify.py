"""How a dial-in device says who it is: the first bytes it sends, read by the [dialin] identify method."""

from __future__ import annotations

import re

import trio

from proxy.config import DialinConfig

# A device must have said who it is within this many bytes.
MAX_ID_BYTES = 1024
VALID_ID = re.compile(rb"[\x21-\x7e]{1,64}")
ID_RULE = "1-64 printable characters"
SIGN_ON = b"/?!\r\n"
# How much of what a device sent an error message quotes: a log line per failed connection stays short.
SHOWN_BYTES = 64


def is_device_id(device_id: str) -> bool:
    """Whether identification could register `device_id`: 1-64 printable ASCII characters (no space or
    control character), or the hex of a fixed-length id that is not printable. `devices add` and imports
    check the same rule."""
    if not device_id.isascii():
        return False
    raw = device_id.encode("ascii")
    if VALID_ID.fullmatch(raw):
        return True
    # identify = "fixed" registers a non-printable id as lowercase hex of at most MAX_ID_BYTES bytes.
    return 0 < len(raw) <= 2 * MAX_ID_BYTES and len(raw) % 2 == 0 and re.fullmatch(rb"[0-9a-f]+", raw) is not None


def shown(data: bytes | str) -> str:
    """`data` quoted for a one-line message: repr of its first SHOWN_BYTES, and its length when cut."""
    if len(data) <= SHOWN_BYTES:
        return repr(data)
    return f"{data[:SHOWN_BYTES]!r}... ({len(data)} {'bytes' if isinstance(data, bytes) else 'characters'})"


class IdentifyFailed(Exception):
    """The device did not identify; `sent` holds what it sent."""

    def __init__(self, reason: str, sent: bytes) -> None:
        super().__init__(reason)
        self.sent = sent


def _text_id(raw: bytes, buffer: bytes) -> str:
    raw = raw.strip()
    if not VALID_ID.fullmatch(raw):
        raise IdentifyFailed(f"{shown(raw)} is no device id ({ID_RULE})", buffer)
    return raw.decode("ascii")


def parse_id(config: DialinConfig, buffer: bytes) -> tuple[str, bytes] | None:
    """(id, the bytes after it) once `buffer` holds the id; None while it may still come.

    line: the first line, CR/LF stripped. regex: group 1 of identify_pattern. fixed: the first
    identify_length bytes (as text if printable, else as hex). iec61107: the identification line's
    serial number (its longest run of 6 or more digits), else the identification itself.
    """
    method = config.identify
    if method in ("line", "iec61107"):
        end = buffer.find(b"\n")
        if end < 0:
            return None
        line, rest = buffer[:end].rstrip(b"\r"), buffer[end + 1 :]
        if method == "line":
            return _text_id(line, buffer), rest
        if not line.startswith(b"/") or len(line) < 6:
            raise IdentifyFailed(f"{shown(line)} is no IEC 61107 identification", buffer)
        ident = line[5:].removeprefix(b"\\2")
        serials = re.findall(rb"\d{6,}", ident)
        return _text_id(max(serials, key=len) if serials else ident, buffer), rest
    if method == "regex":
        match = re.search(config.identify_pattern.encode("latin-1"), buffer)
        if match is None or match.group(1) is None:
            return None
        return _text_id(match.group(1), buffer), buffer[match.end() :]
    length = config.identify_length
    if len(buffer) < length:
        return None
    raw = buffer[:length]
    device_id = raw.decode("ascii") if VALID_ID.fullmatch(raw) else raw.hex()
    return device_id, buffer[length:]


async def identify(stream: trio.abc.Stream, config: DialinConfig) -> tuple[str, bytes]:
    """Reads the device's id from `stream` (sending the IEC sign-on first where that is the method).

    Error handling: IdentifyFailed when the device closes, sends no id within MAX_ID_BYTES, or sends
    one that is not an id; the caller's timeout bounds how long it may take.
    """
    buffer = b""
    if config.identify == "iec61107":
        await stream.send_all(SIGN_ON)
    while True:
        found = parse_id(config, buffer)
        if found is not None:
            return found
        if len(buffer) >= MAX_ID_BYTES:
            raise IdentifyFailed(f"no id in the first {MAX_ID_BYTES} bytes", buffer)
        data = await stream.receive_some(MAX_ID_BYTES)
        if not data:
            raise IdentifyFailed("closed the connection before saying who it is", buffer)
        buffer += data
