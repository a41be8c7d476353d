"""A simulated Custom fiscal register: ACKs a good frame, NAKs a bad one, answers a few real commands.

Command codes and answers follow protocols.md 1.1 where it gives them (beep 13h, read parameter 04h with
its worked examples). protocols.md names no status command and no error codes for an unknown command or
a wrong password: the values marked "simulator's choice" below are ours, not the vendor's.
"""

from __future__ import annotations

import struct

from proxy.protocols import Frame, Junk
from proxy.protocols.custom import ACK, NAK, START, Framer, build_frame, decode, password_bytes

BEEP = 0x13
READ_PARAMETER = 0x04
STATUS = 0x01  # simulator's choice: protocols.md does not give the status command's code
OPERATOR = 99
ERROR_INVALID_LENGTH = 3502
ERROR_PROTOCOL_BUSY = 3503
ERROR_UNKNOWN_COMMAND = 100  # simulator's choice
ERROR_WRONG_PASSWORD = 101  # simulator's choice
ERROR_UNKNOWN_PARAMETER = 102  # simulator's choice
VAT_FAMILY = 16
# Parameter family 16 (VAT): the worked example's first bytes, the rest the simulator's choice.
VAT_PARAMETER = bytes.fromhex("08 07 e8 03 00 00 d0 07 00 00 00 00")
STATUS_DATA = bytes.fromhex("00 01")  # simulator's choice: mode 0 (shift closed), paper present


class CustomRegister:
    """The register's behaviour without I/O: feed() takes host bytes and returns what it answers.

    Each answer is a list of writes, the ACK apart from the response frame, as the real device sends
    the ACK before it executes the command.
    """

    def __init__(self, password: int = 999999) -> None:
        self._framer = Framer(from_device=False)
        self._password = password_bytes(password)

    def feed(self, data: bytes) -> list[bytes]:
        """Bytes from the host -> the writes the register makes in answer, in order."""
        return self._answer(self._framer.feed(data))

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame has arrived and the rest is awaited."""
        return self._framer.pending > 0

    def line_idle(self) -> list[bytes]:
        """The host went quiet: a partial frame is abandoned (NAKed if it started like a frame)."""
        return self._answer(self._framer.flush())

    def _answer(self, events: list) -> list[bytes]:
        writes: list[bytes] = []
        for event in events:
            if isinstance(event, Frame):
                writes.append(bytes((ACK,)))
                writes.append(self.respond(event.raw))
            elif isinstance(event, Junk) and event.raw[0] == START:
                writes.append(bytes((NAK,)))
        return writes

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
