"""A simulated ATOL v3 register with a task buffer: results at once, or asynchronously with ID F0.

C1 ADD runs the task: with the async flag the reply is A1 (pending) and the result (A6) follows in an
asynchronous packet; otherwise the reply is the result itself (A3). C3 REQ returns a task's result, C2
acknowledges it (answered A1 here: the simulator's choice), C4 clears the buffer (A5). A task's result
is 'U' (55), error 0, and the task's command code. The busy answer is A4 with ATOL's error 601.
"""

from __future__ import annotations

from proxy.protocols.atol3 import (
    ABORT,
    ACK_ADD,
    ACK_RESULT,
    ADD,
    ASYNC_FLAG,
    ASYNC_ID,
    PENDING,
    REQUEST,
    Framer,
    build_packet,
    crc8,
    decode,
    escape,
)
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import ScriptLike

RESULT, ERROR, STOPPED, ASYNC_RESULT, NOT_FOUND = 0xA3, 0xA4, 0xA5, 0xA6, 0xB3
BUSY_ERROR = (601).to_bytes(2, "little")


class Atol3Register(SimulatedDevice):
    ERROR_CODES = range(0x10000)

    def __init__(self, faults: Faults = NO_FAULTS, *, script: ScriptLike | None = None) -> None:
        super().__init__(faults, script=script)
        self._results: dict[int, bytes] = {}

    def make_framer(self) -> Framer:
        return Framer()

    def answer(self, frame: bytes) -> list[Write]:
        packet_id, data = decode(frame)
        if not data:
            return []
        command = data[0]
        if command in (ADD, ACK_ADD) and len(data) >= 3:
            flags, task_id, task = data[1], data[2], data[3:]
            result = b"U\x00" + task[2:3]
            self._results[task_id] = result
            if flags & ASYNC_FLAG:
                return [
                    Write(build_packet(packet_id, bytes((PENDING,))), answer=False),
                    Write(build_packet(ASYNC_ID, bytes((ASYNC_RESULT, task_id)) + result)),
                ]
            return [Write(build_packet(packet_id, bytes((RESULT, task_id)) + result))]
        if command == REQUEST and len(data) >= 2:
            result = self._results.get(data[1])
            if result is None:
                return [Write(build_packet(packet_id, bytes((NOT_FOUND,))))]
            return [Write(build_packet(packet_id, bytes((RESULT, data[1])) + result))]
        if command == ACK_RESULT:
            self._results.pop(data[1] if len(data) > 1 else -1, None)
            return [Write(build_packet(packet_id, bytes((PENDING,))))]
        if command == ABORT:
            self._results.clear()
            return [Write(build_packet(packet_id, bytes((STOPPED,))))]
        return [Write(build_packet(packet_id, bytes((ERROR,))))]

    def request_command(self, frame: bytes) -> int | None:
        """The task's command code in an ADD (after its 2-byte password), else the buffer command (C3, C4)."""
        _, data = decode(frame)
        if data[:1] in (bytes((ADD,)), bytes((ACK_ADD,))) and len(data) > 5:
            return data[5]
        return data[0] if data else None

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        if code is None:
            return self.busy_answer(frame)
        packet_id, data = decode(frame)
        task_id = data[2] if len(data) > 2 else 0
        return [Write(build_packet(packet_id, bytes((ERROR, task_id)) + code.to_bytes(2, "little")))]

    def corrupt_checksum(self, data: bytes) -> bytes:
        packet_id, payload = decode(data)
        header = build_packet(packet_id, payload)[:4]
        good = crc8(bytes((packet_id,)) + payload)
        return header + escape(payload + bytes((good ^ 0x01,)))

    def busy_answer(self, frame: bytes) -> list[Write]:
        packet_id, data = decode(frame)
        task_id = data[2] if len(data) > 2 else 0
        return [Write(build_packet(packet_id, bytes((ERROR, task_id)) + BUSY_ERROR))]


# The simulated device of the protocol this module is named after (model_factory finds it).
DEVICE = Atol3Register
