"""A simulated Italian DLE STX cash register (protocols.md 2): keyboard messages ('A') are ACKed.

It ignores frames for another node, ACKs a repeated NUM again without acting twice, answers other
message codes with a frame of its own (code 'R', the request's data echoed: the simulator's choice),
and NAKs a frame that is cut short. Its busy answer is a frame with code 'B' (also a choice).
"""

from __future__ import annotations

import attrs

from proxy.protocols import Event, Junk
from proxy.protocols.dle import ACK, DLE, KEYBOARD, NAK, Framer, build_frame, decode
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import Fault, ScriptLike

NODE = 1


class DleRegister(SimulatedDevice):
    COMMAND_TYPE = (int, str)

    def __init__(self, faults: Faults = NO_FAULTS, node: int = NODE, *, script: ScriptLike | None = None) -> None:
        super().__init__(faults, script=script)
        self.node = node
        self.keys: list[int] = []
        self._last_num: int | None = None

    def make_framer(self) -> Framer:
        return Framer()

    def nak(self) -> bytes:
        return bytes((NAK,))

    def on_other(self, event: Event) -> list[Write]:
        if isinstance(event, Junk) and event.raw[:2] == bytes((DLE, 0x02)):
            return [Write(bytes((NAK,)), answer=False)]
        return []

    def answer(self, frame: bytes) -> list[Write]:
        message = decode(frame)
        if message.node != self.node:
            return []
        repeated, self._last_num = message.num == self._last_num, message.num
        if message.code == KEYBOARD:
            if not repeated:
                self.keys += list(message.data)
            return [Write(bytes((ACK,)))]
        return [Write(build_frame(message.num, self.node, ord("R"), message.data))]

    def request_command(self, frame: bytes) -> int:
        return decode(frame).code

    def matches(self, fault: Fault, frame: bytes) -> bool:
        if isinstance(fault.command, str):  # a message code given as its letter: "A"
            fault = attrs.evolve(fault, command=ord(fault.command))
        return super().matches(fault, frame)

    @classmethod
    def script_problem(cls, fault: Fault) -> str | None:
        if isinstance(fault.command, str) and len(fault.command) != 1:
            return f"key 'match.command': {fault.command!r} is not a message code (one letter, or an integer)"
        return super().script_problem(fault)

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        """A frame with message code `code` (DLE STX has no error codes; 'B', the busy answer's, by default)."""
        if code is None:
            return self.busy_answer(frame)
        message = decode(frame)
        return [Write(build_frame(message.num, self.node, code))]

    def busy_answer(self, frame: bytes) -> list[Write]:
        message = decode(frame)
        return [Write(build_frame(message.num, self.node, ord("B")))]


# The simulated device of the protocol this module is named after (model_factory finds it).
DEVICE = DleRegister
