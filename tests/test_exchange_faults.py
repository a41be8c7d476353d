"""Exchange sharing under faults: clients that leave, stop reading or are disconnected mid-exchange.

The device is free when its answer is complete, because the proxy plays the rest of the host's part for a
client that left; no byte of one client's answer reaches another; a second device keeps answering.
"""

from __future__ import annotations

import contextlib
import struct

import httpx
import pytest
import trio
import trio.testing

from proxy import clients, wire
from proxy.config import Address
from proxy.counters import ExchangeResult
from proxy.device import State
from proxy.protocols import atol2, atol3, iec61107, shtrih
from proxy.protocols.custom import build_frame
from proxy.simulators import serve_tcp
from proxy.simulators.base import Faults

from helpers import (
    BEEP,
    BEEP_ANSWER,
    OTHER,
    connect,
    logged,
    other_device_answers,
    receive_exactly,
    receive_until_closed,
    reset_on_close,
    running_proxy,
    settings_for,
    wait_for,
)

H = bytes.fromhex
# Timeouts far beyond the test's limit: only the protocol's own end of an exchange can free the device.
PATIENT = {"response_timeout": 60, "exchange_timeout": 120, "acquire_timeout": 60}


def exchange_device(pty, protocol: str, **keys) -> dict:
    return {
        "name": "dev",
        "type": "serial",
        "path": str(pty.path),
        "protocol": protocol,
        "sharing": "exchange",
        **PATIENT,
        **keys,
    }


SHTRIH_REQUEST = shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", 30))
SHTRIH_ANSWER = shtrih.build_frame(shtrih.SHORT_STATUS, bytes(16))
ATOL3_TASK_DATA = bytes((atol3.ADD, 0x01, 5, 0, 0, 0x47))
ATOL3_RESULT_DATA = bytes((0xA3, 5, 0x55, 0, 0x47))
IEC_SIGN_ON = b"/?!\r\n"
IEC_IDENT = b"/EKT5CE301v12\r\n"

# protocol: (the client's request, what the device answers while the client is gone, what the proxy
# sends for the client as the host would, what the device answers that; None when it answers nothing)
ORPHANS = {
    "shtrih": (SHTRIH_REQUEST, H("06") + SHTRIH_ANSWER, H("06"), None),
    "iec61107": (IEC_SIGN_ON, IEC_IDENT, iec61107.command("B0"), None),
}


async def sign_on(reader: trio.abc.Stream, device_end: trio.abc.Stream) -> None:
    """The reader's sign-on reaches the meter, and the meter's identification reaches the reader."""
    await reader.send_all(IEC_SIGN_ON)
    assert await receive_exactly(device_end, len(IEC_SIGN_ON)) == IEC_SIGN_ON
    await device_end.send_all(IEC_IDENT)
    assert await receive_exactly(reader, len(IEC_IDENT)) == IEC_IDENT


@pytest.mark.parametrize("protocol", ORPHANS)
async def test_the_proxy_finishes_the_hosts_part_for_a_client_that_reset_mid_exchange(pty, protocol):
    request, answer, host_part, reply = ORPHANS[protocol]
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, protocol), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        async with await connect(running, "dev") as staying:
            await leaving.send_all(request)
            assert await receive_exactly(device_end, len(request)) == request
            reset_on_close(leaving)
            await leaving.aclose()
            await wait_for(device, lambda: device.state == State.SETTLING)
            await staying.send_all(SHTRIH_REQUEST if protocol == "shtrih" else request)
            await wait_for(device, lambda: device.waiting == 1)
            await other_device_answers(running)
            await device_end.send_all(answer)
            assert await receive_exactly(device_end, len(host_part)) == host_part
            if reply is not None:
                await device_end.send_all(reply)
            # Only now does the staying client's request reach the device.
            staying_request = SHTRIH_REQUEST if protocol == "shtrih" else request
            assert await receive_exactly(device_end, len(staying_request)) == staying_request
            await device_end.send_all(answer)
            assert await receive_exactly(staying, len(answer)) == answer
            assert device.counters.exchanges[ExchangeResult.CLIENT_GONE] == 1
            assert device.counters.discarded_bytes == len(answer) + len(reply or b"")


async def test_atol2_the_proxy_ends_the_hosts_turn_and_acknowledges_the_answer_for_a_client_that_left(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "atol2"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        async with await connect(running, "dev") as staying:
            await leaving.send_all(H("05"))
            assert await receive_exactly(device_end, 1) == H("05")
            await device_end.send_all(H("06"))
            assert await receive_exactly(leaving, 1) == H("06")
            command = atol2.build_frame(H("00 00 47"))
            await leaving.send_all(command)
            assert await receive_exactly(device_end, len(command)) == command
            reset_on_close(leaving)
            await leaving.aclose()
            # The host's turn was open: the proxy closes it with EOT, then plays the host's ACKs.
            assert await receive_exactly(device_end, 1) == H("04")
            await staying.send_all(H("05"))
            await device_end.send_all(H("06 05"))
            assert await receive_exactly(device_end, 1) == H("06")
            answer = atol2.build_frame(H("55 00 47"))
            await device_end.send_all(answer)
            assert await receive_exactly(device_end, 1) == H("06")
            await other_device_answers(running)
            await device_end.send_all(H("04"))
            assert await receive_exactly(device_end, 1) == H("05")
            await device_end.send_all(H("06"))
            assert await receive_exactly(staying, 1) == H("06")


async def test_the_status_api_disconnect_mid_exchange_never_completes_the_next_request_with_that_answer(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "custom"), OTHER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as holder, await connect(running, "dev") as next_client:
            await holder.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            status = build_frame(0x01, H("3F 42 0F 00"))
            await next_client.send_all(status)
            await wait_for(device, lambda: device.waiting == 1)
            async with httpx.AsyncClient() as http:
                response = await http.post(f"http://{running.status}/api/devices/dev/disconnect")
            assert response.json() == {"disconnected": device.holder}
            assert await receive_until_closed(holder) == b""
            await wait_for(device, lambda: device.state == State.SETTLING)
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(device_end, len(status)) == status
            status_answer = H("06") + build_frame(0x01, H("00 00 63 00 01"))
            await device_end.send_all(status_answer)
            assert await receive_exactly(next_client, len(status_answer)) == status_answer


async def test_a_client_that_stops_reading_is_disconnected_and_its_exchange_still_completes(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "raw", frame_gap=0.02, client_write_timeout=0.2), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        stuck = await connect(running, "dev")
        stuck.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        async with stuck, await connect(running, "dev") as next_client:
            await stuck.send_all(b"give me everything")
            assert await receive_exactly(device_end, 18) == b"give me everything"
            await next_client.send_all(b"mine")
            await wait_for(device, lambda: device.waiting == 1)
            # A big answer the stuck client never takes: it holds the device's reader for client_write_timeout
            # at most; then the client is disconnected, the rest is dropped, and the answer ends as usual.
            await device_end.send_all(b"x" * 2_000_000)
            assert await receive_exactly(device_end, 4) == b"mine"
            await other_device_answers(running)
            await device_end.send_all(b"yours")
            assert await receive_exactly(next_client, 5) == b"yours"
        assert device.counters.discarded_bytes > 0


async def test_writes_of_several_tasks_to_one_stream_never_interleave_and_keep_their_order():
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    async with trio.SocketStream(ours) as writer, trio.SocketStream(theirs) as reader:
        outlet = wire.Outlet(writer)
        chunks = [bytes((n,)) * 50_000 for n in range(1, 6)]
        async with trio.open_nursery() as nursery:
            for chunk in chunks:
                nursery.start_soon(outlet.send, chunk)
                await trio.testing.wait_all_tasks_blocked()
            assert await receive_exactly(reader, sum(map(len, chunks))) == b"".join(chunks)


async def test_line_noise_that_looks_like_a_frame_start_does_not_swallow_the_answer(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "custom"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as client, await connect(running, "dev") as next_client:
            await client.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            # 01 FF 0F claims a frame of 4 KiB: the answer behind it would wait inside it for ever.
            noisy = H("01 ff 0f") + BEEP_ANSWER
            await device_end.send_all(noisy)
            assert await receive_exactly(client, len(noisy)) == noisy
            await next_client.send_all(BEEP)
            # After the protocol's partial_timeout of silence the false start is rescanned: the exchange
            # is complete without waiting for exchange_timeout, and the next request goes.
            assert await receive_exactly(device_end, 9) == BEEP
            assert device.counters.exchanges[ExchangeResult.OK] == 1


async def test_an_answer_the_client_never_acknowledges_is_acknowledged_at_exchange_timeout(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "shtrih", exchange_timeout=0.3), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as silent, await connect(running, "dev") as next_client:
            await silent.send_all(SHTRIH_REQUEST)
            assert await receive_exactly(device_end, len(SHTRIH_REQUEST)) == SHTRIH_REQUEST
            await device_end.send_all(H("06") + SHTRIH_ANSWER)
            assert await receive_exactly(silent, 1 + len(SHTRIH_ANSWER)) == H("06") + SHTRIH_ANSWER
            await next_client.send_all(H("05"))
            # The client never ACKs: at exchange_timeout the proxy does, so that the register does not keep
            # the answer pending for the next client's ENQ; the silent client, holding half an exchange,
            # is disconnected.
            assert await receive_exactly(device_end, 2) == H("06 05")
            assert await receive_until_closed(silent) == b""
            await device_end.send_all(H("15"))
            assert await receive_exactly(next_client, 1) == H("15")
            assert device.counters.link_losses == 0


async def test_a_device_that_sends_its_answer_twice_never_gives_the_copy_to_the_next_client(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "custom"), OTHER)
    first_request, second_request = build_frame(0x13, b"first"), build_frame(0x13, b"second")
    first_answer = H("06") + build_frame(0x13, b"\x00\x00first")
    second_answer = H("06") + build_frame(0x13, b"\x00\x00second")
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as first, await connect(running, "dev") as second:
            await first.send_all(first_request)
            assert await receive_exactly(device_end, len(first_request)) == first_request
            await device_end.send_all(first_answer)
            assert await receive_exactly(first, len(first_answer)) == first_answer
            await second.send_all(second_request)
            assert await receive_exactly(device_end, len(second_request)) == second_request
            # The register repeats its last answer before answering the new request: a frame before this
            # request's ACK answers an earlier one, and is dropped.
            await device_end.send_all(first_answer[1:] + second_answer)
            assert await receive_exactly(second, len(second_answer)) == second_answer
            await other_device_answers(running)
        assert device.counters.discarded_bytes == len(first_answer) - 1


async def test_session_what_a_device_sends_before_the_new_client_speaks_is_not_for_it(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "custom", sharing="session"), OTHER)
    first_answer = H("06") + build_frame(0x13, b"\x00\x00first")
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as first:
            request = build_frame(0x13, b"first")
            await first.send_all(request)
            assert await receive_exactly(device_end, len(request)) == request
            await device_end.send_all(first_answer)
            assert await receive_exactly(first, len(first_answer)) == first_answer
        async with await connect(running, "dev") as second:
            await wait_for(device, lambda: device.state == State.BUSY)
            # The register repeats its answer after the first client left: the second has asked nothing.
            await device_end.send_all(first_answer[1:])
            await wait_for(device, lambda: device.counters.discarded_bytes == len(first_answer) - 1)
            await second.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(second, 9) == BEEP_ANSWER


async def test_atol3_packets_are_renumbered_per_device_so_a_stale_reply_cannot_match(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "atol3"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as first, await connect(running, "dev") as second:
            # Both clients number their packets from 0, as drivers do.
            await first.send_all(atol3.build_packet(0, ATOL3_TASK_DATA))
            sent = atol3.build_packet(4, ATOL3_TASK_DATA)  # the device sees the proxy's numbering
            assert await receive_exactly(device_end, len(sent)) == sent
            await device_end.send_all(atol3.build_packet(4, ATOL3_RESULT_DATA))
            result = atol3.build_packet(0, ATOL3_RESULT_DATA)  # the client sees its own
            assert await receive_exactly(first, len(result)) == result
            await first.send_all(atol3.build_packet(1, bytes((atol3.ACK_RESULT, 5))))
            c2 = atol3.build_packet(5, bytes((atol3.ACK_RESULT, 5)))
            assert await receive_exactly(device_end, len(c2)) == c2
            await device_end.send_all(atol3.build_packet(5, bytes((atol3.PENDING,))))
            assert await receive_exactly(first, 6) == atol3.build_packet(1, bytes((atol3.PENDING,)))
            await second.send_all(atol3.build_packet(0, ATOL3_TASK_DATA))
            sent = atol3.build_packet(8, ATOL3_TASK_DATA)
            assert await receive_exactly(device_end, len(sent)) == sent
            # The device repeats the first client's result: ID 2 is not this exchange's, so it is dropped.
            stale = atol3.build_packet(4, ATOL3_RESULT_DATA)
            await device_end.send_all(stale + atol3.build_packet(8, ATOL3_RESULT_DATA))
            assert await receive_exactly(second, len(result)) == result
            assert device.counters.discarded_bytes == len(stale)


async def test_atol3_the_proxy_sends_the_c2_a_final_result_needs_for_a_client_that_left(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "atol3"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        async with await connect(running, "dev") as staying:
            await leaving.send_all(atol3.build_packet(0, ATOL3_TASK_DATA))
            sent = atol3.build_packet(4, ATOL3_TASK_DATA)
            assert await receive_exactly(device_end, len(sent)) == sent
            reset_on_close(leaving)
            await leaving.aclose()
            await wait_for(device, lambda: device.state == State.SETTLING)
            await staying.send_all(atol3.build_packet(0, ATOL3_TASK_DATA))
            await device_end.send_all(atol3.build_packet(4, ATOL3_RESULT_DATA))
            c2 = atol3.build_packet(5, bytes((atol3.ACK_RESULT, 5)))
            assert await receive_exactly(device_end, len(c2)) == c2
            await device_end.send_all(atol3.build_packet(5, bytes((atol3.PENDING,))))
            sent = atol3.build_packet(8, ATOL3_TASK_DATA)
            assert await receive_exactly(device_end, len(sent)) == sent
            await other_device_answers(running)


async def test_a_client_that_sends_only_garbage_is_disconnected_and_the_others_go_on(pty, log_lines):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "custom"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as flooding, await connect(running, "dev") as driver:
            with contextlib.suppress(trio.BrokenResourceError):
                await flooding.send_all(b"\x01" * 200_000)  # every byte a frame start, none a frame
            with contextlib.suppress(trio.BrokenResourceError):
                assert set(await receive_until_closed(flooding)) <= {0x15}  # the NAKs a register would send
            await other_device_answers(running)
            await driver.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(driver, 9) == BEEP_ANSWER
    assert any("bytes that are no custom request; disconnected" in line for line in log_lines)


@pytest.mark.parametrize("sharing", ["exchange", "session"])
async def test_a_shtrih_answer_the_client_nacked_is_fetched_and_acknowledged_when_it_leaves(pty, sharing):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "shtrih", sharing=sharing), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        await leaving.send_all(SHTRIH_REQUEST)
        assert await receive_exactly(device_end, len(SHTRIH_REQUEST)) == SHTRIH_REQUEST
        await device_end.send_all(H("06") + SHTRIH_ANSWER)
        assert await receive_exactly(leaving, 1 + len(SHTRIH_ANSWER)) == H("06") + SHTRIH_ANSWER
        await leaving.send_all(H("15"))  # the driver NAKs the answer: the register keeps it for the next ENQ
        assert await receive_exactly(device_end, 1) == H("15")
        await leaving.aclose()
        async with await connect(running, "dev") as next_client:
            await next_client.send_all(H("05"))
            # The proxy fetches the pending answer and ACKs it, so the next client's ENQ finds the register idle.
            assert await receive_exactly(device_end, 1) == H("05")
            await device_end.send_all(H("06") + SHTRIH_ANSWER)
            assert await receive_exactly(device_end, 2) == H("06 05")
            await device_end.send_all(H("15"))
            assert await receive_exactly(next_client, 1) == H("15")


async def test_atol2_the_proxy_acknowledges_the_devices_enq_for_a_client_that_left_in_the_devices_turn(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "atol2"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        command = atol2.build_frame(H("00 00 47"))
        await leaving.send_all(H("05"))
        assert await receive_exactly(device_end, 1) == H("05")
        await device_end.send_all(H("06"))
        await leaving.send_all(command + H("04"))
        assert await receive_exactly(device_end, len(command) + 1) == command + H("04")
        await device_end.send_all(H("06 05"))  # ACK of the command, then the device's turn: ENQ
        assert await receive_exactly(leaving, 3) == H("06 06 05")
        reset_on_close(leaving)
        await leaving.aclose()
        assert await receive_exactly(device_end, 1) == H("06")  # the ACK the host owed for the ENQ
        answer = atol2.build_frame(H("55 00 47"))
        await device_end.send_all(answer)
        assert await receive_exactly(device_end, 1) == H("06")
        await device_end.send_all(H("04"))
        async with await connect(running, "dev") as next_client:
            await next_client.send_all(H("05"))
            assert await receive_exactly(device_end, 1) == H("05")
            await device_end.send_all(H("06"))
            assert await receive_exactly(next_client, 1) == H("06")


async def test_atol2_the_answer_to_an_enq_of_a_client_that_left_at_once_is_not_passed_to_the_next(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "atol2"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        await leaving.send_all(H("05"))
        assert await receive_exactly(device_end, 1) == H("05")
        reset_on_close(leaving)
        await leaving.aclose()
        async with await connect(running, "dev") as next_client:
            await next_client.send_all(H("05"))
            await wait_for(device, lambda: device.waiting == 1)
            await device_end.send_all(H("06"))  # the ACK of the first ENQ: the proxy ends that turn with EOT
            assert await receive_exactly(device_end, 2) == H("04 05")
            await device_end.send_all(H("06"))
            assert await receive_exactly(next_client, 1) == H("06")
            await next_client.send_all(H("04"))
            assert await receive_exactly(device_end, 1) == H("04")
            assert device.counters.discarded_bytes == 1  # the first ACK, for the client that left


async def test_session_a_repeated_answer_after_the_new_client_asked_is_not_passed_to_it(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "custom", sharing="session"), OTHER)
    first_request, second_request = build_frame(0x13, b"first"), build_frame(0x13, b"second")
    first_answer = H("06") + build_frame(0x13, b"\x00\x00first")
    second_answer = H("06") + build_frame(0x13, b"\x00\x00second")
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as first:
            await first.send_all(first_request)
            assert await receive_exactly(device_end, len(first_request)) == first_request
            await device_end.send_all(first_answer)
            assert await receive_exactly(first, len(first_answer)) == first_answer
        async with await connect(running, "dev") as second:
            await second.send_all(second_request)
            assert await receive_exactly(device_end, len(second_request)) == second_request
            await device_end.send_all(first_answer[1:] + second_answer)
            assert await receive_exactly(second, len(second_answer)) == second_answer
        assert device.counters.discarded_bytes == len(first_answer) - 1


async def test_session_line_noise_that_looks_like_a_frame_start_is_given_up_and_the_answer_passes(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "custom", sharing="session"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as client:
            await client.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            noisy = H("01 ff 0f") + BEEP_ANSWER
            await device_end.send_all(noisy)
            # Held as the start of a 4 KiB frame until device_partial_timeout of silence; then rescanned.
            assert await receive_exactly(client, len(noisy)) == noisy


@pytest.mark.parametrize("sharing", ["exchange", "session"])
async def test_iec61107_mode_c_the_line_follows_the_agreed_rate_and_returns_after_the_break(pty, sharing, log_lines):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "iec61107", sharing=sharing, iec_signon_baudrate=300), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        assert pty.line_speed() == 300
        async with await connect(running, "dev") as reader:
            await sign_on(reader, device_end)
            await reader.send_all(b"\x06051\r\n")  # programming mode at Z = 5: 9600 baud
            assert await receive_exactly(device_end, 6) == b"\x06051\r\n"
            await logged("line at 9600 baud", log_lines)
            assert pty.line_speed() == 9600
            seed = iec61107.command("P0", "(12345678)")
            await device_end.send_all(seed)
            assert await receive_exactly(reader, len(seed)) == seed
            await reader.send_all(iec61107.command("B0"))
            assert await receive_exactly(device_end, 5) == iec61107.command("B0")
            await logged("line at 300 baud", log_lines)
            assert pty.line_speed() == 300


async def test_atol3_a_status_poll_during_an_async_task_is_answered_and_the_task_goes_on(pty):
    device_end = pty.plug()
    async_task = bytes((atol3.ADD, atol3.ASYNC_FLAG, 5, 0, 0, 0x47))
    async with running_proxy(settings_for(exchange_device(pty, "atol3"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as client:
            await client.send_all(atol3.build_packet(0, async_task))
            sent = atol3.build_packet(4, async_task)
            assert await receive_exactly(device_end, len(sent)) == sent
            await device_end.send_all(atol3.build_packet(4, bytes((atol3.PENDING,))))
            pending = atol3.build_packet(0, bytes((atol3.PENDING,)))
            assert await receive_exactly(client, len(pending)) == pending
            # The driver asks how its task is doing (C3 REQ): the poll goes to the register now, under a
            # number of its own, and its answer comes back under the driver's.
            await client.send_all(atol3.build_packet(1, bytes((atol3.REQUEST, 5))))
            poll = atol3.build_packet(6, bytes((atol3.REQUEST, 5)))
            assert await receive_exactly(device_end, len(poll)) == poll
            await device_end.send_all(atol3.build_packet(6, bytes((0xA2,))))  # in progress
            in_progress = atol3.build_packet(1, bytes((0xA2,)))
            assert await receive_exactly(client, len(in_progress)) == in_progress
            result = atol3.build_packet(atol3.ASYNC_ID, bytes((0xA6, 5, 0x55, 0, 0x47)))
            await device_end.send_all(result)
            assert await receive_exactly(client, len(result)) == result
            await client.send_all(atol3.build_packet(2, bytes((atol3.ACK_RESULT, 5))))
            c2 = atol3.build_packet(5, bytes((atol3.ACK_RESULT, 5)))
            assert await receive_exactly(device_end, len(c2)) == c2
            await device_end.send_all(atol3.build_packet(5, bytes((atol3.PENDING,))))
            assert await receive_exactly(client, 6) == atol3.build_packet(2, bytes((atol3.PENDING,)))
            await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.OK] == 1)


async def test_iec61107_a_readout_right_after_the_identification_ends_the_session(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "iec61107"), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as reader, await connect(running, "dev") as next_reader:
            await reader.send_all(IEC_SIGN_ON)
            assert await receive_exactly(device_end, len(IEC_SIGN_ON)) == IEC_SIGN_ON
            await next_reader.send_all(IEC_SIGN_ON)
            # Modes A and B: the meter sends its readout without waiting for an option select.
            readout = iec61107.data_block("VOLTA(230.12)\r\n!\r\n")
            await device_end.send_all(IEC_IDENT + readout)
            assert await receive_exactly(reader, len(IEC_IDENT + readout)) == IEC_IDENT + readout
            assert await receive_exactly(device_end, len(IEC_SIGN_ON)) == IEC_SIGN_ON
            await device_end.send_all(IEC_IDENT)
            assert await receive_exactly(next_reader, len(IEC_IDENT)) == IEC_IDENT


async def test_session_an_iec_programming_session_left_alone_past_exchange_timeout_gets_its_break(pty, log_lines):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "iec61107", sharing="session", exchange_timeout=0.3), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as reader:
            await sign_on(reader, device_end)
            # The reader keeps the device but says nothing more: the proxy ends the meter's session.
            assert await receive_exactly(device_end, 5) == iec61107.command("B0")
    assert any("left its exchange alone for exchange_timeout" in line for line in log_lines)


@pytest.mark.parametrize("sharing", ["exchange", "session"])
async def test_shtrih_a_driver_whose_timeout_fires_asks_with_enq_and_gets_its_answer(sharing):
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(serve_tcp, "shtrih", Address("127.0.0.1", 0), Faults(delay=0.3))
        settings = settings_for(
            {"name": "fr", "type": "tcp", "path": ready.rsplit(" ", 1)[1], "protocol": "shtrih", "sharing": sharing}
        )
        async with running_proxy(settings) as running, await connect(running, "fr") as driver:
            await driver.send_all(SHTRIH_REQUEST)
            assert await receive_exactly(driver, 1) == H("06")
            await driver.send_all(H("05"))  # its answer timeout fired: it asks
            assert await receive_exactly(driver, 1) == H("06")  # the register still prepares the answer
            answer = await receive_exactly(driver, 19)
            assert shtrih.decode(answer)[0] == shtrih.SHORT_STATUS
            await driver.send_all(H("06"))
            await driver.send_all(H("05"))
            assert await receive_exactly(driver, 1) == H("15")  # idle: the exchange is over
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("sharing", ["exchange", "session"])
async def test_iec61107_a_session_lasts_while_its_reader_asks_and_one_that_leaves_gets_its_break(pty, sharing):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "iec61107", sharing=sharing, exchange_timeout=0.5), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        reader = await connect(running, "dev")
        await sign_on(reader, device_end)
        read = iec61107.command("R1", "VOLTA()")
        value = iec61107.data_block("VOLTA(230.12)")
        # Reads over more than exchange_timeout in all: each read counts its own time.
        for _ in range(4):
            await reader.send_all(read)
            assert await receive_exactly(device_end, len(read)) == read
            with trio.move_on_after(0.2):
                await trio.sleep_forever()  # the reader thinks between its reads
            await device_end.send_all(value)
            assert await receive_exactly(reader, len(value)) == value
        # Its last read goes out, and the reader leaves before the (slow) reply.
        await reader.send_all(read)
        assert await receive_exactly(device_end, len(read)) == read
        reset_on_close(reader)
        await reader.aclose()
        async with await connect(running, "dev") as next_reader:
            await next_reader.send_all(IEC_SIGN_ON)
            await wait_for(device, lambda: device.waiting == 1 or device.state == State.SETTLING)
            await device_end.send_all(value)  # the reply for the reader that left ...
            assert await receive_exactly(device_end, 5) == iec61107.command("B0")  # ... then its break
            assert await receive_exactly(device_end, len(IEC_SIGN_ON)) == IEC_SIGN_ON
            await device_end.send_all(IEC_IDENT)
            assert await receive_exactly(next_reader, len(IEC_IDENT)) == IEC_IDENT


@pytest.mark.parametrize("sharing", ["exchange", "session"])
async def test_iec61107_the_proxy_acks_partial_blocks_for_a_reader_that_left_then_breaks(pty, sharing):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "iec61107", sharing=sharing), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        reader = await connect(running, "dev")
        await sign_on(reader, device_end)
        read = iec61107.command("R1", "PROFILE()")
        await reader.send_all(read)
        assert await receive_exactly(device_end, len(read)) == read
        first_block = iec61107.build_block(b"\x02PROFILE(1)\x04")  # a partial block: ends in EOT
        await device_end.send_all(first_block)
        assert await receive_exactly(reader, len(first_block)) == first_block
        reset_on_close(reader)
        await reader.aclose()
        assert await receive_exactly(device_end, 1) == H("06")  # the ACK the reader owed
        await device_end.send_all(iec61107.data_block("PROFILE(2)"))  # the last block
        assert await receive_exactly(device_end, 5) == iec61107.command("B0")
        async with await connect(running, "dev") as next_reader:
            await next_reader.send_all(IEC_SIGN_ON)
            assert await receive_exactly(device_end, len(IEC_SIGN_ON)) == IEC_SIGN_ON


async def test_iec61107_after_the_proxys_own_break_the_next_sign_on_goes_at_the_sign_on_rate(pty, log_lines):
    device_end = pty.plug()
    settings = settings_for(exchange_device(pty, "iec61107", sharing="session", exchange_timeout=0.3), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as reader:
            await sign_on(reader, device_end)
            await reader.send_all(b"\x06051\r\n")
            assert await receive_exactly(device_end, 6) == b"\x06051\r\n"
            seed = iec61107.command("P0", "(12345678)")
            await device_end.send_all(seed)
            assert await receive_exactly(reader, len(seed)) == seed
            # The reader falls silent: the proxy ends the session, and the line goes back to 300 baud.
            assert await receive_exactly(device_end, 5) == iec61107.command("B0")
            await logged("line at 300 baud", log_lines)
            assert pty.line_speed() == 300
            await reader.send_all(IEC_SIGN_ON)
            assert await receive_exactly(device_end, len(IEC_SIGN_ON)) == IEC_SIGN_ON
            assert pty.line_speed() == 300


async def test_the_next_request_goes_first_and_a_slow_client_taking_its_last_bytes_times_nobody_out(pty, monkeypatch):
    # The last bytes of A's answer wait for A (a client slow to take them holds the device's reader);
    # meanwhile B's request, written the moment A's answer was complete, must not be timed out, nor A's.
    slow, original = {}, clients.Client.send

    async def slow_send(self, data: bytes) -> bool:
        if self.name == slow.get("name") and data.endswith(BEEP_ANSWER[1:]):
            await trio.sleep(0.3)  # the condition under test: longer than exchange_timeout, not a wait
            slow["released"] = True
        return await original(self, data)

    monkeypatch.setattr(clients.Client, "send", slow_send)
    device_end = pty.plug()
    quick = {"response_timeout": 0.05, "exchange_timeout": 0.1}
    async with running_proxy(settings_for(exchange_device(pty, "custom", **quick))) as running:
        device = running.devices["dev"]
        async with await connect(running, "dev") as a, await connect(running, "dev") as b:
            await a.send_all(BEEP)
            assert await receive_exactly(device_end, len(BEEP)) == BEEP
            await b.send_all(BEEP)
            await wait_for(device, lambda: device.waiting == 1)
            slow["name"] = device.holder
            await device_end.send_all(BEEP_ANSWER)
            # B's request reaches the register while A's last bytes still wait for A.
            assert await receive_exactly(device_end, len(BEEP)) == BEEP
            assert "released" not in slow
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(a, len(BEEP_ANSWER)) == BEEP_ANSWER
            assert await receive_exactly(b, len(BEEP_ANSWER)) == BEEP_ANSWER
        assert device.counters.exchanges[ExchangeResult.OK] == 2
