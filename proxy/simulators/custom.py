"""A simulated Custom fiscal register: ACKs a good frame, NAKs a bad one, answers a few real commands.

Command codes and answers follow protocols.md 1.1 where it gives them (beep 13h, read parameter 04h with
its worked examples). protocols.md names no status command and no error codes for an unknown command or
a wrong password: the values marked "simulator's choice" below are ours, not the vendor's.
"""

from __future__ import annotations

import struct

from proxy.protocols import Event, Junk
from proxy.protocols.custom import (
    ACK,
    ERROR_PROTOCOL_BUSY,
    NAK,
    START,
    Framer,
    build_frame,
    decode,
    password_bytes,
)
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import ScriptLike

BEEP = 0x13
READ_PARAMETER = 0x04
STATUS = 0x01  # simulator's choice: protocols.md does not give the status command's code
OPERATOR = 99
ERROR_INVALID_LENGTH = 3502
ERROR_UNKNOWN_COMMAND = 100  # simulator's choice
ERROR_WRONG_PASSWORD = 101  # simulator's choice
ERROR_UNKNOWN_PARAMETER = 102  # simulator's choice
VAT_FAMILY = 16
# Parameter family 16 (VAT): the worked example's first bytes, the rest the simulator's choice.
VAT_PARAMETER = bytes.fromhex("08 07 e8 03 00 00 d0 07 00 00 00 00")
STATUS_DATA = bytes.fromhex("00 01")  # simulator's choice: mode 0 (shift closed), paper present


class CustomRegister(SimulatedDevice):
    """The register's behaviour without I/O: an ACK at once for a good frame, then its response."""

    ERROR_CODES = range(0x10000)

    def __init__(self, faults: Faults = NO_FAULTS, password: int = 999999, *, script: ScriptLike | None = None) -> None:
        super().__init__(faults, script=script)
        self._password = password_bytes(password)

    def make_framer(self) -> Framer:
        return Framer(from_device=False)

    def nak(self) -> bytes:
        return bytes((NAK,))

    def on_other(self, event: Event) -> list[Write]:
        # A frame whose checksum or length is wrong: the register NAKs it.
        if isinstance(event, Junk) and event.raw[0] == START:
            return [Write(bytes((NAK,)), answer=False)]
        return []

    def answer(self, frame: bytes) -> list[Write]:
        return [Write(bytes((ACK,)), answer=False), Write(self.respond(frame))]

    def busy_answer(self, frame: bytes) -> list[Write]:
        return [Write(bytes((ACK,)), answer=False), Write(self._error(frame[3], ERROR_PROTOCOL_BUSY))]

    def request_command(self, frame: bytes) -> int:
        return decode(frame).command

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        if code is None:
            return self.busy_answer(frame)
        return [Write(bytes((ACK,)), answer=False), Write(self._error(decode(frame).command, code))]

    def respond(self, frame: bytes) -> bytes:
        """The response frame to one well-formed request frame."""
        request = decode(frame)
        command, data = request.command, request.data
        if command not in (BEEP, READ_PARAMETER, STATUS):
            return self._error(command, ERROR_UNKNOWN_COMMAND)
        if len(data) < 4:
            return self._error(command, ERROR_INVALID_LENGTH)
        if data[:4] != self._password:
            return self._error(command, ERROR_WRONG_PASSWORD)
        if command == BEEP:
            return self._ok(command)
        if command == STATUS:
            return self._ok(command, STATUS_DATA)
        if len(data) != 6:
            return self._error(command, ERROR_INVALID_LENGTH)
        family = struct.unpack_from("<H", data, 4)[0]
        if family != VAT_FAMILY:
            return self._error(command, ERROR_UNKNOWN_PARAMETER)
        return self._ok(command, VAT_PARAMETER)

    def _ok(self, command: int, data: bytes = b"") -> bytes:
        return build_frame(command, struct.pack("<HB", 0, OPERATOR) + data)

    def _error(self, command: int, error: int) -> bytes:
        return build_frame(command, struct.pack("<H", error))


# The simulated device of the protocol this module is named after (model_factory finds it).
DEVICE = CustomRegister
