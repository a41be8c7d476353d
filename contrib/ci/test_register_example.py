"""An example of a POS program's test against a simulated register, with devproxy's pytest plugin.

The `simulated_device` fixture comes with devproxy (installing it is enough). Each call starts a device
on a new pseudo-terminal; `register.path` is the port the POS opens, as it would /dev/ttyUSB0. Here the
"POS driver" is a few lines of os calls; a real test drives the POS's own code. When a test fails, the
register's exchanges are printed with the failure.
"""

from __future__ import annotations

import os
import select

from proxy.testing import Faults

BEEP = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")  # Custom: beep, password 999999
BEEP_ANSWER = bytes.fromhex("01 04 00 13 00 00 63 7A")
ACK, NAK = b"\x06", b"\x15"


def beep(port: str, tries: int = 3) -> bytes:
    """A tiny POS driver: sends the beep, resends it on a NAK; the answer frame."""
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    try:
        for _ in range(tries):
            os.write(fd, BEEP)
            if read(fd, 1) == ACK:
                return read(fd, len(BEEP_ANSWER))
        raise RuntimeError(f"NAKed {tries} times")
    finally:
        os.close(fd)


def read(fd: int, count: int) -> bytes:
    data = b""
    while len(data) < count:
        if not select.select([fd], [], [], 10)[0]:
            raise TimeoutError(f"{len(data)} of {count} bytes")
        data += os.read(fd, count - len(data))
    return data


def test_beep(simulated_device):
    register = simulated_device("custom")
    assert beep(str(register.path)) == BEEP_ANSWER
    assert [exchange.request for exchange in register.exchanges] == [BEEP]


def test_the_driver_resends_a_naked_frame(simulated_device):
    register = simulated_device("custom", faults=Faults(nak_every=2))
    assert beep(str(register.path)) == BEEP_ANSWER  # the first frame is the register's first: answered
    assert beep(str(register.path)) == BEEP_ANSWER  # the second is NAKed, its resend answered
    assert [exchange.answer[:1] for exchange in register.exchanges] == [ACK, NAK, ACK]
