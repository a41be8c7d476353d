"""What every simulated device shares: its framer, its fault knobs, and the count of frames it has seen."""

from __future__ import annotations

import attrs

from proxy.protocols import Event, Frame, Framer


@attrs.frozen
class Faults:
    """Fault knobs, for testing clients and the proxy against a misbehaving device.

    delay: seconds before each answer (an ACK still comes at once); nak_every: every Nth frame is
    NAKed instead of executed; drop_every: every Nth answer is never sent (the ACK still is); busy:
    every command gets the protocol's busy error.
    """

    delay: float = 0.0
    nak_every: int = 0
    drop_every: int = 0
    busy: bool = False


@attrs.frozen
class Write:
    """Bytes the device sends; `answer` ones come after Faults.delay, the others at once."""

    data: bytes
    answer: bool = True


NO_FAULTS = Faults()


class SimulatedDevice:
    """A device's behaviour without I/O: bytes from the host in, the writes it makes in answer out.

    A subclass gives its framer (make_framer), its answer to each complete frame (answer), its NAK
    (nak, or None if the protocol has none), its busy answer (busy_answer), and may react to other
    messages (on_other).
    """

    def __init__(self, faults: Faults = NO_FAULTS) -> None:
        self.faults = faults
        self.frames = 0
        self._framer = self.make_framer()

    def make_framer(self) -> Framer:
        raise NotImplementedError

    def answer(self, frame: bytes) -> list[Write]:
        raise NotImplementedError

    def nak(self) -> bytes | None:
        return None

    def busy_answer(self, frame: bytes) -> list[Write]:
        return []

    def on_other(self, event: Event) -> list[Write]:
        """A message that is not a frame (a control byte, junk)."""
        return []

    def feed(self, data: bytes) -> list[Write]:
        """Bytes from the host -> the writes the device makes in answer, in order."""
        return self._handle(self._framer.feed(data))

    def line_idle(self) -> list[Write]:
        """The host went quiet mid-frame: the partial frame is abandoned."""
        return self._handle(self._framer.flush())

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame has arrived and the rest is awaited."""
        return self._framer.pending > 0

    def _handle(self, events: list[Event]) -> list[Write]:
        writes: list[Write] = []
        for event in events:
            if not isinstance(event, Frame):
                writes += self.on_other(event)
                continue
            self.frames += 1
            faults, nak = self.faults, self.nak()
            if faults.nak_every and self.frames % faults.nak_every == 0 and nak is not None:
                writes.append(Write(nak, answer=False))
            elif faults.busy:
                writes += self.busy_answer(event.raw)
            elif faults.drop_every and self.frames % faults.drop_every == 0:
                writes += [write for write in self.answer(event.raw) if not write.answer]
            else:
                writes += self.answer(event.raw)
        return writes
