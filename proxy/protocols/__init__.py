"""Sans-IO device protocols: bytes in, events out, no I/O and no event loop.

Every framer takes bytes with feed() and returns events: a complete Frame, a Control byte outside a
frame (ACK, NAK...), or Junk it could not place. flush() is called when the line has gone quiet: a
partial frame is then known to be a false start and is rescanned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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


class Framer(Protocol):
    """Splits one direction of a link into events; see the module docstring."""

    def feed(self, data: bytes) -> list[Event]: ...

    def flush(self) -> list[Event]: ...

    @property
    def pending(self) -> int: ...


class Exchange:
    """One request and its answer, followed from both sides until the protocol says it is complete.

    The proxy feeds it what the device sends (from_device) and the client's further messages while the
    exchange runs (from_host, which says whether a message belongs to this exchange, like Shtrih's ACK
    of the answer, or is the client's next request). Protocols whose answers end only in silence set
    `ends_in_silence`, and the proxy calls quiet() after frame_gap without device bytes.
    """

    ends_in_silence = False

    def __init__(self, device_framer: Framer) -> None:
        self.complete = False
        self.answered = False
        self._framer = device_framer

    def from_device(self, data: bytes) -> None:
        """Bytes the device sent during the exchange."""
        self.answered = True
        for event in self._framer.feed(data):
            if not self.complete:
                self.on_device(event)

    def on_device(self, event: Event) -> None:
        """One message from the device; the default ends the exchange at the first frame."""
        if isinstance(event, Frame):
            self.complete = True

    def from_host(self, event: Event) -> bool:
        """A client message during the exchange: True if it belongs to it (and is forwarded now)."""
        return False

    def quiet(self) -> None:
        """frame_gap passed with no device bytes after the answer began."""
        if self.ends_in_silence and self.answered:
            self.complete = True

    def failure_answer(self) -> bytes:
        """What the client is told when the device failed to answer in time, in the protocol's own way."""
        return b""


class DeviceProtocol:
    """What the proxy needs of a protocol to share a device request by request; the defaults suit most.

    A protocol module subclasses it and sets `name` and `framer` (a framer for either side of the
    link), and overrides what its protocol does otherwise.
    """

    name: str = ""
    framer: Callable[[], Framer]
    # True when a client's message ends only in silence (raw): the proxy flushes after frame_gap.
    request_ends_in_silence = False
    # True when the host sends more during an exchange (an ACK of the answer, the rest of a session).
    host_speaks_during_exchange = False
    # Seconds without a byte after which a client's partial message is abandoned and rescanned.
    partial_timeout = 0.5

    def host_framer(self) -> Framer:
        """A framer for the client's side of the link."""
        return self.framer()

    def is_request(self, event: Event) -> bool:
        """True when `event`, sent by a client outside an exchange, starts one."""
        return isinstance(event, Frame)

    def exchange(self, request: Event) -> Exchange:
        """The exchange `request` starts; by default complete at the device's first frame."""
        return Exchange(self.framer())

    def busy_answer(self, request: Event) -> bytes | None:
        """The protocol's own "busy" answer to a refused request, or None when it has none."""
        return None

    def reject_answer(self, junk: Junk) -> bytes | None:
        """What the device would answer bytes that are no valid message (a NAK), or None."""
        return None


def get(name: str) -> DeviceProtocol:
    """The protocol named in settings.toml; KeyError for an unknown name."""
    from proxy.protocols import atol2, atol3, coges, custom, dle, energomera_ce, iec61107, raw, shtrih

    modules = (raw, custom, shtrih, atol2, atol3, dle, coges, energomera_ce, iec61107)
    return {module.PROTOCOL.name: module.PROTOCOL for module in modules}[name]
