"""A simulated COGES cashless device answering its ECS Programmer: each key press gets the display text.

The display text comes back in the same envelope, payload "000050" + the text (a guess: the real answer
format is not public). Digits are echoed as they are typed, ENT shows "OK", ESC clears; a price shows
"PRICE nnnn"; a manager code shows "MANAGER" when it is 9999 or 11112222, else "CODE ERROR".
"""

from __future__ import annotations

from proxy.protocols.coges import KEYS, Framer, build_frame, checksum, decode
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import ScriptLike

DISPLAY = "000050"
MANAGER_CODES = ("9999", "11112222")
# Digits a display holds; further digits scroll the oldest off, as a vending display does, so that the
# answer never outgrows the protocol's payload.
DISPLAY_DIGITS = 16
KEY_NAMES = {code: name for name, code in KEYS.items()}


class CogesDevice(SimulatedDevice):
    COMMAND_TYPE = None
    ERROR_CODES = range(10000)

    def __init__(self, faults: Faults = NO_FAULTS, *, script: ScriptLike | None = None) -> None:
        super().__init__(faults, script=script)
        self.entry = ""

    def make_framer(self) -> Framer:
        return Framer()

    def answer(self, frame: bytes) -> list[Write]:
        return [Write(build_frame(DISPLAY + self._display(decode(frame))))]

    def busy_answer(self, frame: bytes) -> list[Write]:
        return [Write(build_frame(DISPLAY + "BUSY"))]

    def request_payload(self, frame: bytes) -> str:
        return decode(frame)

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        """The display text "ERROR n" (the simulator's choice: COGES's answers are not public)."""
        return self.busy_answer(frame) if code is None else [Write(build_frame(f"{DISPLAY}ERROR {code}"))]

    def corrupt_checksum(self, data: bytes) -> bytes:
        payload = data[1:-3]
        return data[:-2] + f"{(checksum(payload) + 1) & 0xFF:02X}".encode()

    def _display(self, payload: str) -> str:
        if payload.startswith("00002") and len(payload) == 6:
            key = KEY_NAMES.get(payload[5], "?")
            if key.isdigit():
                self.entry = (self.entry + key)[-DISPLAY_DIGITS:]
                return self.entry
            if key == "ESC":
                self.entry = ""
                return ""
            if key == "ENT":
                self.entry = ""
                return "OK"
            return key
        if payload.startswith("000032"):
            return f"PRICE {int(payload[6:], 16):04d}"
        if payload.startswith(("000034", "000038")):
            return "MANAGER" if payload[6:] in MANAGER_CODES else "CODE ERROR"
        return "?"


# The simulated device of the protocol this module is named after (model_factory finds it).
DEVICE = CogesDevice
