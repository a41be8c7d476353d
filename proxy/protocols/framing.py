"""The scanning loop every framer shares: frames where the protocol finds them, control bytes, junk."""

from __future__ import annotations

from collections.abc import Iterable

from proxy.protocols import Control, Event, Frame, Junk


class ScanningFramer:
    """Scans a byte buffer left to right, asking the protocol at each frame-start byte how long the frame is.

    A subclass sets `starts` (the bytes a frame can begin with) and `controls`, and implements
    _frame_size(); `controls` may also be given per instance. Bytes in `controls` outside a frame are
    Control events; everything else outside a frame is Junk, merged per
    run. Consumed bytes leave the buffer, so it holds at most one partial frame after a feed(); frames
    are bounded by each protocol's maximum, which bounds the rescanning of a partial frame too.
    """

    starts: frozenset[int] = frozenset()
    controls: frozenset[int] = frozenset()

    def __init__(self, controls: Iterable[int] | None = None) -> None:
        self._controls = self.controls if controls is None else frozenset(controls)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        """Adds bytes from the line; returns every event now complete."""
        self._buffer += data
        self._added(data)
        return self._scan(final=False)

    def flush(self) -> list[Event]:
        """The line went quiet: a partial frame is a false start, rescanned after its first byte."""
        return self._scan(final=True)

    @property
    def pending(self) -> int:
        """Bytes held back as the start of a frame not yet complete."""
        return len(self._buffer)

    def _added(self, data: bytes) -> None:
        """Hook: `data` was appended to the buffer."""

    def _consumed(self, count: int) -> None:
        """Hook: the first `count` bytes left the buffer."""

    def _frame_size(self, position: int) -> int | None:
        """Size of the frame starting at `position`; 0 if none does, None if more bytes must decide."""
        raise NotImplementedError

    def _scan(self, *, final: bool) -> list[Event]:
        events: list[Event] = []
        buffer, end = self._buffer, len(self._buffer)
        junk_from = None
        position = 0
        while position < end:
            byte = buffer[position]
            size = self._frame_size(position) if byte in self.starts else 0
            if size is None:
                if not final:
                    break
                size = 0
            if size or byte in self._controls:
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
        if junk_from is not None:
            events.append(Junk(bytes(buffer[junk_from:position])))
        del buffer[:position]
        self._consumed(position)
        return events
