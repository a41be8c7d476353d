"""What every simulated device shares: its framer, its fault knobs, and the count of frames it has seen."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar

import attrs
import trio

from proxy.protocols import Event, Frame, Framer, ProtocolError

if TYPE_CHECKING:
    from proxy.simulators.script import Fault, ScriptLike, ScriptRun


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
    """Bytes the device sends; `answer` ones come after Faults.delay, the others at once.

    A scripted fault adds `delay` seconds before this write (and so before every later one), or drops
    the link once it is sent (`hangup`).
    """

    data: bytes
    answer: bool = True
    delay: float = 0.0
    hangup: bool = False


NO_FAULTS = Faults()


class SimulatedDevice:
    """A device's behaviour without I/O: bytes from the host in, the writes it makes in answer out.

    A subclass gives its framer (make_framer), its answer to each complete frame (answer), its NAK
    (nak, or None if the protocol has none), its busy answer (busy_answer), and may react to other
    messages (on_other). A frame the protocol cannot decode (a bad checksum, a field out of range) gets
    bad_frame(): the NAK where the protocol has one, else silence, as a device would answer it.

    Scripted faults (proxy.simulators.script): `script` is a FaultScript, a list of Fault, or a ScriptRun
    shared with other models of the same device. A subclass tells what a request's command is
    (request_command; COMMAND_TYPE is its type, None for none), its error answer with a code
    (error_answer; ERROR_CODES the codes it can carry), and how its answers' checksum is spoiled
    (corrupt_checksum).
    """

    COMMAND_TYPE: ClassVar[type | None] = int
    ERROR_CODES: ClassVar[range] = range(0x100)

    def __init__(self, faults: Faults = NO_FAULTS, *, script: ScriptLike | ScriptRun | None = None) -> None:
        from proxy.simulators.script import as_run

        self.faults = faults
        self.frames = 0
        self.script = as_run(script)
        self.clock = _now
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

    # Scripted faults.

    def request_command(self, frame: bytes) -> int | str | None:
        """The command a request frame carries (what a fault's match.command is compared with)."""
        return None

    def request_name(self, frame: bytes) -> str | None:
        """IEC 61107: a block's data name."""
        return None

    def request_payload(self, frame: bytes) -> str | None:
        """COGES: the payload."""
        return None

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        """The protocol's error answer to `frame` with `code`; its busy answer when code is None."""
        return self.busy_answer(frame)

    def corrupt_checksum(self, data: bytes) -> bytes:
        """`data`, an answer frame, with a checksum that does not match (the last byte here)."""
        return data[:-1] + bytes((data[-1] ^ 0xFF,))

    @classmethod
    def script_problem(cls, fault: Fault) -> str | None:
        """Why `fault` cannot apply to this protocol, or None."""
        if fault.command is not None:
            if cls.COMMAND_TYPE is None:
                return "key 'match.command': the protocol has no command codes (match bytes or payload)"
            if not isinstance(fault.command, cls.COMMAND_TYPE) or isinstance(fault.command, bool):
                kind = 'a string like "R1"' if cls.COMMAND_TYPE is str else "an integer like 0x13"
                return f"key 'match.command': {fault.command!r} is not {kind}"
        if fault.name is not None and cls.request_name is SimulatedDevice.request_name:
            return "key 'match.name': only IEC 61107 blocks have data names"
        if fault.payload is not None and cls.request_payload is SimulatedDevice.request_payload:
            return "key 'match.payload': only COGES requests have a text payload"
        if fault.action == "nak" and cls().nak() is None:
            return "action 'nak': the protocol has no NAK"
        if fault.code is not None and fault.code not in cls.ERROR_CODES:
            codes = cls.ERROR_CODES
            return f"key 'code': {fault.code} is out of the protocol's range {codes.start}..{codes.stop - 1}"
        return None

    def matches(self, fault: Fault, frame: bytes) -> bool:
        if fault.pattern is not None and fault.pattern not in frame:
            return False
        try:
            if fault.command is not None and self.request_command(frame) != fault.command:
                return False
            if fault.name is not None and self.request_name(frame) != fault.name:
                return False
            if fault.payload is not None and not (self.request_payload(frame) or "").startswith(fault.payload):
                return False
        except ProtocolError:
            return False
        return True

    @property
    def offline(self) -> bool:
        """True while a scripted offline spell lasts: the device answers nothing."""
        return self.script is not None and self.script.offline(self.clock())

    def scripted(self, frame: bytes) -> Fault | None:
        """The scripted fault that fires on `frame`, or None (every fault's match count goes on)."""
        if self.script is None or not self.script.script.faults:
            return None
        return self.script.fault_for([self.matches(fault, frame) for fault in self.script.script.faults])

    def faulty_answer(self, fault: Fault, frame: bytes) -> list[Write]:
        """The writes made in answer to `frame` when `fault` fires on it."""
        if fault.action == "nak":
            nak = self.nak()
            return [] if nak is None else [Write(nak, answer=False)]
        if fault.action == "error":
            return self.error_answer(frame, fault.code)
        if fault.action == "silence":
            return self.dropped(frame)
        if fault.action == "offline":
            assert self.script is not None
            self.script.go_offline(self.clock(), fault.seconds)
            return []
        writes = self.answer(frame)
        if fault.action == "delay" and fault.before == "ack":
            return [attrs.evolve(writes[0], delay=writes[0].delay + fault.seconds), *writes[1:]] if writes else []
        return self.shape(fault, writes)

    def shape(self, fault: Fault, writes: list[Write], start: int | None = None) -> list[Write]:
        """`writes` with `fault` (delay before the answer, corrupt, cut, drop) applied to the answer: the
        writes from `start` on (by default from the first `answer` one; before it, the ACK)."""
        if start is None:
            start = next((i for i, write in enumerate(writes) if write.answer), len(writes))
        head, tail = writes[:start], writes[start:]
        if not tail:
            return writes
        if fault.action == "delay":
            return [*head, attrs.evolve(tail[0], delay=tail[0].delay + fault.seconds), *tail[1:]]
        if fault.action == "corrupt":
            framed = [i for i, write in enumerate(tail) if len(write.data) > 1]
            if framed:
                tail[framed[-1]] = attrs.evolve(tail[framed[-1]], data=self.corrupt_checksum(tail[framed[-1]].data))
            return head + tail
        kept, left = [], fault.after
        for write in tail:
            if left <= 0:
                break
            kept.append(attrs.evolve(write, data=write.data[:left]))
            left -= len(write.data)
        if fault.action == "drop":
            kept.append(Write(b"", answer=(kept or tail)[-1].answer, hangup=True))
        return head + kept

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame has arrived and the rest is awaited."""
        return self._framer.pending > 0

    def _handle(self, events: list[Event]) -> list[Write]:
        writes: list[Write] = []
        for event in events:
            if self.offline:
                continue
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
        fault = self.scripted(frame)
        if fault is not None:
            return self.faulty_answer(fault, frame)
        faults, nak = self.faults, self.nak()
        if faults.nak_every and self.frames % faults.nak_every == 0 and nak is not None:
            return [Write(nak, answer=False)]
        if faults.busy:
            return self.busy_answer(frame)
        if faults.drop_every and self.frames % faults.drop_every == 0:
            return self.dropped(frame)
        return self.answer(frame)


def _now() -> float:
    """Trio's clock inside a trio run (a MockClock in tests), else the monotonic clock."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()
