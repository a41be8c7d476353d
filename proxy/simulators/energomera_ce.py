"""A simulated Energomera CE meter: ping (0001), serial number (011A) and date/time (0120).

It answers requests addressed to it (the last digits of its serial) or to FFFF with the right
password; others, and packets with a bad CRC, get no answer, like the meter. Unknown commands get an
error-class reply with code 1, and the busy answer is code 2 (both the simulator's choice).
"""

from __future__ import annotations

from datetime import UTC, datetime

from proxy.protocols import ProtocolError
from proxy.protocols import energomera_ce as ce
from proxy.protocols.energomera_ce import Framer, Packet
from proxy.simulators.base import NO_FAULTS, Faults, SimulatedDevice, Write
from proxy.simulators.script import ScriptLike

SERIAL = "009218046950"
ADDRESS = 46950
BROADCAST = 0xFFFF
PING = 0x0001


def bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class CeMeter(SimulatedDevice):
    ERROR_CODES = range(0x100)

    def __init__(
        self, faults: Faults = NO_FAULTS, password: int = ce.DEFAULT_PASSWORD, *, script: ScriptLike | None = None
    ) -> None:
        super().__init__(faults, script=script)
        self.password = password

    def make_framer(self) -> Framer:
        return Framer()

    def answer(self, frame: bytes) -> list[Write]:
        request = self._accepted(frame)
        if request is None:
            return []
        if request.command == PING:
            return [self._reply(request, b"")]
        if request.command == ce.READ_SERIAL:
            part = request.data[0] if request.data else 0
            return [self._reply(request, SERIAL.encode()[part * 8 : part * 8 + 8])]
        if request.command == ce.READ_DATE_TIME:
            now = datetime.now(UTC)
            fields = (
                now.second,
                now.minute,
                now.hour,
                now.isoweekday() % 7,
                now.day,
                now.month,
                now.year % 100,
            )
            return [self._reply(request, bytes(bcd(v) for v in fields))]
        return [self._reply(request, b"\x01", ce.CLASS_ERROR)]

    def busy_answer(self, frame: bytes) -> list[Write]:
        request = self._accepted(frame)
        return [] if request is None else [self._reply(request, b"\x02", ce.CLASS_ERROR)]

    def request_command(self, frame: bytes) -> int:
        return ce.decode(frame, request=True).command

    def error_answer(self, frame: bytes, code: int | None) -> list[Write]:
        if code is None:
            return self.busy_answer(frame)
        request = self._accepted(frame)
        return [] if request is None else [self._reply(request, bytes((code,)), ce.CLASS_ERROR)]

    def corrupt_checksum(self, data: bytes) -> bytes:
        payload = ce.unescape(data[1:-1])
        wrong = next(crc for crc in (payload[-1] ^ 1, payload[-1] ^ 2) if crc not in (0xC0, 0xDB))
        return data[:1] + ce.escape(payload[:-1] + bytes((wrong,))) + data[-1:]

    def _accepted(self, frame: bytes) -> Packet | None:
        try:
            request = ce.decode(frame, request=True)
        except ProtocolError:
            return None
        if request.destination not in (ADDRESS, BROADCAST) or request.password != self.password:
            return None
        return request

    def _reply(self, request: Packet, data: bytes, service_class: int = ce.CLASS_NORMAL) -> Write:
        reply = Packet(request.source, ADDRESS, None, False, service_class, request.command, data)
        return Write(ce.build(reply))


# The simulated device of the protocol this module is named after (model_factory finds it).
DEVICE = CeMeter
