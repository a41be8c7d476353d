"""`devproxy send`: one exchange with a device (or the proxy in front of it), in the device's protocol.

Each protocol has a function that plays the host's part of the protocol's choreography over a
Conversation and returns what happened as lines for a person; a failure (timeout, NAK, bad checksum,
closed connection) raises SendError with the reason.
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Awaitable, Callable

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
NAMES = {0x04: "EOT", 0x05: "ENQ", 0x06: "ACK", 0x15: "NAK"}
ATOL_BEEP = bytes.fromhex("00 00 47")  # password 0000, command 47h


class SendError(Exception):
    """The exchange failed: timeout, NAK, a bad checksum, a closed connection; the message says which."""


class Conversation:
    """The host's side of one connection: send bytes, and take the device's messages one by one."""

    def __init__(self, stream: trio.SocketStream, framer: Framer, answer_within: float) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self._framer = framer
        self._events: list[Event] = []
        self._deadline = trio.current_time() + answer_within
        self._answer_within = answer_within

    async def send(self, data: bytes) -> None:
        self.lines.append(f"sent {data.hex(' ')}")
        await self.stream.send_all(data)

    async def next(self) -> Event:
        """The device's next message; SendError on a timeout or a closed connection."""
        while not self._events:
            with trio.move_on_at(self._deadline):
                data = await self.stream.receive_some()
                if not data:
                    rest = " ".join(e.raw.hex(" ") for e in self._framer.flush())
                    raise SendError(f"connection closed before the answer was complete{': ' + rest if rest else ''}")
                self._events += self._framer.feed(data)
                continue
            got = f" (got: {'; '.join(self.lines)})" if self.lines else ""
            raise SendError(f"no complete answer within {self._answer_within:g} s{got}")
        event = self._events.pop(0)
        if isinstance(event, Junk):
            self.lines.append(f"junk {event.raw.hex(' ')}")
            return await self.next()
        return event

    async def reply(self, nak: str) -> Event:
        """The device's answer: a frame or a control byte (named in the lines); SendError with `nak` on NAK."""
        event = await self.next()
        if isinstance(event, Control) and event.byte == 0x15:
            raise SendError(nak)
        if isinstance(event, Control):
            self.lines.append(NAMES.get(event.byte, f"{event.byte:02X}"))
        return event

    async def expect_control(self, byte: int, what: str) -> None:
        event = await self.next()
        if not isinstance(event, Control) or event.byte != byte:
            raise SendError(f"expected {NAMES[byte]} {what}, got {_describe(event)}")
        self.lines.append(NAMES[byte])

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


def _decoded(decode: Callable[[bytes], object], frame: bytes) -> object:
    try:
        return decode(frame)
    except ProtocolError as exc:
        raise SendError(f"bad answer {frame.hex(' ')}: {exc}") from None


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise SendError(f"--hex {text!r} is not hex bytes") from None


# -- one function per protocol ----------------------------------------------------------------------


async def send_custom(talk: Conversation, args: argparse.Namespace) -> None:
    if args.hex:
        request = _hex(args.hex)
    elif args.command in CUSTOM_COMMANDS:
        data = custom.password_bytes(custom.DEFAULT_PASSWORD if args.password is None else args.password)
        if args.command == "read-vat":
            data += VAT_FAMILY.to_bytes(2, "little")
        request = custom.build_frame(CUSTOM_COMMANDS[args.command], data)
    else:
        raise SendError(f"--command {args.command!r} is not one of {', '.join(CUSTOM_COMMANDS)} (or give --hex)")
    await talk.send(request)
    event = await talk.reply("NAK: the device rejected the frame (bad checksum or length)")
    if isinstance(event, Control):
        event = await talk.next()
    if not isinstance(event, Frame):
        raise SendError(f"expected a response frame, got {_describe(event)}")
    message = _decoded(custom.decode, event.raw)
    try:
        status = "OK" if message.error == 0 else f"error {message.error}"
    except ProtocolError as exc:
        status = str(exc)
    rest = message.data[2:].hex(" ") or "-"
    talk.lines.append(f"response {event.raw.hex(' ')}: command {message.command:02X}h, {status}, data {rest}")


async def send_shtrih(talk: Conversation, args: argparse.Namespace) -> None:
    if args.hex:
        request = _hex(args.hex)
    elif args.command in (None, "short-status"):
        request = shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", args.password or shtrih.DEFAULT_PASSWORD))
    else:
        raise SendError(f"--command {args.command!r}: Shtrih knows short-status (or give --hex)")
    await talk.send(bytes((shtrih.ENQ,)))
    event = await talk.next()
    if isinstance(event, Control) and event.byte == shtrih.ACK:
        talk.lines.append("ACK: an earlier answer was pending; reading it first")
        await talk.frame("the pending answer")
        await talk.send(bytes((shtrih.ACK,)))
    elif not (isinstance(event, Control) and event.byte == shtrih.NAK):
        raise SendError(f"expected NAK (ready) to ENQ, got {_describe(event)}")
    await talk.send(request)
    await talk.expect_control(shtrih.ACK, "after the frame")
    answer = await talk.frame("the response frame")
    await talk.send(bytes((shtrih.ACK,)))
    command, data = _decoded(shtrih.decode, answer)
    status = "OK" if data[:1] == b"\x00" else f"error {data[0]:02X}h" if data else "no error byte"
    talk.lines.append(f"response {answer.hex(' ')}: command {command:02X}h, {status}, data {data[1:].hex(' ') or '-'}")


async def send_atol2(talk: Conversation, args: argparse.Namespace) -> None:
    request = _hex(args.hex) if args.hex else atol2.build_frame(ATOL_BEEP)
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
    status = "OK" if data[1:2] == b"\x00" else f"error {data[1]:02X}h" if len(data) > 1 else "short answer"
    talk.lines.append(f"answer {answer.hex(' ')}: {status}, data {data.hex(' ')}")


async def send_atol3(talk: Conversation, args: argparse.Namespace) -> None:
    # The default task: password 0000 and command 47h (beep), with "need result" set.
    request = _hex(args.hex) if args.hex else atol3.build_packet(1, bytes((atol3.ADD, 0x01, 1)) + ATOL_BEEP)
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


async def _atol3_reply(talk: Conversation, packet_id: int) -> bytes:
    """The data of the next packet with `packet_id`; other packets are reported and skipped."""
    while True:
        packet = await talk.frame("a reply packet")
        reply_id, data = _decoded(atol3.decode, packet)
        talk.lines.append(f"packet {packet.hex(' ')}: ID {reply_id:02X}, status {data[:1].hex().upper() or '-'}")
        if reply_id == packet_id:
            return data


async def send_dle(talk: Conversation, args: argparse.Namespace) -> None:
    if args.hex:
        request = _hex(args.hex)
    elif args.keys:
        try:
            keys = bytes(int(key) for key in args.keys.split(","))
        except ValueError:
            raise SendError(f"--keys {args.keys!r} must be key codes 0-255, e.g. 1,2,75") from None
        request = dle.build_frame(args.num, args.id, dle.KEYBOARD, keys)
    else:
        raise SendError("DLE needs --keys (or --hex)")
    await talk.send(request)
    event = await talk.reply("NAK: the register rejected the message")
    if isinstance(event, Control):
        return
    message = _decoded(dle.decode, event.raw)
    talk.lines.append(f"frame {event.raw.hex(' ')}: NUM {message.num}, ID {message.node}, COD {chr(message.code)!r}")


async def send_coges(talk: Conversation, args: argparse.Namespace) -> None:
    try:
        if args.hex:
            requests = [_hex(args.hex)]
        elif args.keys:
            requests = [coges.build_frame(coges.key_payload(key)) for key in args.keys.split(",")]
        elif args.price is not None:
            requests = [coges.build_frame(coges.price_payload(args.price))]
        elif args.manager_code:
            requests = [coges.build_frame(coges.manager_code_payload(args.manager_code))]
        else:
            raise SendError("COGES needs --keys, --price, --manager-code (or --hex)")
    except ProtocolError as exc:
        raise SendError(str(exc)) from None
    for request in requests:
        await talk.send(request)
        answer = await talk.frame("an answer envelope")
        payload = _decoded(coges.decode, answer)
        talk.lines.append(f"answer {answer.decode('ascii', 'replace')}: {payload}")


async def send_ce(talk: Conversation, args: argparse.Namespace) -> None:
    if args.hex:
        request = _hex(args.hex)
    else:
        try:
            command = int(args.command or "0120", 16)
        except ValueError:
            raise SendError(f"--command {args.command!r} must be 4 hex digits, e.g. 0120") from None
        try:
            address = int(args.meter_address or "65535")
        except ValueError:
            raise SendError(f"--address {args.meter_address!r} is not a number") from None
        password = ce.DEFAULT_PASSWORD if args.password is None else args.password
        data = b"\x00" if command == ce.READ_SERIAL else b""
        packet = ce.Packet(address, ce.HOST_ADDRESS, password, True, ce.CLASS_NORMAL, command, data)
        request = ce.build(packet)
    await talk.send(request)
    answer = await talk.frame("a reply packet")
    reply = _decoded(lambda frame: ce.decode(frame, request=False), answer)
    if reply.service_class == ce.CLASS_ERROR:
        raise SendError(f"the meter answered error {reply.data.hex() or '-'} to command {reply.command:04X}")
    talk.lines.append(f"reply {answer.hex(' ')}: command {reply.command:04X}, data {reply.data.hex(' ') or '-'}")
    if reply.command == ce.READ_DATE_TIME and len(reply.data) == 7:
        s, m, h, _, d, mo, y = (f"{b:02x}" for b in reply.data)
        talk.lines.append(f"meter time 20{y}-{mo}-{d} {h}:{m}:{s}")
    elif reply.command == ce.READ_SERIAL:
        talk.lines.append(f"serial {reply.data.decode('ascii', 'replace')}")


async def send_iec(talk: Conversation, args: argparse.Namespace) -> None:
    if args.hex:
        await talk.send(_hex(args.hex))
        answer = await talk.next()
        talk.lines.append(f"answer {_describe(answer)}")
        return
    if not args.read:
        raise SendError("IEC 61107 needs --read NAME (or --hex)")
    address = args.meter_address or ""
    await talk.send(f"/?{address}!\r\n".encode())
    identification = await talk.frame("the identification")
    talk.lines.append(f"identification {identification.decode('ascii', 'replace').strip()}")
    baud = chr(identification[4]) if len(identification) > 4 else "5"
    await talk.send(f"\x060{baud}1\r\n".encode())
    await talk.frame("P0 (programming mode)")
    await talk.send(iec.command("P1", f"({args.password if args.password is not None else 777777})"))
    event = await talk.next()
    if not (isinstance(event, Control) and event.byte == iec.ACK):
        raise SendError(f"the password was refused ({_describe(event)})")
    await talk.send(iec.command("R1", f"{args.read}()"))
    answer = await talk.frame(f"the value of {args.read}")
    await talk.send(iec.command("B0"))
    value = _decoded(iec.block_data, answer)
    if "(ERR" in value:
        raise SendError(f"the meter answered {value}")
    talk.lines.append(f"{value}")


SENDERS: dict[str, tuple[Callable[[], Framer], Callable[[Conversation, argparse.Namespace], Awaitable[None]]]] = {
    "custom": (lambda: custom.Framer(from_device=True), send_custom),
    "shtrih": (shtrih.Framer, send_shtrih),
    "atol2": (atol2.Framer, send_atol2),
    "atol3": (atol3.Framer, send_atol3),
    "dle": (dle.Framer, send_dle),
    "coges": (coges.Framer, send_coges),
    "energomera-ce": (ce.Framer, send_ce),
    "iec61107": (lambda: iec.Framer(from_host=False), send_iec),
}


async def exchange(address: Address, protocol: str, args: argparse.Namespace) -> list[str]:
    """Connects, plays the protocol's exchange, and returns what happened as lines.

    Error handling: SendError on a connection failure, a NAK, a timeout, a closed connection or an answer
    whose checksum is wrong.
    """
    framer, sender = SENDERS[protocol]
    try:
        stream = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise SendError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    async with stream:
        talk = Conversation(stream, framer(), args.timeout)
        try:
            await sender(talk, args)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SendError(f"connection to {address} failed: {exc}") from None
        except SendError as exc:
            raise SendError(f"{exc}\n" + "\n".join(talk.lines)) from None
        return talk.lines
