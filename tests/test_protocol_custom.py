"""The Custom framer, checksum and builder on protocols.md's worked examples, every split, random bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols import Control, Frame, Junk, ProtocolError
from proxy.protocols.custom import (
    MAX_LENGTH,
    PROTOCOL,
    Framer,
    build_frame,
    checksum,
    decode,
    password_bytes,
)

H = bytes.fromhex
EXAMPLE = H("01 0A 00 50 3F 42 0F 00 E8 03 00 00 00 D4")
BEEP_REQUEST = H("01 05 00 13 3F 42 0F 00 A8")
BEEP_ANSWER = H("06 01 04 00 13 00 00 63 7A")
VAT_REQUEST = H("01 07 00 04 3F 42 0F 00 10 00 AB")
WORKED_FRAMES = [EXAMPLE, BEEP_REQUEST, BEEP_ANSWER[1:], VAT_REQUEST]


def feed_all(framer: Framer, *chunks: bytes) -> list:
    events = []
    for chunk in chunks:
        events += framer.feed(chunk)
    return events


@pytest.mark.parametrize("frame", WORKED_FRAMES)
def test_worked_examples_have_the_documented_checksum(frame):
    assert checksum(frame[1:-1]) == frame[-1]


def test_builder_reproduces_the_worked_requests():
    assert build_frame(0x50, H("3F 42 0F 00 E8 03 00 00 00")) == EXAMPLE
    assert build_frame(0x13, password_bytes(999999)) == BEEP_REQUEST
    assert build_frame(0x04, password_bytes() + H("10 00")) == VAT_REQUEST


def test_builder_refuses_what_cannot_be_framed():
    with pytest.raises(ProtocolError):
        build_frame(256)
    with pytest.raises(ProtocolError):
        build_frame(1, bytes(MAX_LENGTH))


def test_decode_gives_command_data_and_error():
    message = decode(BEEP_ANSWER[1:])
    assert (message.command, message.error, message.data) == (0x13, 0, H("00 00 63"))
    with pytest.raises(ProtocolError, match="checksum"):
        decode(BEEP_REQUEST[:-1] + b"\x00")
    with pytest.raises(ProtocolError, match="LEN"):
        decode(BEEP_REQUEST + b"\x00")


@pytest.mark.parametrize("frame", WORKED_FRAMES)
def test_each_worked_frame_is_one_frame_event(frame):
    assert Framer(from_device=False).feed(frame) == [Frame(frame)]


def test_device_answer_is_ack_then_frame():
    assert Framer(from_device=True).feed(BEEP_ANSWER) == [Control(0x06), Frame(BEEP_ANSWER[1:])]


def test_ack_and_nak_from_the_host_side_are_junk():
    assert Framer(from_device=False).feed(H("06 15")) == [Junk(H("06 15"))]


@pytest.mark.parametrize("stream", [BEEP_ANSWER, EXAMPLE + BEEP_ANSWER + H("15") + VAT_REQUEST])
def test_the_same_bytes_split_at_every_position_give_the_same_events(stream):
    whole = Framer(from_device=True).feed(stream)
    for split in range(1, len(stream)):
        assert feed_all(Framer(from_device=True), stream[:split], stream[split:]) == whole
    assert feed_all(Framer(from_device=True), *[bytes((b,)) for b in stream]) == whole


def test_data_may_hold_start_ack_and_nak_bytes():
    frame = build_frame(0x20, H("01 06 15 01 01"))
    assert Framer(from_device=True).feed(H("06") + frame) == [Control(6), Frame(frame)]


def test_a_valid_frame_after_garbage_is_found():
    assert Framer(from_device=True).feed(H("ff 00 07") + BEEP_REQUEST) == [
        Junk(H("ff 00 07")),
        Frame(BEEP_REQUEST),
    ]


def test_a_false_start_with_a_plausible_length_waits_then_resynchronises_on_flush():
    framer = Framer(from_device=False)
    assert framer.feed(H("01 ff 0f") + EXAMPLE) == []
    assert framer.pending == 3 + len(EXAMPLE)
    assert framer.flush() == [Junk(H("01 ff 0f")), Frame(EXAMPLE)]
    assert framer.pending == 0


def test_a_false_start_whose_checksum_fails_resynchronises_at_once():
    garbage = H("01 02 00 99 05")  # LEN 2 reaches into the next frame for its CS, which does not match
    assert Framer(from_device=False).feed(garbage + BEEP_REQUEST) == [Junk(garbage), Frame(BEEP_REQUEST)]


def test_zero_and_oversized_lengths_are_not_frames():
    framer = Framer(from_device=False, max_length=16)
    assert framer.feed(H("01 00 00") + H("01 20 00") + BEEP_REQUEST) == [
        Junk(H("01 00 00 01 20 00")),
        Frame(BEEP_REQUEST),
    ]


def test_a_partial_frame_is_held_and_completed_later():
    framer = Framer(from_device=False)
    assert framer.feed(VAT_REQUEST[:5]) == []
    assert framer.pending == 5
    assert framer.feed(VAT_REQUEST[5:]) == [Frame(VAT_REQUEST)]


def feed_device(exchange, framer, data: bytes) -> bytes:
    """The device's bytes through its framer into the exchange; what the proxy owes the device back."""
    return b"".join(exchange.on_device(event) for event in framer.feed(data))


def test_exchange_is_complete_after_the_response_frame_not_the_ack():
    exchange, framer = PROTOCOL.exchange(Frame(BEEP_REQUEST)), PROTOCOL.device_framer()
    feed_device(exchange, framer, BEEP_ANSWER[:1])
    assert not exchange.complete
    feed_device(exchange, framer, BEEP_ANSWER[1:-1])
    assert not exchange.complete
    feed_device(exchange, framer, BEEP_ANSWER[-1:])
    assert exchange.complete


def test_exchange_is_complete_after_a_nak():
    exchange = PROTOCOL.exchange(Frame(BEEP_REQUEST))
    feed_device(exchange, PROTOCOL.device_framer(), H("15"))
    assert exchange.complete


def test_a_client_that_left_needs_nothing_played_for_it_since_the_host_never_answers():
    exchange, framer = PROTOCOL.exchange(Frame(BEEP_REQUEST)), PROTOCOL.device_framer()
    assert exchange.host_gone() == b""
    assert feed_device(exchange, framer, BEEP_ANSWER) == b""
    assert exchange.complete


def test_busy_answer_is_ack_and_error_3505_for_the_same_command():
    answer = PROTOCOL.busy_answer(Frame(BEEP_REQUEST))
    assert answer[:1] == H("06")
    message = decode(answer[1:])
    assert (message.command, message.error) == (0x13, 3505)


def test_a_corrupt_frame_from_a_client_gets_the_registers_nak():
    assert PROTOCOL.reject_answer(Junk(H("01 05 00 13 3F 42 0F 00 A9"))) == H("15")
    assert PROTOCOL.reject_answer(Junk(H("ff ff"))) is None


frames = st.builds(build_frame, st.integers(0, 255), st.binary(max_size=300))


@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_and_are_all_accounted_for(data):
    framer = Framer(from_device=True)
    events = framer.feed(data) + framer.flush()
    assert b"".join(event.raw for event in events) == data
    assert framer.pending == 0


@given(st.binary(max_size=200), frames, st.lists(st.integers(1, 50), max_size=10))
def test_a_valid_frame_after_garbage_is_never_lost(garbage, frame, cuts):
    stream = garbage + frame
    framer = Framer(from_device=False)
    events, position = [], 0
    for cut in cuts:
        events += framer.feed(stream[position : position + cut])
        position += cut
    events += framer.feed(stream[position:]) + framer.flush()
    assert Frame(frame) in events
    assert b"".join(event.raw for event in events) == stream


@given(
    st.lists(frames, min_size=1, max_size=8),
    st.lists(st.binary(max_size=20).filter(lambda b: b"\x01" not in b)),
)
def test_frames_with_start_free_garbage_between_them_all_come_out_in_order(frame_list, gaps):
    stream = b"".join(frame + (gaps[i] if i < len(gaps) else b"") for i, frame in enumerate(frame_list))
    events = Framer(from_device=False).feed(stream)
    assert [e.raw for e in events if isinstance(e, Frame)] == frame_list
