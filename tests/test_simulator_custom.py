"""The simulated Custom register: its answers, and its pty and TCP front ends driven by `send`."""

from __future__ import annotations

from pathlib import Path

import trio

from proxy.cli import build_parser
from proxy.config import Address
from proxy.protocols.custom import build_frame, decode, password_bytes
from proxy.send import exchange
from proxy.simulators import serve_pty, serve_tcp
from proxy.simulators.custom import (
    ERROR_INVALID_LENGTH,
    ERROR_UNKNOWN_COMMAND,
    ERROR_UNKNOWN_PARAMETER,
    ERROR_WRONG_PASSWORD,
    CustomRegister,
)

from helpers import receive_exactly, running_proxy, settings_for

H = bytes.fromhex


def data_of(writes: list) -> list[bytes]:
    return [write.data for write in writes]


def answer_to(frame: bytes) -> tuple[bytes, int, bytes]:
    """(ACK byte, error code, data after the error code) of the register's answer."""
    ack, response = data_of(CustomRegister().feed(frame))
    message = decode(response)
    return ack, message.error, message.data[2:]


def test_beep_is_acked_and_answered_as_in_the_worked_example():
    assert data_of(CustomRegister().feed(H("01 05 00 13 3F 42 0F 00 A8"))) == [
        H("06"),
        H("01 04 00 13 00 00 63 7A"),
    ]


def test_vat_parameter_answer_starts_as_in_the_worked_example():
    ack, error, data = answer_to(H("01 07 00 04 3F 42 0F 00 10 00 AB"))
    assert (ack, error) == (H("06"), 0)
    assert data.startswith(H("63 08 07 E8 03"))


def test_status_answers_ok_with_the_operator():
    ack, error, data = answer_to(build_frame(0x01, password_bytes()))
    assert (ack, error, data[:1]) == (H("06"), 0, H("63"))


def test_errors_for_unknown_command_wrong_password_short_data_and_unknown_parameter():
    assert answer_to(build_frame(0x77, password_bytes()))[1] == ERROR_UNKNOWN_COMMAND
    assert answer_to(build_frame(0x13, password_bytes(1)))[1] == ERROR_WRONG_PASSWORD
    assert answer_to(build_frame(0x13, b"\x00"))[1] == ERROR_INVALID_LENGTH
    assert answer_to(build_frame(0x04, password_bytes() + H("11 00")))[1] == ERROR_UNKNOWN_PARAMETER


def test_a_bad_checksum_is_naked():
    register = CustomRegister()
    assert data_of(register.feed(H("01 05 00 13 3F 42 0F 00 A9"))) == [H("15")]


def test_a_frame_cut_short_is_naked_when_the_line_goes_quiet():
    register = CustomRegister()
    assert register.feed(H("01 05 00 13")) == []
    assert register.mid_frame
    assert data_of(register.line_idle()) == [H("15")]
    assert not register.mid_frame


def test_frames_split_across_reads_are_answered_once_complete():
    register = CustomRegister()
    assert register.feed(H("01 05 00 13 3F")) == []
    assert data_of(register.feed(H("42 0F 00 A8"))) == [H("06"), H("01 04 00 13 00 00 63 7A")]


async def test_simulator_on_a_pty_answers_send_through_the_proxy(tmp_path: Path):
    link = tmp_path / "ttyCUSTOM"
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(serve_pty, "custom", link)
        assert str(link) in ready and link.is_symlink()
        settings = settings_for({"name": "reg", "type": "serial", "path": str(link), "baudrate": 57600})
        async with running_proxy(settings) as running:
            address = running.addresses["reg"][0]
            args = build_parser().parse_args(["send", str(address), "--protocol", "custom", "--command", "beep"])
            lines = await exchange(address, "custom", args)
        assert lines[1:] == ["ACK", "response 01 04 00 13 00 00 63 7a: command 13h, OK, data 63"]
        nursery.cancel_scope.cancel()
    assert not link.exists()


async def test_simulator_on_tcp_gives_each_host_its_own_device():
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(serve_tcp, "custom", Address("127.0.0.1", 0))
        address = Address("127.0.0.1", int(ready.rsplit(":", 1)[1]))
        first = await trio.open_tcp_stream(address.host, address.port)
        second = await trio.open_tcp_stream(address.host, address.port)
        await second.send_all(H("01 05 00 13 3F 42 0F 00 A9"))  # a bad checksum on one connection
        await first.send_all(H("01 05 00 13 3F 42 0F 00 A8"))
        assert await receive_exactly(first, 9) == H("06 01 04 00 13 00 00 63 7A")
        assert await receive_exactly(second, 1) == H("15")
        await first.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()
