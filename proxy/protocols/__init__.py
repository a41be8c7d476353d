"""Sans-IO device protocols: bytes in, events out, no I/O and no event loop.

Every framer takes bytes with feed() and returns events: a complete Frame, a Control byte outside a
frame (ACK, NAK...), or Junk it could not place. flush() is called when the line has gone quiet: a
partial frame is then known to be a false start and is rescanned.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Frame:
    """A complete frame exactly as it was on the wire."""

    raw: bytes


@attrs.frozen
class Control:
    """A single control byte outside any frame (ACK 06, NAK 15 ...)."""

    byte: int

    @property
    def raw(self) -> bytes:
        return bytes((self.byte,))


@attrs.frozen
class Junk:
    """Bytes that belong to no frame: line noise, a truncated frame, a false start."""

    raw: bytes


Event = Frame | Control | Junk


class ProtocolError(Exception):
    """A frame cannot be built or decoded; the message says which field is wrong."""
