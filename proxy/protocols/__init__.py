"""Sans-IO device protocols: bytes in, events out, no I/O and no event loop.

Every framer takes bytes with feed() and returns events: a complete Frame, a Control byte outside a
frame (ACK, NAK...), or Junk it could not place. flush() is called when the line has gone quiet: a
partial frame is then known to be a false start and is rescanned.
"""

from __future__ import annotations

import importlib
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

# raw: the longest message held back waiting for silence; past it the bytes are passed on as they are.
# The protocols settings.toml may name, each in the module of that name (with _ for -).
NAMES = ("raw", "custom", "shtrih", "atol2", "atol3", "dle", "coges", "energomera-ce", "iec61107")
MAX_MESSAGE = 65536
# Exchange sharing numbers a device's requests in steps of this (ATOL v3 renumbers its packets: the
# request's ID, its C2's, and two for status polls).
NUMBERS_PER_REQUEST = 4


class ProtocolError(Exception):
    """A frame cannot be built or decoded; the message says which field is wrong."""


class Framer(Protocol):
    """Splits one direction of a link into events; see the module docstring."""

    def feed(self, data: bytes) -> list[Event]: ...

    def flush(self) -> list[Event]: ...

    def reset(self) -> None: ...

    @property
    def pending(self) -> int: ...


class Exchange:
    """One request and its answer, followed from both sides until the protocol says it is complete.

    The proxy feeds it the device's messages (on_device) and the client's further messages while it
    runs (from_host, which says whether a message belongs to it, like Shtrih's ACK of the answer, or is
    the client's next request). Protocols whose answers end only in silence set `ends_in_silence`, and
    the proxy calls quiet() after frame_gap without device bytes.

    When the client is gone mid-exchange, host_gone() returns what the proxy sends in its place at once,
    and from then on on_device() returns the host's part of the choreography (an ACK of the answer, an
    EOT, a C2, a break), so that the device is free as soon as its answer is complete.
    """

    ends_in_silence = False

    def __init__(self) -> None:
        self.complete = False
        self.orphaned = False
        # A baud rate the host and the device agreed on for the rest of the exchange (IEC 61107 mode
        # C), which the serial line takes after the host's message; None: the line's own.
        self.line_rate: int | None = None

    def on_device(self, event: Event) -> bytes:
        """One message from the device; returns what the proxy must send for an absent host (b"")."""
        if isinstance(event, Frame):
            self.complete = True
        return b""

    def belongs(self, event: Event) -> bool:
        """False for a device message that cannot be this exchange's answer: a late or repeated answer to
        an earlier request, which is dropped rather than passed to this client. Protocols whose answers
        carry no such sign keep the default: everything belongs."""
        return True

    def from_host(self, event: Event) -> bool:
        """A client message during the exchange: True if it belongs to it (and is forwarded now)."""
        return False

    def quiet(self) -> None:
        """frame_gap passed with no device bytes after the answer began."""
        if self.ends_in_silence:
            self.complete = True

    def host_gone(self) -> bytes:
        """The client left: what the proxy sends now in its place; afterwards on_device() answers for it."""
        self.orphaned = True
        return b""

    # Exchange sharing only: a protocol whose packets carry a host-chosen number (ATOL v3) renumbers
    # them per device, since every client counts from 0 and a stale answer could carry the very number
    # the next client waits for. The defaults pass every byte unchanged.

    def request_bytes(self, request: bytes, number: int) -> bytes:
        """The request as it is written to the device; `number` counts the device's requests (in steps
        of NUMBERS_PER_REQUEST, so that a request's later packets have numbers of their own)."""
        return request

    def host_bytes(self, event: Event) -> bytes:
        """A client message that belongs to the exchange, as it is written to the device."""
        return event.raw

    def client_bytes(self, event: Event) -> bytes:
        """A device message of this exchange, as it is passed to the client."""
        return event.raw


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
    # The same for the device's side: longer, since a device may pause inside an answer (IEC 62056-21
    # allows 1.5 s between characters), and giving up a real frame would lose the answer.
    device_partial_timeout = 2.0
    # Seconds of silence after which the device drops a request it got only part of (its byte timeout;
    # Shtrih's is 50 ms). A client that leaves in the middle of a request holds the device this long in
    # session sharing, so that the next client's request does not join the rest of it.
    request_byte_timeout = 0.5

    def host_framer(self, max_message: int = MAX_MESSAGE) -> Framer:
        """A framer for the client's side of the link; `max_message` bounds a raw message (a framed
        protocol has its own maximum frame)."""
        return self.framer()

    def device_framer(self) -> Framer:
        """A framer for the device's side of the link."""
        return self.framer()

    def is_request(self, event: Event) -> bool:
        """True when `event`, sent by a client outside an exchange, starts one."""
        return isinstance(event, Frame)

    def exchange(self, request: Event) -> Exchange:
        """The exchange `request` starts; by default complete at the device's first frame."""
        return Exchange()

    def busy_answer(self, request: Event) -> bytes | None:
        """The protocol's own "busy" answer to a refused request, or None when it has none."""
        return None

    def reject_answer(self, junk: Junk) -> bytes | None:
        """What the device would answer bytes that are no valid message (a NAK), or None."""
        return None


def get(name: str) -> DeviceProtocol:
    """The protocol named in settings.toml; KeyError for an unknown name. Only its module is imported:
    a proxy starts faster with the protocols it uses."""
    if name not in NAMES:
        raise KeyError(name)
    return importlib.import_module(f"proxy.protocols.{name.replace('-', '_')}").PROTOCOL
