"""Every simulated device answers its own protocol's `send`, directly and through exchange sharing."""

from __future__ import annotations

import struct

import pytest
import trio

from proxy.cli import build_parser
from proxy.config import Address
from proxy.protocols import atol2, atol3, coges, shtrih
from proxy.send import DeviceError, SendError, exchange
from proxy.simulators import model_factory, serve_tcp
from proxy.simulators.base import NO_FAULTS, Faults, Write
from proxy.simulators.shtrih import DEVICE_METRICS

from helpers import connect, receive_exactly, running_proxy, settings_for

CASES = [
    ("custom", ["--command", "beep"], "command 13h, OK, data 63"),
    ("shtrih", ["--command", "short-status"], "command 10h, OK"),
    ("atol2", [], "answer 02 55 00 47 03"),
    ("atol3", [], "status A3"),
    ("dle", ["--keys", "1,2,75"], "ACK"),
    ("coges", ["--keys", "2,9,ENT"], "answer <000050OK>"),
    ("energomera-ce", ["--command", "0120", "--address", "46950"], "meter time 20"),
    ("iec61107", ["--read", "VOLTA"], "VOLTA(230.12)"),
]


def send_args(address: Address, protocol: str, extra: list[str]):
    return build_parser().parse_args(["send", str(address), "--protocol", protocol, "--timeout", "10", *extra])


async def simulator(nursery: trio.Nursery, protocol: str, faults: Faults = NO_FAULTS) -> Address:
    ready = await nursery.start(serve_tcp, protocol, Address("127.0.0.1", 0), faults)
    return Address("127.0.0.1", int(ready.rsplit(":", 1)[1]))


@pytest.mark.parametrize(("protocol", "extra", "expected"), CASES)
async def test_simulator_answers_send_directly(protocol, extra, expected):
    async with trio.open_nursery() as nursery:
        address = await simulator(nursery, protocol)
        lines = await exchange(address, protocol, send_args(address, protocol, extra))
        assert any(expected in line for line in lines), lines
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("protocol", "extra", "expected"), CASES)
async def test_simulator_answers_send_through_exchange_sharing(protocol, extra, expected):
    settings = settings_for({"name": "dev", "type": "simulator", "protocol": protocol, "sharing": "exchange"})
    async with running_proxy(settings) as running:
        address = running.addresses["dev"][0]
        lines = await exchange(address, protocol, send_args(address, protocol, extra))
        assert any(expected in line for line in lines), lines
        assert running.devices["dev"].counters.exchanges["timeout"] == 0


@pytest.mark.parametrize("protocol", ["custom", "shtrih", "dle", "iec61107"])
async def test_send_fails_with_the_reason_when_the_device_naks(protocol):
    extra = dict((case[0], case[1]) for case in CASES)[protocol]
    async with trio.open_nursery() as nursery:
        address = await simulator(nursery, protocol, Faults(nak_every=1))
        with pytest.raises(SendError, match=r"NAK|refused"):
            await exchange(address, protocol, send_args(address, protocol, extra))
        nursery.cancel_scope.cancel()


async def test_a_dropped_answer_is_a_timeout():
    async with trio.open_nursery() as nursery:
        address = await simulator(nursery, "custom", Faults(drop_every=1))
        args = send_args(address, "custom", ["--command", "beep", "--timeout", "0.2"])
        with pytest.raises(SendError, match=r"no complete answer within 0\.2 s"):
            await exchange(address, "custom", args)
        nursery.cancel_scope.cancel()


async def test_a_dropped_atol2_answer_is_a_timeout():
    # ATOL v2 answers after the host's EOT (on_other), not in reply to the frame: a drop must still reach it.
    async with trio.open_nursery() as nursery:
        address = await simulator(nursery, "atol2", Faults(drop_every=1))
        with pytest.raises(SendError, match=r"no complete answer within 0\.2 s; received 06 06"):
            await exchange(address, "atol2", send_args(address, "atol2", ["--timeout", "0.2"]))
        nursery.cancel_scope.cancel()


def test_atol2_drops_every_nth_answer_and_delays_the_enq_that_starts_each():
    model = model_factory("atol2")(Faults(drop_every=2))
    command = atol2.build_frame(bytes((0, 0, 0x47)))
    for dropped in (False, True, False):
        assert model.feed(bytes((atol2.ENQ,))) == [Write(bytes((atol2.ACK,)), answer=False)]
        assert model.feed(command) == [Write(bytes((atol2.ACK,)), answer=False)]
        after_eot = model.feed(bytes((atol2.EOT,)))
        if dropped:
            assert after_eot == []  # the answer never comes
            continue
        assert after_eot == [Write(bytes((atol2.ENQ,)), answer=True)]  # answer=True: --delay holds it back
        (frame,) = model.feed(bytes((atol2.ACK,)))
        assert frame.data == atol2.build_frame(bytes((0x55, 0, 0x47)))
        assert model.feed(bytes((atol2.ACK,))) == [Write(bytes((atol2.EOT,)), answer=False)]


async def test_a_busy_device_answers_with_its_busy_error():
    async with trio.open_nursery() as nursery:
        address = await simulator(nursery, "custom", Faults(busy=True))
        with pytest.raises(DeviceError, match=r"^the register answered error 3503 \(busy with another command\)"):
            await exchange(address, "custom", send_args(address, "custom", ["--command", "beep"]))
        nursery.cancel_scope.cancel()


async def test_an_atol3_async_task_keeps_the_device_until_its_result_and_the_hosts_ack():
    settings = settings_for({"name": "kkt", "type": "simulator", "protocol": "atol3", "sharing": "exchange"})
    async with running_proxy(settings) as running:
        address = running.addresses["kkt"][0]
        add = atol3.build_packet(7, bytes((atol3.ADD, atol3.ASYNC_FLAG | 0x01, 9)) + bytes.fromhex("00 00 47"))
        args = send_args(address, "atol3", ["--hex", add.hex()])
        lines = await exchange(address, "atol3", args)
        statuses = [line.split("status ")[1] for line in lines if line.startswith("packet")]
        assert statuses == ["A1", "A6", "A1"]  # pending, the async result (ID F0), then the answer to C2
        device = running.devices["kkt"]
        assert device.counters.exchanges == {"ok": 1}
        assert device.counters.unsolicited_bytes == 0


H = bytes.fromhex
# Frames whose boundaries are right but whose contents are not: what a real device NAKs or ignores.
BAD_FRAMES = [
    ("atol3", H("fe 06 00 01 c1 01 01 00 00 47 f3"), b""),  # bad CRC: ignored
    ("dle", H("10 02 10 03 00"), H("15")),  # too short for NUM ID UF UF COD: NAK
    ("coges", b"<0000320064>00", b""),  # bad checksum: ignored
    ("iec61107", b"/?!\r\n" + b"\x01R1\x02VOLTA()\x03\x00", b"/EKT5CE301v12\r\n\x15"),  # bad BCC: NAK
    ("shtrih", H("02 01 ff 00"), H("15")),  # bad LRC: NAK
    ("custom", H("01 01 00 13 00"), H("15")),  # bad checksum: NAK
]


@pytest.mark.parametrize(("protocol", "frame", "answer"), BAD_FRAMES)
def test_a_bad_frame_gets_what_a_device_would_answer_never_an_exception(protocol, frame, answer):
    model = model_factory(protocol)(NO_FAULTS)
    writes = model.feed(frame) + model.line_idle()
    assert b"".join(write.data for write in writes) == answer


@pytest.mark.parametrize(("protocol", "frame", "answer"), BAD_FRAMES)
async def test_an_in_process_simulator_keeps_answering_after_a_bad_frame(protocol, frame, answer):
    # A device that ignores a bad frame leaves its client's request unanswered: the device settles until
    # exchange_timeout, then its link is reset and the next client is served.
    settings = settings_for(
        {"name": "sim", "type": "simulator", "protocol": protocol, "response_timeout": 0.1, "exchange_timeout": 0.3}
    )
    async with running_proxy(settings) as running:
        async with await connect(running, "sim") as client:
            await client.send_all(frame)
            if answer:
                assert await receive_exactly(client, len(answer)) == answer
        extra, expected = next((extra, expected) for name, extra, expected in CASES if name == protocol)
        address = running.addresses["sim"][0]
        assert expected in "\n".join(await exchange(address, protocol, send_args(address, protocol, extra)))
        # The simulator itself never failed: at most the reset after a request it ignored.
        assert running.devices["sim"].counters.link_losses == (0 if answer else 1)


def test_shtrih_short_status_has_the_vendors_16_byte_answer_for_either_default_password():
    for password, operator in ((1, 1), (30, 30)):
        model = model_factory("shtrih")(NO_FAULTS)
        request = shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", password))
        writes = model.feed(request)
        answer = writes[1].data
        assert answer[1] == 16  # LEN: command and 15 bytes of data
        command, data = shtrih.decode(answer)
        assert (command, data[0], data[1]) == (shtrih.SHORT_STATUS, 0, operator)


def test_shtrih_answers_device_type_fch_without_a_password():
    model = model_factory("shtrih")(NO_FAULTS)
    command, data = shtrih.decode(model.feed(shtrih.build_frame(0xFC))[1].data)
    assert command == 0xFC and data[0] == 0
    assert data[1:] == DEVICE_METRICS and len(data) == 1 + 6 + len(DEVICE_METRICS) - 6


async def test_shtrih_answers_an_enq_while_a_slow_command_runs_then_sends_the_answer():
    async with trio.open_nursery() as nursery:
        address = await simulator(nursery, "shtrih", Faults(delay=0.3))
        async with await trio.open_tcp_stream(address.host, address.port) as host:
            await host.send_all(shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", 30)))
            assert await receive_exactly(host, 1) == H("06")
            await host.send_all(H("05"))  # the driver's answer timeout fired: it asks
            assert await receive_exactly(host, 1) == H("06")  # still preparing
            answer = await receive_exactly(host, 19)
            assert shtrih.decode(answer)[0] == shtrih.SHORT_STATUS
        nursery.cancel_scope.cancel()


async def test_the_iec_meter_waits_its_reaction_time_before_it_answers():
    async with trio.open_nursery() as nursery:
        address = await simulator(nursery, "iec61107")  # the default reaction time: 0.2 s
        async with await trio.open_tcp_stream(address.host, address.port) as reader:
            started = trio.current_time()
            await reader.send_all(b"/?!\r\n")
            assert await receive_exactly(reader, 15) == b"/EKT5CE301v12\r\n"
            assert trio.current_time() - started >= 0.2
        nursery.cancel_scope.cancel()


def test_the_coges_display_scrolls_so_that_its_answer_always_fits_a_frame():
    device = model_factory("coges")(NO_FAULTS)
    key = coges.build_frame(coges.key_payload("5"))
    for _ in range(500):
        (write,) = device.answer(key)
    events = coges.Framer().feed(write.data)
    assert [event.raw for event in events] == [write.data]
    assert coges.decode(write.data).endswith("5" * 16)
