"""A simulated Shtrih-M register: NAK to ENQ when idle, ACK and a response to a frame, short status 10h.

The error codes other than 0 (0x37 command not supported, 0x50 still printing, used as the busy error)
are the simulator's choice; protocols.md lists none.
"""

from __future__ import annotations

import struct

from proxy.protocols import Control, Event, Junk
from proxy.protocols.shtrih import ACK, ENQ, NAK, SHORT_STATUS, STX, Framer, build_frame, decode
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write

OPERATOR = 30
ERROR_UNSUPPORTED = 0x37
ERROR_PRINTING = 0x50
PASSWORD = 30


class ShtrihRegister(SimulatedDevice):
    """Keeps its last response until the host ACKs it, and sends it again on ENQ after a host NAK."""

    def __init__(self, faults: Faults = NO_FAULTS) -> None:
        super().__init__(faults)
        self._pending: bytes | None = None

    def make_framer(self) -> Framer:
        return Framer()

    def nak(self) -> bytes:
        return bytes((NAK,))

    def on_other(self, event: Event) -> list[Write]:
        if isinstance(event, Control) and event.byte == ENQ:
            if self._pending is None:
                return [Write(bytes((NAK,)), answer=False)]
            return [Write(bytes((ACK,)), answer=False), Write(self._pending)]
        if isinstance(event, Control) and event.byte == ACK:
            self._pending = None
        if isinstance(event, Junk) and event.raw[0] == STX:
            return [Write(bytes((NAK,)), answer=False)]
        return []

    def answer(self, frame: bytes) -> list[Write]:
        command, data = decode(frame)
        self._pending = self._respond(command, data)
        return [Write(bytes((ACK,)), answer=False), Write(self._pending)]

    def busy_answer(self, frame: bytes) -> list[Write]:
        command, _ = decode(frame)
        return [Write(bytes((ACK,)), answer=False), Write(build_frame(command, bytes((ERROR_PRINTING,))))]

    def _respond(self, command: int, data: bytes) -> bytes:
        if command != SHORT_STATUS:
            return build_frame(command, bytes((ERROR_UNSUPPORTED,)))
        if len(data) != 4 or struct.unpack("<I", data)[0] != PASSWORD:
            return build_frame(command, bytes((0x4F,)))  # wrong password (simulator's choice)
        # error 0, operator, flags (2), mode, submode, receipt operations, battery, power (simulated)
        return build_frame(command, bytes((0, OPERATOR)) + bytes.fromhex("0200 04 00 00 00 8c"))


PROTOCOL = "shtrih"
DEVICE = ShtrihRegister
