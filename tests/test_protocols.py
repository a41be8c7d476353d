"""Every protocol's framer, checksum and builder: worked examples, every split, random bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols import (
    Control,
    Frame,
    Junk,
    ProtocolError,
    atol2,
    atol3,
    coges,
    custom,
    dle,
    get,
    iec61107,
    shtrih,
)
from proxy.protocols import energomera_ce as ce

H = bytes.fromhex

CE_REQUEST = H("C0 48 66 B7 FD 00 31 DE 0B 00 D0 01 20 90 C0")
CE_REPLY = H("C0 48 FD 00 66 B7 57 01 20 19 21 23 02 19 07 22 1A C0")


def ce_packet(data: bytes) -> bytes:
    return ce.build(ce.Packet(1, 2, 3, True, 5, 0x0120, data[:15]))


def dle_frame(data: bytes) -> bytes:
    return dle.build_frame(7, 1, ord("A"), data)


def coges_frame(text: str) -> bytes:
    return coges.build_frame(text)


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="<>"), max_size=40)
seven_bit = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)

# name: (host framer, device framer, valid frames, bytes that may start a frame)
PROTOCOLS = {
    "custom": (
        lambda: custom.Framer(from_device=False),
        lambda: custom.Framer(from_device=True),
        st.builds(custom.build_frame, st.integers(0, 255), st.binary(max_size=200)),
        {0x01},
    ),
    "shtrih": (
        shtrih.Framer,
        shtrih.Framer,
        st.builds(shtrih.build_frame, st.integers(0, 254), st.binary(max_size=200)),
        {0x02},
    ),
    "atol2": (atol2.Framer, atol2.Framer, st.builds(atol2.build_frame, st.binary(max_size=200)), {0x02}),
    "atol3": (
        atol3.Framer,
        atol3.Framer,
        st.builds(atol3.build_packet, st.integers(0, 0xDF), st.binary(max_size=300)),
        {0xFE},
    ),
    "dle": (dle.Framer, dle.Framer, st.builds(dle_frame, st.binary(max_size=200)), {0x10}),
    "coges": (coges.Framer, coges.Framer, st.builds(coges_frame, printable), {ord("<")}),
    "energomera-ce": (ce.Framer, ce.Framer, st.builds(ce_packet, st.binary(max_size=15)), {0xC0}),
    "iec61107": (
        lambda: iec61107.Framer(from_host=True),
        lambda: iec61107.Framer(from_host=False),
        st.one_of(
            st.builds(lambda text: iec61107.command("R1", text + "()"), seven_bit),
            st.builds(lambda text: f"/?{text}!\r\n".encode(), st.text("0123456789", max_size=12)),
        ),
        {0x01, 0x02, ord("/"), 0x06},
    ),
}

WORKED = [
    ("shtrih", shtrih.build_frame(0x10, struct.pack("<I", 30)), H("02 05 10 1E 00 00 00 0B")),
    ("atol2", atol2.build_frame(H("1F 00 FF 10 02 03 1A")), H("02 1F 00 FF 10 10 02 10 03 1A 03 E8")),
    ("atol3", atol3.build_packet(1, b""), H("FE 00 00 01 9D")),
    ("coges", coges.build_frame("00002N"), b"<00002N>40"),
    ("coges", coges.build_frame(coges.price_payload(100)), b"<0000320064>EF"),
    ("coges", coges.build_frame(coges.manager_code_payload("9999")), b"<0000349999>0B"),
    ("coges", coges.build_frame(coges.manager_code_payload("11112222")), b"<00003811112222>B7"),
    ("energomera-ce", ce.build(ce.decode(CE_REQUEST, request=True)), CE_REQUEST),
    ("energomera-ce", ce.build(ce.decode(CE_REPLY, request=False)), CE_REPLY),
]


@pytest.mark.parametrize(("name", "built", "expected"), WORKED)
def test_builders_reproduce_the_worked_examples(name, built, expected):
    assert built == expected
    host = PROTOCOLS[name][0]
    assert host().feed(expected) == [Frame(expected)]


def test_energomera_ce_decodes_the_captured_frames():
    request = ce.decode(CE_REQUEST, request=True)
    assert (request.destination, request.source, request.password, request.command) == (
        46950,
        0xFD,
        777777,
        0x0120,
    )
    reply = ce.decode(CE_REPLY, request=False)
    assert (reply.request, reply.service_class, reply.data) == (False, 5, H("19 21 23 02 19 07 22"))
    with pytest.raises(ProtocolError, match="CRC"):
        ce.decode(CE_REPLY[:-2] + b"\x00\xc0", request=False)


def test_iec61107_bcc_vectors_for_both_methods():
    assert iec61107.bcc_xor(b"P0\x02(1234567)\x03") == ord("P")
    assert iec61107.bcc_xor(b"B0\x03") == 0x71
    assert iec61107.bcc_sum(b"B0\x03") == 0x75
    assert iec61107.bcc_sum(b"R1\x02HELLO()\x03") == ord("M")
    assert iec61107.bcc_ok(iec61107.command("B0", energomera=True))
    assert iec61107.bcc_ok(iec61107.command("B0"))


def test_atol3_escapes_a_crc_that_equals_the_start_byte():
    for data in (bytes((n,)) for n in range(256)):
        packet = atol3.build_packet(5, data)
        if atol3.crc8(b"\x05" + data) == 0xFE:
            assert packet.endswith(H("FD EE"))
            assert atol3.decode(packet) == (5, data)
            break
    else:
        pytest.fail("no one-byte packet with CRC FE")


def test_dle_doubles_dle_and_reads_one_raw_byte_after_etx():
    frame = dle.build_frame(0x10, 0x10, ord("A"), H("10 03"))
    assert H("10 10 10 10 00 00 41 10 10 03") in frame
    assert dle.Framer().feed(frame + H("06")) == [Frame(frame), Control(0x06)]
    assert dle.decode(frame).data == H("10 03")


def test_iec61107_option_select_is_one_message_and_a_lone_ack_a_control():
    framer = iec61107.Framer(from_host=True)
    assert framer.feed(b"\x06051\r\n\x06") == [Frame(b"\x06051\r\n")]
    assert framer.flush() == [Control(0x06)]
    assert iec61107.Framer(from_host=False).feed(b"\x06") == [Control(0x06)]


@pytest.mark.parametrize(("name", "built", "expected"), WORKED)
def test_the_same_bytes_split_at_every_position_give_the_same_events(name, built, expected):
    host, _, _, _ = PROTOCOLS[name]
    stream = b"\x00" + expected + expected
    whole = host().feed(stream)
    for split in range(1, len(stream)):
        framer = host()
        assert framer.feed(stream[:split]) + framer.feed(stream[split:]) == whole


@pytest.mark.parametrize("name", PROTOCOLS)
@given(data=st.data())
def test_random_bytes_never_raise_and_are_all_accounted_for(name, data):
    host, device, _, _ = PROTOCOLS[name]
    noise = data.draw(st.binary(max_size=600))
    for factory in (host, device):
        framer = factory()
        events = framer.feed(noise) + framer.flush()
        assert b"".join(event.raw for event in events) == noise
        assert framer.pending == 0


@pytest.mark.parametrize("name", PROTOCOLS)
@given(data=st.data())
def test_valid_frames_with_garbage_between_them_all_come_out_whole(name, data):
    host, _, frames, starts = PROTOCOLS[name]
    garbage = st.binary(max_size=30).map(lambda b: bytes(x for x in b if x not in starts))
    parts = data.draw(st.lists(st.tuples(garbage, frames), min_size=1, max_size=5))
    stream = b"".join(g + f for g, f in parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    framer, events, position = host(), [], 0
    for cut in [*cuts, len(stream)]:
        events += framer.feed(stream[position:cut])
        position = cut
    events += framer.flush()
    assert [e.raw for e in events if isinstance(e, Frame)] == [f for _, f in parts]
    assert b"".join(e.raw for e in events) == stream


@pytest.mark.parametrize("name", [*PROTOCOLS, "raw"])
def test_every_protocol_is_registered_and_answers_junk_without_raising(name):
    protocol = get(name)
    assert protocol.name == name
    protocol.reject_answer(Junk(b"\x00"))


def test_the_iec_busy_answer_uses_the_bcc_method_of_the_request():
    summed = iec61107.command("R1", "VOLTA()", energomera=True)
    answer = iec61107.PROTOCOL.busy_answer(Frame(summed))
    assert answer == iec61107.data_block("(ERR19)", energomera=True)
    assert iec61107.PROTOCOL.busy_answer(Frame(b"/?!\r\n")) == iec61107.data_block("(ERR19)")
