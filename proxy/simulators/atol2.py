"""A simulated ATOL v2 register: the ENQ/ACK/EOT choreography, answering each command with 'U', error 0.

The host's ENQ is ACKed, its frame ACKed, and after its EOT the device sends ENQ; once the host ACKs,
the answer frame follows, and after the host's ACK of that, EOT. The busy answer is error 0x0F in the
answer frame (the simulator's choice). The device's ENQ starts the answer: --delay holds it back,
and a dropped answer (--drop-every) is an EOT that gets no ENQ at all.
"""

from __future__ import annotations

from proxy.protocols import Control, Event
from proxy.protocols.atol2 import ACK, ENQ, EOT, NAK, Framer, build_frame, decode
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import Fault, ScriptLike

ANSWER = ord("U")
ERROR_BUSY = 0x0F


class Atol2Register(SimulatedDevice):
    def __init__(self, faults: Faults = NO_FAULTS, *, script: ScriptLike | None = None) -> None:
        super().__init__(faults, script=script)
        self._answer: bytes | None = None
        self._later: Fault | None = None  # a scripted fault for the answer, which comes after the EOT
        self._stage = "idle"  # idle -> taking (after ENQ) -> ready (answer ENQ sent) -> sent (answer sent)

    def make_framer(self) -> Framer:
        return Framer()

    def nak(self) -> bytes:
        return bytes((NAK,))

    def on_other(self, event: Event) -> list[Write]:
        if not isinstance(event, Control):
            return []
        if event.byte == ENQ:
            self._stage = "taking"
            return [Write(bytes((ACK,)), answer=False)]
        if event.byte == EOT and self._answer is not None:
            self._stage = "ready"
            enq = [Write(bytes((ENQ,)))]
            if self._later is not None and self._later.action == "delay":
                enq, self._later = self.shape(self._later, enq), None
            return enq
        if event.byte == ACK and self._stage == "ready":
            self._stage = "sent"
            answer = [Write(build_frame(self._answer), answer=False)]
            if self._later is not None:
                answer, self._later = self.shape(self._later, answer, start=0), None
            return answer
        if event.byte == ACK and self._stage == "sent":
            self._stage, self._answer = "idle", None
            return [Write(bytes((EOT,)), answer=False)]
        if event.byte == NAK and self._stage == "sent":
            return [Write(build_frame(self._answer), answer=False)]
        return []

    def answer(self, frame: bytes) -> list[Write]:
        data = decode(frame)
        self._answer = bytes((ANSWER, 0)) + data[2:3]  # after the 2-byte password: the command
        return [Write(bytes((ACK,)), answer=False)]

    def request_command(self, frame: bytes) -> int | None:
        data = decode(frame)
        return data[2] if len(data) > 2 else None  # after the 2-byte password

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        writes = self.answer(frame)
        self._answer = bytes((ANSWER, ERROR_BUSY if code is None else code))
        return writes

    def faulty_answer(self, fault: Fault, frame: bytes) -> list[Write]:
        # The answer comes later (ENQ after the host's EOT, then the frame): its faults wait for it.
        self._later = None
        if fault.action in ("corrupt", "cut", "drop") or (fault.action == "delay" and fault.before == "answer"):
            writes = self.answer(frame)
            self._later = fault
            return writes
        return super().faulty_answer(fault, frame)

    def dropped(self, frame: bytes) -> list[Write]:
        # The frame is ACKed, but after the host's EOT no ENQ comes: the answer never does.
        writes = self.answer(frame)
        self._answer = None
        return writes

    def busy_answer(self, frame: bytes) -> list[Write]:
        self._answer = bytes((ANSWER, ERROR_BUSY))
        return [Write(bytes((ACK,)), answer=False)]


# The simulated device of the protocol this module is named after (model_factory finds it).
DEVICE = Atol2Register
