"""Framers do O(n) work over any input in any split, and hold at most one partial frame.

Work is counted, not timed: the Python lines a framer executes (sys.settrace) for n and for 2n bytes
must grow like n, not n squared, and a Seeker searches each byte at most once however it is asked.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols import atol2, atol3, coges, custom, dle, iec61107, raw, shtrih
from proxy.protocols import energomera_ce as ce
from proxy.protocols.framing import Seeker, byte_finder

FRAMERS = {
    "custom": lambda: custom.Framer(from_device=True),
    "shtrih": shtrih.Framer,
    "atol2": atol2.Framer,
    "atol3": atol3.Framer,
    "dle": dle.Framer,
    "coges": coges.Framer,
    "energomera-ce": ce.Framer,
    "iec61107-host": lambda: iec61107.Framer(from_host=True),
    "iec61107-device": lambda: iec61107.Framer(from_host=False),
}

# Inputs that made the old scanners quadratic: every byte a frame start, plausible lengths that never
# complete, escapes that keep a candidate going, markers that keep being almost right.
HOSTILE = {
    "custom": [b"\x01", b"\x01\xff\x0f", b"\x01\x05\x00"],
    "shtrih": [b"\x02", b"\x02\xff"],
    "atol2": [b"\x02", b"\x02\x10\x03", b"\x02\x10", b"\x10\x03"],
    "atol3": [b"\xfe", b"\xfe\x7f\x7f\x01", b"\xfe\x7f\x7f\x01\xfd\xed"],
    "dle": [b"\x10\x02", b"\x10\x02\x10\x10", b"\x10"],
    "coges": [b"<", b"<0", b"<\xff"],
    "energomera-ce": [b"\xc0", b"\xc0\x01"],
    "iec61107-host": [b"/", b"\x01", b"\x02", b"\x06\x30", b"\x01R1\x02"],
    "iec61107-device": [b"/", b"\x01", b"\x02a"],
}


def lines_executed(action) -> int:
    """How many Python lines `action()` executes, all callees included."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        action()
    finally:
        sys.settrace(None)
    return count


def feed_whole(factory, data: bytes) -> None:
    framer = factory()
    framer.feed(data)
    framer.flush()


def feed_in_pieces(factory, data: bytes, piece: int) -> None:
    framer = factory()
    for start in range(0, len(data), piece):
        framer.feed(data[start : start + piece])
    framer.flush()


# Python lines a byte may cost at most. The linear scanners stay under 45 on their worst inputs; the
# old ones spent thousands a byte on some (each STX rescanning up to a maximal frame).
LINES_PER_BYTE = 60


def assert_linear(factory, make_input, split) -> None:
    small, large = make_input(2048), make_input(4096)
    work_small = lines_executed(lambda: split(factory, small))
    work_large = lines_executed(lambda: split(factory, large))
    # Linear work doubles; quadratic work would quadruple. 2.5 leaves room for constant parts.
    assert work_large <= 2.5 * work_small + 200, (work_small, work_large)
    assert work_large <= LINES_PER_BYTE * len(large), work_large / len(large)


@pytest.mark.parametrize(("name", "pattern"), [(n, p) for n, ps in HOSTILE.items() for p in ps])
def test_hostile_input_in_one_piece_costs_linear_work(name, pattern):
    assert_linear(FRAMERS[name], lambda n: (pattern * n)[:n], feed_whole)


@pytest.mark.parametrize(("name", "pattern"), [(n, p) for n, ps in HOSTILE.items() for p in ps])
def test_hostile_input_fed_in_small_pieces_costs_linear_work(name, pattern):
    assert_linear(FRAMERS[name], lambda n: (pattern * n)[:n], lambda f, d: feed_in_pieces(f, d, 7))


def big_valid_frame(name: str, size: int) -> bytes:
    """One valid frame of about `size` bytes (as large as the protocol allows)."""
    data = bytes(range(32, 127)) * (size // 95 + 1)
    if name == "atol3":
        return atol3.build_packet(1, (b"\xfd\xfe" + data)[:size])
    if name == "atol2":
        return atol2.build_frame((b"\x10\x03" + data)[: min(size, atol2.MAX_FRAME // 2 - 4)])
    if name == "custom":
        return custom.build_frame(0x10, data[: min(size, custom.MAX_LENGTH - 1)])
    return dle.build_frame(1, 1, ord("A"), (b"\x10" + data)[: min(size, dle.MAX_FRAME // 2 - 10)])


@pytest.mark.parametrize("name", ["atol3", "atol2", "custom", "dle"])
def test_a_large_valid_frame_fed_a_byte_at_a_time_costs_linear_work(name):
    factory = FRAMERS[name]
    assert_linear(factory, lambda n: big_valid_frame(name, n // 4), lambda f, d: feed_in_pieces(f, d, 1))
    framer = factory()
    frame = big_valid_frame(name, 1000)
    events = [event for byte in frame for event in framer.feed(bytes((byte,)))]
    assert [event.raw for event in events] == [frame]


@pytest.mark.parametrize("name", FRAMERS)
@given(st.binary(max_size=3000))
def test_after_a_feed_at_most_one_partial_frame_is_held(name, data):
    framer = FRAMERS[name]()
    framer.feed(data)
    assert framer.pending < framer.max_frame


def test_a_seeker_searches_each_byte_once_however_often_it_is_asked():
    searched = 0
    find_zero = byte_finder(0)

    def counting(buffer, start, end):
        nonlocal searched
        searched += end - start
        return find_zero(buffer, start, end)

    seeker = Seeker(counting)
    buffer = bytearray()
    for _ in range(5000):
        buffer += b"\x01"
        for start in range(max(0, len(buffer) - 3), len(buffer)):
            assert seeker.first(buffer, start, len(buffer)) == -1
    assert searched <= len(buffer)


def test_a_raw_message_is_cut_at_max_message_and_passed_on_as_it_is():
    framer = raw.SilenceFramer(max_message=10)
    assert [event.raw for event in framer.feed(b"a" * 25)] == [b"a" * 10, b"a" * 10]
    assert framer.pending == 5
    assert [event.raw for event in framer.flush()] == [b"a" * 5]
