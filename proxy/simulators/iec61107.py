"""A simulated IEC 61107 meter (mode C, Energomera CE301-like): sign-on, option select, password, R1 reads.

Sign-on /?! (or /?ADDRESS!) gets the identification /EKT5CE301v12; option select ACK 0 5 1 opens
programming mode with P0 (a fixed seed); P1 with the password (777777) gets ACK, a wrong one NAK; R1
NAME() gets STX NAME(value) ETX; unknown names (ERR12, the simulator's choice); B0 ends the session.
Option select ACK 0 5 0 gets the readout. Blocks use the XOR BCC; the busy answer is (ERR19). Every
answer waits the meter's reaction time: 200 ms by default, as IEC 62056-21 gives a meter whose
manufacturer's third letter is upper case (EKT).
"""

from __future__ import annotations

from proxy.protocols import Event
from proxy.protocols.iec61107 import (
    ACK,
    BREAK,
    BUSY,
    NAK,
    SOH,
    Framer,
    bcc_sum,
    bcc_xor,
    block_data,
    command,
    data_block,
)
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import ScriptLike

IDENTIFICATION = b"/EKT5CE301v12\r\n"
ADDRESS = "046950"
PASSWORD = "777777"
VALUES = {
    "VOLTA": "230.12",
    "CURRE": "1.250",
    "POWEP": "0.287",
    "ET0PE": "12345.67",
    "SNUMB": "009218046950",
}


# IEC 62056-21: a meter answers no sooner than 200 ms (20 ms when its manufacturer's third letter is lower case).
REACTION_TIME = 0.2


class IecMeter(SimulatedDevice):
    COMMAND_TYPE = str
    ERROR_CODES = range(100)

    def __init__(self, faults: Faults = NO_FAULTS, *, script: ScriptLike | None = None) -> None:
        super().__init__(faults, script=script)
        self.session = False
        self.authorised = False

    @property
    def answer_delay(self) -> float:
        reaction = REACTION_TIME if self.faults.reaction_time is None else self.faults.reaction_time
        return max(self.faults.delay, reaction)

    def make_framer(self) -> Framer:
        return Framer(from_host=True)

    def nak(self) -> bytes:
        return bytes((NAK,))

    def on_other(self, event: Event) -> list[Write]:
        return []

    def answer(self, frame: bytes) -> list[Write]:
        if frame.startswith(b"/?"):
            address = frame[2:-3].decode("ascii", "replace")
            if "(" in address or address not in ("", ADDRESS):
                return []  # a broadcast, or another meter's address
            self.session, self.authorised = True, False
            return [Write(IDENTIFICATION)]
        if not self.session:
            return []
        if frame[0] == ACK:
            mode = frame[3:4]
            if mode == b"1":
                return [Write(command("P0", "(12345678)"))]
            readout = "".join(f"{name}({value})\r\n" for name, value in VALUES.items()) + "!\r\n"
            self.session = False
            return [Write(data_block(readout))]
        if frame[:4] == BREAK:
            self.session = self.authorised = False
            return []
        if frame[0] == SOH and frame[1:3] == b"P1":
            self.authorised = block_data(frame).endswith(f"({PASSWORD})")
            return [Write(bytes((ACK if self.authorised else NAK,)))]
        if frame[0] == SOH and frame[1:3] == b"R1":
            name = block_data(frame)[3:].split("(")[0]
            value = VALUES.get(name)
            return [Write(data_block(f"{name}({value})" if value is not None else "(ERR12)"))]
        return [Write(bytes((NAK,)))]

    def request_command(self, frame: bytes) -> str | None:
        """The command: "/?" for a sign-on, "ACK" for an option select, else a block's code ("R1", "P1", "B0")."""
        if frame.startswith(b"/?"):
            return "/?"
        if frame[0] == ACK:
            return "ACK"
        if frame[0] == SOH:
            return frame[1:3].decode("ascii", "replace")
        return None

    def request_name(self, frame: bytes) -> str | None:
        """The data name of a command block: VOLTA in R1 STX VOLTA() ETX."""
        if frame[0] != SOH or b"\x02" not in frame:
            return None
        return frame.split(b"\x02", 1)[1].split(b"(")[0].rstrip(b"\x03").decode("ascii", "replace")

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        return [Write(data_block(f"({BUSY})" if code is None else f"(ERR{code:02d})"))]

    def corrupt_checksum(self, data: bytes) -> bytes:
        if data[:1] not in (bytes((SOH,)), b"\x02"):
            return data  # the identification has no BCC
        good = (bcc_xor(data[1:-1]), bcc_sum(data[1:-1]))
        return data[:-1] + bytes((next(bcc for bcc in range(0x80) if bcc not in good),))

    def busy_answer(self, frame: bytes) -> list[Write]:
        return [Write(data_block(f"({BUSY})"))]


# The simulated device of the protocol this module is named after (model_factory finds it).
DEVICE = IecMeter
