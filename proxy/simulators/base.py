"""What every simulated device shares: its framer, its fault knobs, and the count of frames it has seen."""

from __future__ import annotations

import attrs

from proxy.protocols import Event, Frame, Framer, ProtocolError


@attrs.frozen
class Faults:
    """Fault knobs, for testing clients and the proxy against a misbehaving device.

    delay: seconds before each answer (an ACK still comes at once); nak_every: every Nth frame is
    NAKed instead of executed; drop_every: every Nth answer is never sent (the ACK still is); busy:
    every command gets the protocol's busy error; reaction_time: the least time before any answer, as
    IEC 62056-21 gives a meter (None: the protocol's own, 0.2 s for IEC 61107 and none for the rest).
    """

    delay: float = 0.0
    nak_every: int = 0
    drop_every: int = 0
    busy: bool = False
    reaction_time: float | None = None


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
    messages (on_other). A frame the protocol cannot decode (a bad checksum, a field out of range) gets
    bad_frame(): the NAK where the protocol has one, else silence, as a device would answer it.
    """

    def __init__(self, faults: Faults = NO_FAULTS) -> None:
        self.faults = faults
        self.frames = 0
        self._framer = self.make_framer()

    @property
    def answer_delay(self) -> float:
        """Seconds before each answer (an ACK still comes at once)."""
        return self.faults.delay

    def make_framer(self) -> Framer:
        raise NotImplementedError

    def sent(self, write: Write) -> None:
        """Hook: `write` has just gone out (a delayed answer is no longer in preparation)."""

    def answer(self, frame: bytes) -> list[Write]:
        raise NotImplementedError

    def nak(self) -> bytes | None:
        return None

    def dropped(self, frame: bytes) -> list[Write]:
        """The writes that still go out when Faults.drop_every drops the answer to `frame` (the ACK).

        A protocol whose answer comes later, from on_other (ATOL v2's, after the host's EOT), forgets it
        here so that it never comes.
        """
        return [write for write in self.answer(frame) if not write.answer]

    def busy_answer(self, frame: bytes) -> list[Write]:
        return []

    def on_other(self, event: Event) -> list[Write]:
        """A message that is not a frame (a control byte, junk)."""
        return []

    def bad_frame(self, frame: bytes, problem: ProtocolError) -> list[Write]:
        """A frame whose boundaries are right but whose contents are not (checksum, fields)."""
        nak = self.nak()
        return [] if nak is None else [Write(nak, answer=False)]

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
            try:
                writes += self._answer_frame(event.raw)
            except ProtocolError as problem:
                writes += self.bad_frame(event.raw, problem)
        return writes

    def _answer_frame(self, frame: bytes) -> list[Write]:
        faults, nak = self.faults, self.nak()
        if faults.nak_every and self.frames % faults.nak_every == 0 and nak is not None:
            return [Write(nak, answer=False)]
        if faults.busy:
            return self.busy_answer(frame)
        if faults.drop_every and self.frames % faults.drop_every == 0:
            return self.dropped(frame)
        return self.answer(frame)
