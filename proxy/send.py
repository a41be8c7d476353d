"""`devproxy send`: build one request frame, send it to a device (or the proxy), decode the answer."""

from __future__ import annotations

import trio

from proxy.config import Address
from proxy.protocols import Control, Frame, Junk, ProtocolError, custom
from proxy.simulators.custom import BEEP, READ_PARAMETER, STATUS, VAT_FAMILY

CUSTOM_COMMANDS = {
    "beep": lambda password: custom.build_frame(BEEP, custom.password_bytes(password)),
    "status": lambda password: custom.build_frame(STATUS, custom.password_bytes(password)),
    "read-vat": lambda password: custom.build_frame(
        READ_PARAMETER, custom.password_bytes(password) + VAT_FAMILY.to_bytes(2, "little")
    ),
}


class SendError(Exception):
    """The exchange failed: timeout, NAK, a bad checksum, a closed connection; the message says which."""


def custom_request(command: str | None, hex_frame: str | None, password: int) -> bytes:
    """The request frame: a named command, or raw hex sent as it is."""
    if hex_frame is not None:
        try:
            return bytes.fromhex(hex_frame)
        except ValueError:
            raise SendError(f"--hex {hex_frame!r} is not hex bytes") from None
    if command not in CUSTOM_COMMANDS:
        raise SendError(f"unknown command {command!r}; known: {', '.join(CUSTOM_COMMANDS)}")
    return CUSTOM_COMMANDS[command](password)


async def exchange_custom(address: Address, request: bytes, answer_within: float) -> list[str]:
    """Sends a Custom request and reads the ACK and the response frame; returns them as readable lines.

    Error handling: SendError on a connection failure, a NAK, a timeout, a closed connection or a
    response whose checksum is wrong.
    """
    try:
        stream = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise SendError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    async with stream:
        try:
            return await _read_answer(stream, request, answer_within)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SendError(f"connection to {address} failed: {exc}") from None


async def _read_answer(stream: trio.SocketStream, request: bytes, answer_within: float) -> list[str]:
    lines: list[str] = []
    framer = custom.Framer(from_device=True)
    await stream.send_all(request)
    with trio.move_on_after(answer_within):
        while True:
            data = await stream.receive_some()
            if not data:
                raise SendError(_closed_message(lines, framer.flush()))
            for event in framer.feed(data):
                if isinstance(event, Control) and event.byte == custom.ACK:
                    lines.append("ACK")
                elif isinstance(event, Control):
                    raise SendError("NAK: the device rejected the frame (bad checksum or length)")
                elif isinstance(event, Junk):
                    lines.append(f"junk: {event.raw.hex(' ')}")
                elif isinstance(event, Frame):
                    lines.append(_describe_response(event.raw))
                    return lines
    got = f" (got: {'; '.join(lines)})" if lines else ""
    raise SendError(f"no complete answer within {answer_within:g} s{got}")


def _closed_message(lines: list[str], rest: list) -> str:
    received = "; ".join(lines + [f"bytes {e.raw.hex(' ')}" for e in rest])
    return f"connection closed before the answer was complete{': ' + received if received else ''}"


def _describe_response(frame: bytes) -> str:
    try:
        message = custom.decode(frame)
    except ProtocolError as exc:
        raise SendError(f"bad response frame {frame.hex(' ')}: {exc}") from None
    try:
        error = message.error
    except ProtocolError as exc:
        return f"response {frame.hex(' ')}: {exc}"
    status = "OK" if error == 0 else f"error {error}"
    rest = message.data[2:].hex(" ") or "-"
    return f"response {frame.hex(' ')}: command {message.command:02X}h, {status}, data {rest}"
