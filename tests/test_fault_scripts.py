"""Scripted faults (proxy.simulators.script): every kind against each protocol's simulator it applies to.

The host side is a real socket on 127.0.0.1 (or a pty); it asserts the exact bytes it gets. After a
fault fires (on the first match only), the same request is sent again and must get the normal answer
next: so nothing else of the faulted answer came in between. Timing faults assert order and presence
over real I/O; their durations are asserted only with trio's MockClock, over in-memory streams.
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from proxy.config import Address, ConfigError, parse
from proxy.protocols import ProtocolError, atol2, atol3, coges, custom, dle, iec61107, shtrih
from proxy.protocols import energomera_ce as ce
from proxy.simulators import Fault, FaultScript, load_script, model_factory, serve_pty, serve_stream, serve_tcp
from proxy.simulators.base import Faults
from proxy.simulators.script import ScriptError, ScriptRun, parse_script

from helpers import connect, receive_exactly, running_proxy, settings_for

H = bytes.fromhex
ROOT = Path(__file__).resolve().parent.parent
NO_REACTION = Faults(reaction_time=0)


@attrs.frozen
class Case:
    protocol: str
    setup: list[bytes]  # what the host sends first (each answered normally)
    request: bytes  # the request the fault matches
    match: dict  # Fault keywords that match it
    code: int  # an error code for the error action
    error: bytes  # the bytes the host gets for that error answer
    decodes: object  # raw answer -> raises ProtocolError when its checksum is wrong


def _iec_decode(raw: bytes) -> None:
    iec61107.block_data(raw)


CE_REQUEST = ce.build(ce.Packet(46950, ce.HOST_ADDRESS, ce.DEFAULT_PASSWORD, True, 5, ce.READ_SERIAL, b"\x00"))
ATOL3_ADD = atol3.build_packet(7, bytes((atol3.ADD, 0x01, 9, 0, 0, 0x47)))
CASES = [
    Case(
        "custom",
        [],
        custom.build_frame(0x13, custom.password_bytes()),
        {"command": 0x13},
        3505,
        H("06") + custom.build_frame(0x13, struct.pack("<H", 3505)),
        custom.decode,
    ),
    Case(
        "shtrih",
        [],
        shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", 30)),
        {"command": 0x10},
        0x33,
        H("06") + shtrih.build_frame(0x10, H("33")),
        shtrih.decode,
    ),
    Case(
        "atol3",
        [],
        ATOL3_ADD,
        {"command": 0x47},
        601,
        atol3.build_packet(7, bytes((0xA4, 9)) + (601).to_bytes(2, "little")),
        atol3.decode,
    ),
    Case(
        "dle",
        [],
        dle.build_frame(1, 1, ord("Q"), b"12"),
        {"command": "Q"},
        ord("E"),
        dle.build_frame(1, 1, ord("E")),
        dle.decode,  # it does not check the checksum: the corrupt test compares bytes instead
    ),
    Case(
        "energomera-ce",
        [],
        CE_REQUEST,
        {"command": ce.READ_SERIAL},
        7,
        ce.build(ce.Packet(ce.HOST_ADDRESS, 46950, None, False, ce.CLASS_ERROR, ce.READ_SERIAL, b"\x07")),
        lambda raw: ce.decode(raw, request=False),
    ),
    Case(
        "iec61107",
        [b"/?!\r\n", b"\x06051\r\n"],
        iec61107.command("R1", "VOLTA()"),
        {"command": "R1", "name": "VOLTA"},
        12,
        iec61107.data_block("(ERR12)"),
        _iec_decode,
    ),
    Case(
        "coges",
        [],
        coges.build_frame(coges.key_payload("ENT")),
        {"payload": coges.key_payload("ENT")},
        7,
        coges.build_frame("000050ERROR 7"),
        coges.decode,
    ),
]
IDS = [case.protocol for case in CASES]
WITH_NAK = ("custom", "shtrih", "dle", "iec61107")


def normal(case: Case) -> tuple[list[bytes], bytes, bytes]:
    """What a device without faults answers: each setup step, then the request's ACK part and answer."""
    model = model_factory(case.protocol)(NO_REACTION)
    setup = [b"".join(write.data for write in model.feed(step)) for step in case.setup]
    writes = model.feed(case.request)
    start = next(i for i, write in enumerate(writes) if write.answer)
    ack = b"".join(write.data for write in writes[:start])
    return setup, ack, b"".join(write.data for write in writes[start:])


async def start_tcp(nursery: trio.Nursery, protocol: str, faults: list[Fault]) -> Address:
    serve = functools.partial(serve_tcp, protocol, Address("127.0.0.1", 0), NO_REACTION, script=faults)
    ready = await nursery.start(serve)
    return Address("127.0.0.1", int(ready.rsplit(":", 1)[1]))


async def faulted_then_normal(case: Case, fault: Fault, expected: bytes | None) -> bytes:
    """Plays setup and the request with `fault` on its first match: asserts `expected` came (when given),
    then that the request sent again gets the normal answer next. Returns what the fault gave."""
    setup, ack, answer = normal(case)
    fault = attrs.evolve(fault, nth=1, **case.match)
    async with trio.open_nursery() as nursery:
        address = await start_tcp(nursery, case.protocol, [fault])
        async with await trio.open_tcp_stream(address.host, address.port) as host:
            for step, reply in zip(case.setup, setup, strict=True):
                await host.send_all(step)
                assert await receive_exactly(host, len(reply)) == reply
            await host.send_all(case.request)
            got = await receive_exactly(host, len(expected if expected is not None else ack + answer))
            if expected is not None:
                assert got == expected
            await host.send_all(case.request)
            assert await receive_exactly(host, len(ack + answer)) == ack + answer
        nursery.cancel_scope.cancel()
    return got


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_error_answers_with_the_protocols_error_and_the_given_code(case):
    await faulted_then_normal(case, Fault("error", code=case.code), case.error)


@pytest.mark.parametrize("case", [case for case in CASES if case.protocol in WITH_NAK], ids=WITH_NAK)
async def test_nak_answers_the_matched_request_with_the_protocols_nak(case):
    await faulted_then_normal(case, Fault("nak"), H("15"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_silence_gives_the_ack_and_then_nothing(case):
    _, ack, _ = normal(case)
    await faulted_then_normal(case, Fault("silence"), ack)


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_corrupt_gives_the_answer_with_a_wrong_checksum(case):
    _, ack, answer = normal(case)
    spoiled = model_factory(case.protocol)().corrupt_checksum(answer)
    assert spoiled != answer
    await faulted_then_normal(case, Fault("corrupt"), ack + spoiled)
    if case.protocol == "dle":  # only the trailing checksum byte differs
        assert spoiled[:-1] == answer[:-1] and spoiled[-1] != answer[-1]
    else:
        case.decodes(answer)
        with pytest.raises(ProtocolError):
            case.decodes(spoiled)


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_cut_sends_the_first_k_bytes_of_the_answer_only(case):
    _, ack, answer = normal(case)
    await faulted_then_normal(case, Fault("cut", after=3), ack + answer[:3])


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("before", ["ack", "answer"])
async def test_a_delayed_answer_still_comes_whole_and_in_order(case, before):
    _, ack, answer = normal(case)
    await faulted_then_normal(case, Fault("delay", seconds=0.05, before=before), ack + answer)


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_drop_closes_the_connection_after_k_bytes_of_the_answer(case):
    setup, ack, answer = normal(case)
    fault = Fault("drop", after=2, nth=1, **case.match)
    async with trio.open_nursery() as nursery:
        address = await start_tcp(nursery, case.protocol, [fault])
        async with await trio.open_tcp_stream(address.host, address.port) as host:
            for step, reply in zip(case.setup, setup, strict=True):
                await host.send_all(step)
                assert await receive_exactly(host, len(reply)) == reply
            await host.send_all(case.request)
            assert await receive_exactly(host, len(ack) + 2) == ack + answer[:2]
            with trio.fail_after(10):
                assert await host.receive_some() == b""  # the device closed the link
        # The device itself goes on: a new connection is answered (the fault fired on the 1st match only).
        async with await trio.open_tcp_stream(address.host, address.port) as host:
            for step, reply in zip(case.setup, setup, strict=True):
                await host.send_all(step)
                assert await receive_exactly(host, len(reply)) == reply
            await host.send_all(case.request)
            assert await receive_exactly(host, len(ack + answer)) == ack + answer
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_offline_answers_nothing_for_its_seconds_then_answers_again(case, autojump_clock):
    # In-memory streams, no real I/O: MockClock measures the offline spell exactly.
    setup, ack, answer = normal(case)
    run = ScriptRun([Fault("offline", seconds=5, nth=1, **case.match)])
    host, device = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, device, model_factory(case.protocol)(NO_REACTION, script=run))
        for step, reply in zip(case.setup, setup, strict=True):
            await host.send_all(step)
            assert await receive_exactly(host, len(reply)) == reply
        started = trio.current_time()
        await host.send_all(case.request)  # the fault fires: no answer
        await trio.sleep(1)
        # A new connection (another model sharing the run) is not answered either.
        other_host, other_device = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_stream, other_device, model_factory(case.protocol)(NO_REACTION, script=run))
        await other_host.send_all(b"".join(case.setup) + case.request)
        await host.send_all(case.request)
        with trio.move_on_after(3.9):  # up to 4.9 s into the spell: nothing at all
            assert await host.receive_some() == b"never"
            assert await other_host.receive_some() == b"never"
        assert trio.current_time() - started < 5
        await trio.sleep(0.2)
        await host.send_all(case.request)
        assert await receive_exactly(host, len(ack + answer)) == ack + answer
        nursery.cancel_scope.cancel()


async def test_offline_on_tcp_ignores_new_connections_until_it_ends():
    case = CASES[0]
    _, ack, answer = normal(case)
    async with trio.open_nursery() as nursery:
        address = await start_tcp(nursery, "custom", [Fault("offline", seconds=0.3, nth=1, command=0x13)])
        async with await trio.open_tcp_stream(address.host, address.port) as first:
            await first.send_all(case.request)  # goes offline
            async with await trio.open_tcp_stream(address.host, address.port) as second:
                # Ask until answered: the answer, when it comes, is a whole normal one.
                received = b""
                with trio.fail_after(10):
                    while not received:
                        await second.send_all(case.request)
                        with trio.move_on_after(0.05):
                            received = await second.receive_some()
                received += await receive_exactly(second, len(ack + answer) - len(received))
                assert received == ack + answer
        nursery.cancel_scope.cancel()


async def test_a_delay_before_the_answer_holds_the_answer_not_the_ack(autojump_clock):
    case = CASES[0]
    _, ack, answer = normal(case)
    host, device = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        model = model_factory("custom")(script=[Fault("delay", seconds=2)])
        nursery.start_soon(serve_stream, device, model)
        started = trio.current_time()
        await host.send_all(case.request)
        assert await receive_exactly(host, len(ack)) == ack
        assert trio.current_time() == started
        assert await receive_exactly(host, len(answer)) == answer
        assert trio.current_time() - started == pytest.approx(2)
        nursery.cancel_scope.cancel()


async def test_a_delay_before_the_ack_holds_everything(autojump_clock):
    case = CASES[0]
    _, ack, answer = normal(case)
    host, device = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        model = model_factory("custom")(Faults(delay=1), script=[Fault("delay", seconds=2, before="ack")])
        nursery.start_soon(serve_stream, device, model)
        started = trio.current_time()
        await host.send_all(case.request)
        assert await receive_exactly(host, len(ack)) == ack
        assert trio.current_time() - started == pytest.approx(2)
        assert await receive_exactly(host, len(answer)) == answer
        assert trio.current_time() - started == pytest.approx(2)  # the knob's 1 s runs from the request
        nursery.cancel_scope.cancel()


async def test_shtrih_acks_an_enq_during_a_scripted_delay_then_answers():
    request = shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", 30))
    async with trio.open_nursery() as nursery:
        address = await start_tcp(nursery, "shtrih", [Fault("delay", seconds=0.5, command=0x10)])
        async with await trio.open_tcp_stream(address.host, address.port) as host:
            await host.send_all(request)
            assert await receive_exactly(host, 1) == H("06")
            await host.send_all(H("05"))
            assert await receive_exactly(host, 1) == H("06")  # still preparing
            assert shtrih.decode(await receive_exactly(host, 19))[0] == shtrih.SHORT_STATUS
        nursery.cancel_scope.cancel()


# ATOL v2: the answer comes after the host's EOT: the device's ENQ, then the frame on the host's ACK.
ATOL2_FRAME = atol2.build_frame(H("00 00 47"))
ATOL2_ANSWER = atol2.build_frame(bytes((0x55, 0, 0x47)))


async def atol2_turn(host: trio.SocketStream, until_frame: int | None = None) -> bytes:
    """ENQ, the frame, EOT, ACK of the device's ENQ: what came back after the EOT's ENQ."""
    await host.send_all(H("05"))
    assert await receive_exactly(host, 1) == H("06")
    await host.send_all(ATOL2_FRAME)
    assert await receive_exactly(host, 1) == H("06")
    await host.send_all(H("04"))
    assert await receive_exactly(host, 1) == H("05")
    await host.send_all(H("06"))
    return await receive_exactly(host, len(ATOL2_ANSWER) if until_frame is None else until_frame)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault("error", code=0x33), atol2.build_frame(bytes((0x55, 0x33)))),
        (Fault("delay", seconds=0.05), ATOL2_ANSWER),
        (Fault("delay", seconds=0.05, before="ack"), ATOL2_ANSWER),
        (Fault("cut", after=3), ATOL2_ANSWER[:3]),
    ],
    ids=["error", "delay-answer", "delay-ack", "cut"],
)
async def test_atol2_scripted_faults_reach_the_answer_after_the_eot(fault, expected):
    async with trio.open_nursery() as nursery:
        address = await start_tcp(nursery, "atol2", [attrs.evolve(fault, command=0x47, nth=1)])
        async with await trio.open_tcp_stream(address.host, address.port) as host:
            assert await atol2_turn(host, len(expected)) == expected
            if fault.action != "cut":
                await host.send_all(H("06"))
                assert await receive_exactly(host, 1) == H("04")
            # The next turn is normal (after a cut, the host gave up on the turn with its own ENQ).
            assert await atol2_turn(host) == ATOL2_ANSWER
        nursery.cancel_scope.cancel()


async def test_atol2_nak_silence_corrupt_and_drop():
    script = [
        Fault("nak", nth=1),
        Fault("silence", nth=2),
        Fault("corrupt", nth=3),
        Fault("drop", nth=4, after=1),
    ]
    async with trio.open_nursery() as nursery:
        address = await start_tcp(nursery, "atol2", script)
        async with await trio.open_tcp_stream(address.host, address.port) as host:
            await host.send_all(H("05"))
            assert await receive_exactly(host, 1) == H("06")
            await host.send_all(ATOL2_FRAME)
            assert await receive_exactly(host, 1) == H("15")  # 1: NAK
            await host.send_all(ATOL2_FRAME)
            assert await receive_exactly(host, 1) == H("06")  # 2: ACK, and after the EOT no ENQ
            await host.send_all(H("04"))
            corrupt = await atol2_turn(host)  # 3: a nothing came between: this turn's bytes are next
            assert corrupt[:-1] == ATOL2_ANSWER[:-1] and corrupt[-1] != ATOL2_ANSWER[-1]
            with pytest.raises(ProtocolError):
                atol2.decode(corrupt)
            await host.send_all(H("06"))
            assert await receive_exactly(host, 1) == H("04")
            assert await atol2_turn(host, 1) == ATOL2_ANSWER[:1]  # 4: one byte, then the link drops
            with trio.fail_after(10):
                assert await host.receive_some() == b""
        nursery.cancel_scope.cancel()


async def test_atol2_offline_is_silent_to_the_whole_choreography(autojump_clock):
    host, device = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        model = model_factory("atol2")(script=[Fault("offline", seconds=5, nth=1, command=0x47)])
        nursery.start_soon(serve_stream, device, model)
        await host.send_all(H("05"))
        assert await receive_exactly(host, 1) == H("06")
        await host.send_all(ATOL2_FRAME + H("04 05"))
        with trio.move_on_after(4.5):
            assert await host.receive_some() == b"never"
        await trio.sleep(1)
        await host.send_all(H("05"))
        assert await receive_exactly(host, 1) == H("06")
        nursery.cancel_scope.cancel()


def test_nth_every_and_every_nth_count_matches_only():
    model = model_factory("custom")(
        script=[Fault("nak", command=0x13, nth=2), Fault("error", command=0x13, code=7, every=3)]
    )
    beep = custom.build_frame(0x13, custom.password_bytes())
    other = custom.build_frame(0x01, custom.password_bytes())
    seen = []
    for frame in (beep, other, beep, beep, other, beep, beep, beep):
        data = b"".join(write.data for write in model.feed(frame))
        seen.append("nak" if data == H("15") else "error" if b"\x07\x00" in data[-3:] else "ok")
    # beeps: 1 ok, 2 nak (also the error's 2nd), 3 error (its 3rd), 4 ok, 5 ok, 6 error
    assert seen == ["ok", "ok", "nak", "error", "ok", "ok", "ok", "error"]


def test_a_byte_pattern_matches_any_request_containing_it():
    model = model_factory("custom")(script=[Fault("nak", pattern=H("00 13"), every=1)])
    beep = custom.build_frame(0x13, custom.password_bytes())
    status = custom.build_frame(0x01, custom.password_bytes())
    assert b"".join(w.data for w in model.feed(beep)) == H("15")
    assert b"".join(w.data for w in model.feed(status))[:1] == H("06")


async def test_drop_on_a_pty_hangs_up_and_a_new_pty_appears_at_the_link(tmp_path):
    link = tmp_path / "ttyFAULT"
    beep = custom.build_frame(0x13, custom.password_bytes())
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_pty, "custom", link, script=[Fault("drop", after=2, nth=1)]))
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        host = trio.lowlevel.FdStream(fd)
        await host.send_all(beep)
        got = b""
        with trio.fail_after(10):
            while True:
                try:
                    chunk = await host.receive_some()
                except (OSError, trio.BrokenResourceError):
                    break  # EIO: the device hung up
                if not chunk:
                    break
                got += chunk
        await host.aclose()
        assert got == H("06") + custom.build_frame(0x13, struct.pack("<HB", 0, 99))[:2]
        # The link went before the hang-up; the device makes the new pty before it waits for input again.
        await trio.testing.wait_all_tasks_blocked()
        assert link.is_symlink()
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        async with trio.lowlevel.FdStream(fd) as host:
            await host.send_all(beep)
            assert await receive_exactly(host, 9) == H("06 01 04 00 13 00 00 63 7A")
        nursery.cancel_scope.cancel()


# The script file and its errors.

GOOD = """
[[fault]]
match = { command = 0x13 }
nth = 3
action = "error"
code = 3505

[[fault]]
match = { bytes = "01 05" }
every = 2
action = "delay"
before = "ack"
seconds = 1.5

[[fault]]
action = "drop"
after = 4
"""


def test_a_script_file_loads_into_faults(tmp_path):
    path = tmp_path / "faults.toml"
    path.write_text(GOOD)
    script = load_script(path)
    assert script == FaultScript(
        (
            Fault("error", command=0x13, nth=3, code=3505),
            Fault("delay", pattern=H("01 05"), every=2, before="ack", seconds=1.5),
            Fault("drop", after=4),
        ),
        str(path),
    )
    script.check("custom")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[fault]]\naction = 'explode'", "[[fault]] 1: key 'action': 'explode' is not one of error, delay"),
        ("[[fault]]\nmatch = { command = 1 }", "[[fault]] 1: key 'action' is missing"),
        ("[[fault]]\naction = 'nak'\nnth = 0", "key 'nth': 0 is not a whole number from 1"),
        ("[[fault]]\naction = 'nak'\nnth = 2\nevery = true", "keys 'nth' and 'every' exclude each other"),
        ("[[fault]]\naction = 'nak'\nevery = false", "key 'every': False is not true or a whole number"),
        ("[[fault]]\naction = 'nak'\nmatch = { bytes = 'zz' }", "key 'match.bytes': 'zz' is not hex bytes"),
        ("[[fault]]\naction = 'nak'\nmatch = { cmd = 1 }", "unknown key 'match.cmd'"),
        ("[[fault]]\naction = 'nak'\ncode = 3", "key 'code' does not apply to action 'nak'"),
        ("[[fault]]\naction = 'delay'", "key 'seconds' is missing"),
        ("[[fault]]\naction = 'offline'\nseconds = -1", "key 'seconds'"),
        ("[[fault]]\naction = 'cut'\nafter = 'x'", "key 'after': 'x' is not an integer"),
        ("[[faults]]\naction = 'nak'", "unknown key 'faults'"),
        ("[[fault]\n", "not TOML"),
    ],
)
def test_a_bad_script_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "faults.toml"
    path.write_text(text)
    with pytest.raises(ScriptError) as caught:
        load_script(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("protocol", "fault", "message"),
    [
        ("atol3", Fault("nak"), "action 'nak': the protocol has no NAK"),
        ("coges", Fault("nak", command=1), "key 'match.command': the protocol has no command codes"),
        ("custom", Fault("nak", command="R1"), "key 'match.command': 'R1' is not an integer"),
        ("iec61107", Fault("nak", command=1), "key 'match.command': 1 is not a string"),
        ("custom", Fault("nak", name="VOLTA"), "key 'match.name': only IEC 61107 blocks have data names"),
        ("shtrih", Fault("error", code=300), "key 'code': 300 is out of the protocol's range 0..255"),
    ],
)
def test_a_script_that_does_not_fit_the_protocol_is_refused(protocol, fault, message):
    with pytest.raises(ScriptError, match="faults.toml: \\[\\[fault\\]\\] 1: " + message.replace("(", "\\(")):
        FaultScript((fault,), "faults.toml").check(protocol)


def test_the_cli_refuses_a_bad_script_with_exit_2(tmp_path):
    path = tmp_path / "faults.toml"
    path.write_text("[[fault]]\naction = 'nak'\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "simulate", "atol3", "--pty", str(tmp_path / "tty"), "--script", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {path}: [[fault]] 1: action 'nak': the protocol has no NAK (atol3)\n"


def test_parse_script_accepts_an_empty_script():
    assert parse_script("", "x.toml") == FaultScript((), "x.toml")


# -- a type = "simulator" device of the proxy with a fault_script --------------------------------


def test_fault_script_is_checked_with_the_settings(tmp_path):
    script = tmp_path / "faults.toml"
    script.write_text('[[fault]]\naction = "nak"\n')
    simulator = {"name": "r", "type": "simulator", "listen": ["127.0.0.1:0"], "fault_script": str(script)}
    with pytest.raises(ConfigError, match=r"fault_script.*the protocol has no NAK \(atol3\)"):
        parse({"device": [{**simulator, "protocol": "atol3"}]})
    with pytest.raises(ConfigError, match=r'fault_script.*is for type = "simulator" devices'):
        parse({"device": [{**simulator, "type": "tcp", "path": "127.0.0.1:1", "protocol": "custom"}]})
    assert parse({"device": [{**simulator, "protocol": "custom"}]}).devices[0].fault_script == str(script)


async def test_a_simulator_device_plays_its_fault_script_through_the_proxy_and_a_drop_fires_once(tmp_path):
    script = tmp_path / "faults.toml"
    script.write_text('[[fault]]\nmatch = { command = 0x13 }\nnth = 2\naction = "drop"\nafter = 0\n')
    beep, answer = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8"), bytes.fromhex("06 01 04 00 13 00 00 63 7A")
    settings = settings_for(
        {"name": "reg", "type": "simulator", "protocol": "custom", "sharing": "exchange", "fault_script": str(script)}
    )
    async with running_proxy(settings) as running:
        async with await connect(running, "reg") as client:
            await client.send_all(beep)
            assert await receive_exactly(client, 9) == answer
            await client.send_all(beep)  # the second beep: the link drops after the ACK
            assert await receive_exactly(client, 1) == b"\x06"
        for _ in range(3):  # the link is opened again, and the script's count goes on: no more drops
            async with await connect(running, "reg") as client:
                await client.send_all(beep)
                assert await receive_exactly(client, 9) == answer


def test_a_script_nested_too_deeply_is_a_script_error():
    with pytest.raises(ScriptError, match=r"deep\.toml: nested too deeply"):
        parse_script("x = " + "[" * 100_000 + "]" * 100_000, "deep.toml")


@pytest.mark.parametrize("option", ["--nak-every", "--drop-every"])
def test_simulate_refuses_a_negative_every(option, capsys):
    from proxy.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["simulate", "custom", "--listen", "127.0.0.1:0", option, "-1"])
    assert exit_.value.code == 2
    assert "-1 is negative" in capsys.readouterr().err


def test_an_edited_fault_script_is_loaded_anew_for_the_simulator_device(tmp_path):
    from proxy.links import simulator

    script = tmp_path / "faults.toml"
    script.write_text("[[fault]]\naction = 'nak'\n")
    config = parse(
        {
            "device": [
                {
                    "name": "ed",
                    "type": "simulator",
                    "protocol": "custom",
                    "listen": ["127.0.0.1:0"],
                    "fault_script": str(script),
                }
            ]
        }
    ).devices[0]
    first = simulator._script_run(config)
    assert simulator._script_run(config) is first  # the match counts go on across links
    script.write_text("[[fault]]\naction = 'silence'\n\n")
    second = simulator._script_run(config)
    assert second is not first
    assert [fault.action for fault in second.script.faults] == ["silence"]
