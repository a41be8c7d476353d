"""A simulated Shtrih-M register: what drivers send when they connect, answered as the vendor lays it out.

It answers ENQ with NAK when idle, with ACK while it prepares an answer (a command with --delay), and
with ACK and the pending answer when one waits for the host's ACK (after a host NAK, say). A command
frame gets ACK, then its response. It knows short status (10h, the vendor's 16-byte answer) and device
type (FCh), and the vendor's default passwords: cashier 1 and administrator 30. Error codes other than 0
(0x37 command not supported, 0x4F wrong password, 0x50 still printing, used as the busy error) and the
status values are the simulator's choice; protocols.md lists none.
"""

from __future__ import annotations

import struct

from proxy.protocols import Control, Event, Junk
from proxy.protocols.shtrih import ACK, ENQ, NAK, SHORT_STATUS, STX, Framer, build_frame, decode
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import Fault, ScriptLike

DEVICE_TYPE = 0xFC
# The vendor's defaults: the password is the operator's (1 cashier ... 30 administrator).
PASSWORDS = {1: 1, 30: 30}
ERROR_UNSUPPORTED = 0x37
ERROR_WRONG_PASSWORD = 0x4F
ERROR_PRINTING = 0x50
# FCh: device type 0, subtype 0, protocol 1.0, model 0, language 0 (Russian), and the name in WIN1251
# (the model number and name are the simulator's choice).
DEVICE_METRICS = bytes((0, 0, 1, 0, 0, 0)) + "ШТРИХ-ЛАЙТ-01Ф".encode("cp1251")


def short_status(operator: int) -> bytes:
    """The 10h answer's data after its error code: operator, flags (2), mode, submode, receipt operations
    (low), battery and supply voltage, fiscal memory and EKLZ errors, receipt operations (high), 3 reserved."""
    flags = 0x0002  # paper present in the receipt station (simulated)
    mode, submode, battery, supply = 4, 0, 0x8C, 0xB4  # shift closed, paper present (simulated)
    return struct.pack("<BHBBBBBBBB", operator, flags, mode, submode, 0, battery, supply, 0, 0, 0) + bytes(3)


class ShtrihRegister(SimulatedDevice):
    """Keeps its last response until the host ACKs it, and sends it again on ENQ after a host NAK."""

    def __init__(self, faults: Faults = NO_FAULTS, *, script: ScriptLike | None = None) -> None:
        super().__init__(faults, script=script)
        self._pending: bytes | None = None
        self._preparing = False

    def make_framer(self) -> Framer:
        return Framer()

    def nak(self) -> bytes:
        return bytes((NAK,))

    def on_other(self, event: Event) -> list[Write]:
        if isinstance(event, Control) and event.byte == ENQ:
            if self._preparing:
                return [Write(bytes((ACK,)), answer=False)]  # the answer is on its way
            if self._pending is None:
                return [Write(bytes((NAK,)), answer=False)]
            return [Write(bytes((ACK,)), answer=False), Write(self._pending, answer=False)]
        if isinstance(event, Control) and event.byte == ACK:
            self._pending = None
        if isinstance(event, Junk) and event.raw[0] == STX:
            return [Write(bytes((NAK,)), answer=False)]
        return []

    def answer(self, frame: bytes) -> list[Write]:
        command, data = decode(frame)
        self._pending = self._respond(command, data)
        self._preparing = self.answer_delay > 0
        return [Write(bytes((ACK,)), answer=False), Write(self._pending)]

    def sent(self, write: Write) -> None:
        if write.answer:
            self._preparing = False

    def busy_answer(self, frame: bytes) -> list[Write]:
        command, _ = decode(frame)
        return [Write(bytes((ACK,)), answer=False), Write(build_frame(command, bytes((ERROR_PRINTING,))))]

    def request_command(self, frame: bytes) -> int:
        return decode(frame)[0]

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        command, _ = decode(frame)
        self._pending = build_frame(command, bytes((ERROR_PRINTING if code is None else code,)))
        return [Write(bytes((ACK,)), answer=False), Write(self._pending)]

    def shape(self, fault: Fault, writes: list[Write], start: int | None = None) -> list[Write]:
        writes = super().shape(fault, writes, start)
        if any(write.answer and write.delay for write in writes):
            self._preparing = True  # an ENQ meanwhile gets ACK: the answer is on its way
        return writes

    def _respond(self, command: int, data: bytes) -> bytes:
        if command == DEVICE_TYPE:
            return build_frame(command, bytes((0,)) + DEVICE_METRICS)
        if command != SHORT_STATUS:
            return build_frame(command, bytes((ERROR_UNSUPPORTED,)))
        operator = PASSWORDS.get(struct.unpack("<I", data)[0]) if len(data) == 4 else None
        if operator is None:
            return build_frame(command, bytes((ERROR_WRONG_PASSWORD,)))
        return build_frame(command, bytes((0,)) + short_status(operator))


# The simulated device of the protocol this module is named after (model_factory finds it).
DEVICE = ShtrihRegister
