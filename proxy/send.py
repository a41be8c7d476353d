"""`devproxy send`: one exchange with a device (or the proxy in front of it), in the device's protocol.

Each protocol has two functions: one builds the request from the command line, before any connection
(RequestError names what is missing and the choices), and one plays the host's part of the protocol's
choreography over a Conversation, which reports each step as a line for a person as it happens. Two
failures are told apart, because a script acts on them differently: the exchange failed on the way
(SendError: timeout, NAK, bad checksum, closed connection; try again or check the line), or it worked
and the device answered with an error of its own (DeviceError: busy, wrong password; retrying the
same request may not help), decoded where the protocol says how.
"""

from __future__ import annotations

import argparse
import re
import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import attrs
import trio

from proxy.config import Address
from proxy.protocols import (
    Control,
    Event,
    Frame,
    Framer,
    Junk,
    ProtocolError,
    atol2,
    atol3,
    coges,
    custom,
    dle,
    shtrih,
)
from proxy.protocols import energomera_ce as ce
from proxy.protocols import iec61107 as iec
from proxy.simulators.custom import BEEP, READ_PARAMETER, STATUS, VAT_FAMILY

CUSTOM_COMMANDS = {"beep": BEEP, "status": STATUS, "read-vat": READ_PARAMETER}
SHTRIH_COMMANDS = ("short-status",)
CE_COMMANDS = {"0120": "date and time", "011A": "serial number"}
# Energomera CE: address FFFF reaches whichever meter is on the line (protocols.md 4.2).
CE_BROADCAST = 0xFFFF
NAMES = {0x04: "EOT", 0x05: "ENQ", 0x06: "ACK", 0x15: "NAK"}
ATOL_BEEP = bytes.fromhex("00 00 47")  # password 0000, command 47h
# Password fields of Custom, Shtrih and Energomera CE are 4 bytes.
MAX_PASSWORD = 0xFFFFFFFF
# Error codes whose meaning a public description gives (protocols.md 1.1, 4.3); other codes are shown
# as numbers, since naming them would be a guess.
CUSTOM_ERRORS = {
    3502: "invalid command length",
    custom.ERROR_PROTOCOL_BUSY: "busy with another command",
    custom.ERROR_HELD_ELSEWHERE: "busy: another connection holds the register",
}
# ATOL v3 reply statuses that say a task failed: its own error, or the task buffer's (protocols.md 1.2).
ATOL3_FAILURES = {
    0xA4: "error",
    0xA7: "async error",
    0xB1: "buffer overflow",
    0xB2: "task already in the buffer",
    0xB3: "task not found",
    0xB4: "illegal value",
}
# ATOL's application answer (v2, and a v3 task's result): 'U', the error code, the data.
ATOL_ANSWER = ord("U")
IEC_ERRORS = {iec.BUSY: "busy: another port holds programming access"}
IEC_ERROR = re.compile(r"\((ERR\w*)\)")
# A timeout's message shows what came; an answer this long is cut to its end, where it stopped.
SHOWN_BYTES = 256

Decoded = TypeVar("Decoded")


class RequestError(Exception):
    """The command line makes no request of the protocol; the message names what is missing and the choices.

    Raised before connecting: a typo costs no connection to a device that others share.
    """


class SendError(Exception):
    """The exchange failed on the way: timeout, NAK, a bad checksum, a closed connection; the message says which."""


class DeviceError(Exception):
    """The device answered, with an error of its own (busy, wrong password...); the message decodes it."""


class Conversation:
    """The host's side of one connection: send bytes, and take the device's messages one by one.

    Every step is passed to `say` as a line the moment it happens, so that a person watching a slow
    device sees what was sent before the answer (or the timeout) comes.
    """

    def __init__(
        self, stream: trio.SocketStream, framer: Framer, answer_within: float, say: Callable[[str], None]
    ) -> None:
        self.stream = stream
        self.say = say
        self._framer = framer
        self._events: list[Event] = []
        self._received = bytearray()
        self._deadline = trio.current_time() + answer_within
        self._answer_within = answer_within

    async def send(self, data: bytes) -> None:
        self.say(f"sent {data.hex(' ')}")
        await self.stream.send_all(data)

    async def next(self) -> Event:
        """The device's next message; SendError, showing what came, on a timeout or a closed connection."""
        while not self._events:
            with trio.move_on_at(self._deadline):
                data = await self.stream.receive_some()
                if not data:
                    raise SendError(f"the connection closed before the answer was complete; {self._what_came()}")
                self._received += data
                self._events += self._framer.feed(data)
                continue
            raise SendError(f"no complete answer within {self._answer_within:g} s; {self._what_came()}")
        event = self._events.pop(0)
        if isinstance(event, Junk):
            self.say(f"junk {event.raw.hex(' ')}")
            return await self.next()
        return event

    def _what_came(self) -> str:
        """Every byte the device sent on this connection, in hex (the last SHOWN_BYTES of a long answer)."""
        if not self._received:
            return "received nothing"
        if len(self._received) <= SHOWN_BYTES:
            return f"received {self._received.hex(' ')}"
        return f"received {len(self._received)} bytes, ending ... {self._received[-SHOWN_BYTES:].hex(' ')}"

    async def reply(self, nak: str) -> Event:
        """The device's answer: a frame or a control byte (named in the lines); SendError with `nak` on NAK."""
        event = await self.next()
        if isinstance(event, Control) and event.byte == 0x15:
            raise SendError(nak)
        if isinstance(event, Control):
            self.say(NAMES.get(event.byte, f"{event.byte:02X}"))
        return event

    async def expect_control(self, byte: int, what: str) -> None:
        event = await self.next()
        if not isinstance(event, Control) or event.byte != byte:
            raise SendError(f"expected {NAMES[byte]} {what}, got {_describe(event)}")
        self.say(NAMES[byte])

    async def frame(self, what: str) -> bytes:
        event = await self.next()
        if isinstance(event, Control) and event.byte == 0x15:
            raise SendError(f"NAK {what}: the device rejected the frame (bad checksum or length)")
        if not isinstance(event, Frame):
            raise SendError(f"expected {what}, got {_describe(event)}")
        return event.raw


def _describe(event: Event) -> str:
    if isinstance(event, Control):
        return NAMES.get(event.byte, f"{event.byte:02X}")
    return event.raw.hex(" ")


def _decoded(decode: Callable[[bytes], Decoded], frame: bytes) -> Decoded:
    try:
        return decode(frame)
    except ProtocolError as exc:
        raise SendError(f"bad answer {frame.hex(' ')}: {exc}") from None


def _named(names: dict[Any, str], code: object) -> str:
    return f" ({names[code]})" if code in names else ""


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise RequestError(f"--hex {text!r} is not hex bytes (e.g. '01 05 00 13')") from None


def _password(args: argparse.Namespace, default: int) -> int:
    """--password, or the protocol's default; RequestError when it does not fit the 4-byte field."""
    if args.password is None:
        return default
    if not 0 <= args.password <= MAX_PASSWORD:
        raise RequestError(f"--password {args.password} does not fit the 4-byte field (0-{MAX_PASSWORD})")
    return args.password


# -- one function per protocol ----------------------------------------------------------------------


def _choices(names: Iterable[str]) -> str:
    *first, last = names
    return f"{', '.join(first)} or {last}" if first else last


def build_custom(args: argparse.Namespace) -> bytes:
    if args.hex:
        return _hex(args.hex)
    if args.command is None:
        raise RequestError(f"custom needs --command {_choices(CUSTOM_COMMANDS)} (or --hex BYTES)")
    if args.command not in CUSTOM_COMMANDS:
        raise RequestError(f"--command {args.command!r} is not one of {_choices(CUSTOM_COMMANDS)} (or --hex BYTES)")
    data = custom.password_bytes(_password(args, custom.DEFAULT_PASSWORD))
    if args.command == "read-vat":
        data += VAT_FAMILY.to_bytes(2, "little")
    return custom.build_frame(CUSTOM_COMMANDS[args.command], data)


async def play_custom(talk: Conversation, request: bytes, args: argparse.Namespace) -> None:
    await talk.send(request)
    event = await talk.reply("NAK: the device rejected the frame (bad checksum or length)")
    if isinstance(event, Control):
        event = await talk.next()
    if not isinstance(event, Frame):
        raise SendError(f"expected a response frame, got {_describe(event)}")
    message = _decoded(custom.decode, event.raw)
    try:
        error = message.error
    except ProtocolError as exc:
        raise SendError(f"bad answer {event.raw.hex(' ')}: {exc}") from None
    status = "OK" if error == 0 else f"error {error}"
    rest = message.data[2:].hex(" ") or "-"
    talk.say(f"response {event.raw.hex(' ')}: command {message.command:02X}h, {status}, data {rest}")
    if error:
        what = f"error {error}{_named(CUSTOM_ERRORS, error)}"
        raise DeviceError(f"the register answered {what} to command {message.command:02X}h")


def build_shtrih(args: argparse.Namespace) -> bytes:
    if args.hex:
        return _hex(args.hex)
    if args.command not in (None, *SHTRIH_COMMANDS):
        raise RequestError(f"--command {args.command!r} is not one of {_choices(SHTRIH_COMMANDS)} (or --hex BYTES)")
    password = _password(args, shtrih.DEFAULT_PASSWORD)
    return shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", password))


async def play_shtrih(talk: Conversation, request: bytes, args: argparse.Namespace) -> None:
    await talk.send(bytes((shtrih.ENQ,)))
    event = await talk.next()
    if isinstance(event, Control) and event.byte == shtrih.ACK:
        talk.say("ACK: an earlier answer was pending; reading it first")
        await talk.frame("the pending answer")
        await talk.send(bytes((shtrih.ACK,)))
    elif not (isinstance(event, Control) and event.byte == shtrih.NAK):
        raise SendError(f"expected NAK (ready) to ENQ, got {_describe(event)}")
    await talk.send(request)
    await talk.expect_control(shtrih.ACK, "after the frame")
    answer = await talk.frame("the response frame")
    await talk.send(bytes((shtrih.ACK,)))
    command, data = _decoded(shtrih.decode, answer)
    if not data:
        raise SendError(f"bad answer {answer.hex(' ')}: no error byte")
    status = "OK" if data[0] == 0 else f"error {data[0]:02X}h"
    talk.say(f"response {answer.hex(' ')}: command {command:02X}h, {status}, data {data[1:].hex(' ') or '-'}")
    if data[0]:
        raise DeviceError(f"the register answered error {data[0]:02X}h to command {command:02X}h")


def build_atol2(args: argparse.Namespace) -> bytes:
    return _hex(args.hex) if args.hex else atol2.build_frame(ATOL_BEEP)


async def play_atol2(talk: Conversation, request: bytes, args: argparse.Namespace) -> None:
    await talk.send(bytes((atol2.ENQ,)))
    await talk.expect_control(atol2.ACK, "to ENQ")
    await talk.send(request)
    await talk.expect_control(atol2.ACK, "to the frame")
    await talk.send(bytes((atol2.EOT,)))
    await talk.expect_control(atol2.ENQ, "(the answer is ready)")
    await talk.send(bytes((atol2.ACK,)))
    answer = await talk.frame("the answer frame")
    await talk.send(bytes((atol2.ACK,)))
    await talk.expect_control(atol2.EOT, "closing the exchange")
    data = _decoded(atol2.decode, answer)
    error = _atol_error(data)
    status = "" if error is None else "OK, " if error == 0 else f"error {error:02X}h, "
    talk.say(f"answer {answer.hex(' ')}: {status}data {data.hex(' ')}")
    if error:
        raise DeviceError(f"the register answered error {error:02X}h")


def _atol_error(answer: bytes) -> int | None:
    """The error code of ATOL's application answer ('U', error, data); None for an answer of another kind."""
    return answer[1] if answer[:1] == bytes((ATOL_ANSWER,)) and len(answer) > 1 else None


def build_atol3(args: argparse.Namespace) -> bytes:
    if not args.hex:
        # The default task: password 0000 and command 47h (beep), with "need result" set.
        return atol3.build_packet(1, bytes((atol3.ADD, 0x01, 1)) + ATOL_BEEP)
    request = _hex(args.hex)
    if len(request) < 4:
        # The reply is matched by the packet's ID, its fourth byte.
        raise RequestError(f"--hex {args.hex!r} is too short for an ATOL v3 packet (FE LEN0 LEN1 ID ...)")
    return request


async def play_atol3(talk: Conversation, request: bytes, args: argparse.Namespace) -> None:
    await talk.send(request)
    data = await _atol3_reply(talk, request[3])
    if data[:1] == bytes((atol3.PENDING,)) and args.hex is None:
        return
    if data[:1] == bytes((atol3.PENDING,)):
        data = await _atol3_reply(talk, atol3.ASYNC_ID)
    if data[:1] and data[0] in atol3.FINAL_RESULTS:
        task_id = data[1] if len(data) > 1 else 0
        ack = atol3.build_packet((request[3] + 1) % 0xE0, bytes((atol3.ACK_RESULT, task_id)))
        await talk.send(ack)
        await _atol3_reply(talk, ack[3])
    if data[:1] and data[0] in ATOL3_FAILURES:
        rest = data[1:].hex(" ") or "-"
        raise DeviceError(f"the register answered {data[0]:02X}h ({ATOL3_FAILURES[data[0]]}), data {rest}")
    error = _atol_error(data[2:]) if data[:1] and data[0] in atol3.FINAL_RESULTS else None
    if error:
        raise DeviceError(f"the task's result is error {error:02X}h")


async def _atol3_reply(talk: Conversation, packet_id: int) -> bytes:
    """The data of the next packet with `packet_id`; other packets are reported and skipped."""
    while True:
        packet = await talk.frame("a reply packet")
        reply_id, data = _decoded(atol3.decode, packet)
        talk.say(f"packet {packet.hex(' ')}: ID {reply_id:02X}, status {data[:1].hex().upper() or '-'}")
        if reply_id == packet_id:
            return data


def build_dle(args: argparse.Namespace) -> bytes:
    if args.hex:
        return _hex(args.hex)
    if not args.keys:
        raise RequestError("dle needs --keys with key codes, e.g. 1,2,75 (or --hex BYTES)")
    try:
        keys = bytes(int(key) for key in args.keys.split(","))
    except ValueError:
        raise RequestError(f"--keys {args.keys!r} must be key codes 0-255, e.g. 1,2,75") from None
    return dle.build_frame(args.num, args.id, dle.KEYBOARD, keys)


async def play_dle(talk: Conversation, request: bytes, args: argparse.Namespace) -> None:
    await talk.send(request)
    event = await talk.reply("NAK: the register rejected the message")
    if isinstance(event, Control):
        return
    message = _decoded(dle.decode, event.raw)
    talk.say(f"frame {event.raw.hex(' ')}: NUM {message.num}, ID {message.node}, COD {chr(message.code)!r}")


def build_coges(args: argparse.Namespace) -> list[bytes]:
    """One envelope per key, or the one envelope of a price or a manager code."""
    if args.hex:
        return [_hex(args.hex)]
    try:
        if args.keys:
            return [coges.build_frame(coges.key_payload(key)) for key in args.keys.split(",")]
        if args.price is not None:
            return [coges.build_frame(coges.price_payload(args.price))]
        if args.manager_code:
            return [coges.build_frame(coges.manager_code_payload(args.manager_code))]
    except ProtocolError as exc:
        raise RequestError(str(exc)) from None
    raise RequestError("coges needs --keys (e.g. ENT,2,9), --price N or --manager-code CODE (or --hex BYTES)")


async def play_coges(talk: Conversation, requests: list[bytes], args: argparse.Namespace) -> None:
    for request in requests:
        await talk.send(request)
        answer = await talk.frame("an answer envelope")
        payload = _decoded(coges.decode, answer)
        talk.say(f"answer {answer.decode('ascii', 'replace')}: {payload}")


def build_ce(args: argparse.Namespace) -> bytes:
    if args.hex:
        return _hex(args.hex)
    text = args.command or "0120"
    if not re.fullmatch(r"[0-9A-Fa-f]{4}", text):
        known = _choices(f"{code} ({what})" for code, what in CE_COMMANDS.items())
        raise RequestError(f"--command {text!r} is not a command code of 4 hex digits, e.g. {known}")
    command = int(text, 16)
    address = args.meter_address or str(CE_BROADCAST)
    if not address.isdigit() or int(address) > CE_BROADCAST:
        raise RequestError(f"--address {address!r} is not a meter address 0-{CE_BROADCAST}")
    data = b"\x00" if command == ce.READ_SERIAL else b""
    password = _password(args, ce.DEFAULT_PASSWORD)
    return ce.build(ce.Packet(int(address), ce.HOST_ADDRESS, password, True, ce.CLASS_NORMAL, command, data))


async def play_ce(talk: Conversation, request: bytes, args: argparse.Namespace) -> None:
    await talk.send(request)
    answer = await talk.frame("a reply packet")
    reply = _decoded(lambda frame: ce.decode(frame, request=False), answer)
    talk.say(f"reply {answer.hex(' ')}: command {reply.command:04X}, data {reply.data.hex(' ') or '-'}")
    if reply.service_class == ce.CLASS_ERROR:
        raise DeviceError(f"the meter answered error {reply.data.hex() or '-'} to command {reply.command:04X}")
    if reply.command == ce.READ_DATE_TIME and len(reply.data) == 7:
        s, m, h, _, d, mo, y = (f"{b:02x}" for b in reply.data)
        talk.say(f"meter time 20{y}-{mo}-{d} {h}:{m}:{s}")
    elif reply.command == ce.READ_SERIAL:
        talk.say(f"serial {reply.data.decode('ascii', 'replace')}")


def build_iec(args: argparse.Namespace) -> bytes | str:
    """--hex as bytes, or the name to read in a programming-mode session."""
    if args.hex:
        return _hex(args.hex)
    if not args.read:
        raise RequestError("iec61107 needs --read NAME, the parameter to read, e.g. VOLTA (or --hex BYTES)")
    return args.read


def _iec_error(value: str) -> None:
    """DeviceError for a meter's (ERRnn) answer."""
    if match := IEC_ERROR.search(value):
        code = match.group(1)
        raise DeviceError(f"the meter answered {code}{_named(IEC_ERRORS, code)}")


async def play_iec(talk: Conversation, request: bytes | str, args: argparse.Namespace) -> None:
    if isinstance(request, bytes):
        await talk.send(request)
        answer = await talk.next()
        talk.say(f"answer {_describe(answer)}")
        if isinstance(answer, Frame):
            _iec_error(answer.raw.decode("ascii", "replace"))
        return
    address = args.meter_address or ""
    await talk.send(f"/?{address}!\r\n".encode())
    identification = await talk.frame("the identification")
    if not identification.startswith(b"/"):
        # A meter that refuses the sign-on answers with an error block: there is no session to end.
        value = _decoded(iec.block_data, identification)
        talk.say(f"answer {value}")
        _iec_error(value)
        raise SendError(f"expected the identification (/...), got {identification.hex(' ')}")
    talk.say(f"identification {identification.decode('ascii', 'replace').strip()}")
    baud = chr(identification[4]) if len(identification) > 4 else "5"
    await talk.send(f"\x060{baud}1\r\n".encode())
    await talk.frame("P0 (programming mode)")
    await talk.send(iec.command("P1", f"({args.password if args.password is not None else 777777})"))
    event = await talk.next()
    if not (isinstance(event, Control) and event.byte == iec.ACK):
        talk.say(f"answer {_describe(event)}")
        # The break frees the meter's programming access at once, not after its session timeout.
        await talk.send(iec.command("B0"))
        if isinstance(event, Frame):
            _iec_error(_decoded(iec.block_data, event.raw))
        # A NAK says the block was damaged as well as that the password was wrong: not the device's word.
        raise SendError(f"the meter refused the password ({_describe(event)}): a wrong --password or a damaged block")
    await talk.send(iec.command("R1", f"{args.read}()"))
    answer = await talk.frame(f"the value of {args.read}")
    await talk.send(iec.command("B0"))
    value = _decoded(iec.block_data, answer)
    talk.say(value)
    _iec_error(value)


@attrs.frozen
class Sender:
    """How `send` speaks one protocol: the device side's framer, the request builder, the host's part."""

    framer: Callable[[], Framer]
    build: Callable[[argparse.Namespace], Any]
    play: Callable[[Conversation, Any, argparse.Namespace], Awaitable[None]]


SENDERS: dict[str, Sender] = {
    "custom": Sender(lambda: custom.Framer(from_device=True), build_custom, play_custom),
    "shtrih": Sender(shtrih.Framer, build_shtrih, play_shtrih),
    "atol2": Sender(atol2.Framer, build_atol2, play_atol2),
    "atol3": Sender(atol3.Framer, build_atol3, play_atol3),
    "dle": Sender(dle.Framer, build_dle, play_dle),
    "coges": Sender(coges.Framer, build_coges, play_coges),
    "energomera-ce": Sender(ce.Framer, build_ce, play_ce),
    "iec61107": Sender(lambda: iec.Framer(from_host=False), build_iec, play_iec),
}


async def exchange(
    address: Address, protocol: str, args: argparse.Namespace, say: Callable[[str], None] | None = None
) -> list[str]:
    """Builds the request, connects, and plays the protocol's exchange; returns what happened as lines.

    Each line also goes to `say` the moment it happens, for a person watching a slow device.

    Error handling: RequestError, before connecting, when the arguments make no request; SendError on a
    connection failure, a NAK, a timeout, a closed connection or an answer whose checksum is wrong;
    DeviceError when the device answers with an error of its own.
    """
    sender = SENDERS[protocol]
    request = sender.build(args)
    lines: list[str] = []

    def note(line: str) -> None:
        lines.append(line)
        if say is not None:
            say(line)

    try:
        stream = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise SendError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    async with stream:
        try:
            await sender.play(Conversation(stream, sender.framer(), args.timeout, note), request, args)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SendError(f"connection to {address} failed: {exc}") from None
    return lines
