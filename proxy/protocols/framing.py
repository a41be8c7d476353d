"""The scanning loop every framer shares: frames where the protocol finds them, control bytes, junk.

The goal, as in h11's receive buffer: average speed, and O(n) work in the worst case over any input in
any split, because one peer's bytes are scanned in the event loop and a quadratic scan would stall every
other device (64 KiB of STX bytes once cost five seconds). Three rules keep it linear:
- Runs of bytes that cannot start a frame are skipped with one regular-expression search (C speed).
- A protocol finds a frame's end with a Seeker, which remembers how far it has searched, so no byte is
  searched twice for the same kind of marker, however many candidate starts ask, and however the bytes
  were split across feeds.
- Checksums of length-driven frames come from running prefix values (sum or XOR), so checking a
  candidate costs O(1) however long it claims to be.
Every protocol states `max_frame`: a candidate longer than that is a false start, so after a feed the
buffer holds at most one partial frame shorter than max_frame.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterable
from itertools import accumulate, islice
from operator import add

from proxy.protocols import Control, Event, Frame, Junk

# Finds a marker in buffer[start:end]: (its index or -1, the index up to which the search was final).
# A search may stop short of `end` when the bytes at the end could still become a marker (CR before LF).
Find = Callable[[bytearray, int, int], tuple[int, int]]


class Seeker:
    """The first marker at or after an index of a growing buffer, searching each byte once.

    Queries from a framer's candidates come in increasing order; the seeker keeps the first marker it
    found (or how far it searched in vain) and only searches bytes it has not searched yet. A query that
    goes back before what it remembers starts afresh, which the scanning loop never needs.
    """

    def __init__(self, find: Find) -> None:
        self._find = find
        self._origin = 0  # the search covers buffer[_origin:_searched]
        self._searched = 0
        self._found = -1

    def first(self, buffer: bytearray, start: int, end: int) -> int:
        """The index of the first marker in buffer[start:end], or -1 when there is none (yet)."""
        found = self._found
        if found >= start:
            return found if found < end else -1
        if found >= 0 or start < self._origin:
            # The marker it knew lies before `start` (or the query went back): search from `start` on.
            self._origin = self._searched = start
            found = -1
        searched = self._searched
        if searched < end:
            found, self._searched = self._find(buffer, searched if searched > start else start, end)
            self._found = found
        return found if 0 <= found < end else -1

    def shift(self, count: int) -> None:
        """The first `count` bytes left the buffer; what was searched beyond them stays searched."""
        if 0 <= self._found < count:
            self._origin = self._searched = 0
            self._found = -1
            return
        self._origin = max(0, self._origin - count)
        self._searched = max(0, self._searched - count)
        if self._found >= 0:
            self._found -= count


def byte_finder(byte: int) -> Find:
    """A Find for one byte value."""

    def find(buffer: bytearray, start: int, end: int) -> tuple[int, int]:
        return buffer.find(byte, start, end), end

    return find


def pattern_finder(pattern: bytes) -> Find:
    """A Find for a regular expression matching single bytes (a character class)."""
    compiled = re.compile(pattern, re.DOTALL)

    def find(buffer: bytearray, start: int, end: int) -> tuple[int, int]:
        match = compiled.search(buffer, start, end)
        return (match.start() if match else -1), end

    return find


class ScanningFramer:
    """Scans a byte buffer left to right, asking the protocol at each frame-start byte how long the frame is.

    A subclass sets `starts` (the bytes a frame can begin with), `controls`, `max_frame` and, for frames
    checked by a running sum or XOR, `prefix`; it implements _frame_size(), and registers its Seekers in
    `self._seekers` so that they follow the buffer. `controls` may also be given per instance. Bytes in
    `controls` outside a frame are Control events; everything else outside a frame is Junk, merged per run.
    """

    starts: frozenset[int] = frozenset()
    controls: frozenset[int] = frozenset()
    max_frame: int = 1024
    # add or xor: keep running values so that any range's sum or XOR costs O(1) (see prefix_of).
    prefix: Callable[[int, int], int] | None = None

    def __init__(self, controls: Iterable[int] | None = None) -> None:
        self._controls = self.controls if controls is None else frozenset(controls)
        self._buffer = bytearray()
        self._seekers: list[Seeker] = []
        self._prefix = array("Q", [0])
        self._interesting = _interesting(self.starts | self._controls)

    def feed(self, data: bytes) -> list[Event]:
        """Adds bytes from the line; returns every event now complete."""
        self._buffer += data
        if self.prefix is not None:
            self._prefix.extend(islice(accumulate(data, self.prefix, initial=self._prefix[-1]), 1, None))
        return self._scan(final=False)

    def flush(self) -> list[Event]:
        """The line went quiet: a partial frame is a false start, rescanned after its first byte."""
        return self._scan(final=True)

    def reset(self) -> None:
        """Forgets everything held: the next feed starts on a clean line."""
        self._consume(len(self._buffer))

    @property
    def pending(self) -> int:
        """Bytes held back as the start of a frame not yet complete."""
        return len(self._buffer)

    def prefix_of(self, start: int, end: int) -> int:
        """The running sum (masked by the caller) or XOR of buffer[start:end]."""
        if self.prefix is add:
            return self._prefix[end] - self._prefix[start]
        return self._prefix[end] ^ self._prefix[start]

    def _frame_size(self, position: int) -> int | None:
        """Size of the frame starting at `position`; 0 if none does, None if more bytes must decide."""
        raise NotImplementedError

    def _scan(self, *, final: bool) -> list[Event]:
        events: list[Event] = []
        buffer, end = self._buffer, len(self._buffer)
        starts, controls = self.starts, self._controls
        interesting = starts | controls
        junk_from = None
        position = 0
        while position < end:
            byte = buffer[position]
            size = self._frame_size(position) if byte in starts else 0
            if size is None:
                if not final:
                    break
                size = 0
            if size or byte in controls:
                if junk_from is not None:
                    events.append(Junk(bytes(buffer[junk_from:position])))
                    junk_from = None
                if size:
                    events.append(Frame(bytes(buffer[position : position + size])))
                else:
                    events.append(Control(byte))
                position += size or 1
                continue
            if junk_from is None:
                junk_from = position
            position += 1
            if position < end and buffer[position] not in interesting:
                # Skip the run of bytes that can neither start a frame nor be a control byte in one search.
                match = self._interesting.search(buffer, position)
                position = match.start() if match else end
        if junk_from is not None:
            events.append(Junk(bytes(buffer[junk_from:position])))
        self._consume(position)
        return events

    def _consume(self, count: int) -> None:
        if not count:
            return
        del self._buffer[:count]
        if self.prefix is not None:
            del self._prefix[:count]
        for seeker in self._seekers:
            seeker.shift(count)
        self._consumed(count)

    def _consumed(self, count: int) -> None:
        """Hook: the first `count` bytes left the buffer (for state a subclass keeps by position)."""


def _interesting(values: frozenset[int]) -> re.Pattern[bytes]:
    if not values:
        return re.compile(rb"(?!)")
    return re.compile(b"[" + b"".join(re.escape(bytes((value,))) for value in sorted(values)) + b"]")
