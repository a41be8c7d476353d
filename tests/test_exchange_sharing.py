"""Exchange sharing end to end: many clients stay connected and take turns, request by request."""

from __future__ import annotations

import struct

import trio

from proxy.counters import ExchangeResult
from proxy.device import State
from proxy.protocols import Frame
from proxy.protocols.custom import Framer, build_frame, decode
from proxy.simulators import serve_stream
from proxy.simulators.custom import CustomRegister

from helpers import connect, receive_exactly, receive_until_closed, running_proxy, settings_for, wait_for

H = bytes.fromhex
BEEP = H("01 05 00 13 3F 42 0F 00 A8")
BEEP_ANSWER = H("06 01 04 00 13 00 00 63 7A")
BEEP_ACK_ONLY_REQUEST = build_frame(0x01, H("3F 42 0F 00"))
STATUS_ANSWER = H("06") + build_frame(0x01, H("00 00 63 00 01"))


class EchoingRegister(CustomRegister):
    """The simulated register, answering every command with its own data, so crossed answers show."""

    def respond(self, frame: bytes) -> bytes:
        message = decode(frame)
        return build_frame(message.command, b"\x00\x00" + message.data)


def exchange_settings(path, **keys) -> dict:
    return {
        "name": "ecr",
        "type": "serial",
        "path": str(path),
        "protocol": "custom",
        "sharing": "exchange",
        **keys,
    }


async def read_frames(stream: trio.SocketStream, count: int) -> list[bytes]:
    """The response frames among what the proxy sends, until `count` have come."""
    framer, frames = Framer(from_device=True), []
    with trio.fail_after(30):
        while len(frames) < count:
            data = await stream.receive_some()
            assert data, f"connection closed after {len(frames)} of {count} answers"
            frames += [event.raw for event in framer.feed(data) if isinstance(event, Frame)]
    return frames


async def test_fifty_clients_each_get_exactly_their_own_answers_in_order(pty):
    device_end = pty.plug()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, device_end, EchoingRegister())
        settings = settings_for(exchange_settings(pty.path, acquire_timeout=60, max_clients=50))
        async with running_proxy(settings) as running:
            device = running.devices["ecr"]
            await wait_for(device, lambda: device.state == State.IDLE)

            async def client(number: int) -> None:
                async with await connect(running, "ecr") as stream:
                    requests = [build_frame(0x13, struct.pack("<HH", number, sequence)) for sequence in range(20)]
                    await stream.send_all(b"".join(requests))
                    answers = await read_frames(stream, 20)
                    assert [decode(a).data[2:] for a in answers] == [decode(r).data for r in requests]

            async with trio.open_nursery() as clients:
                for number in range(50):
                    clients.start_soon(client, number)
            assert device.counters.exchanges[ExchangeResult.OK] == 1000
        nursery.cancel_scope.cancel()


async def test_the_ack_reaches_the_client_before_the_rest_of_the_answer(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_settings(pty.path))) as running:
        await wait_for(running.devices["ecr"], lambda: running.devices["ecr"].state == State.IDLE)
        async with await connect(running, "ecr") as client:
            await client.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER[:1])
            assert await receive_exactly(client, 1) == H("06")
            await device_end.send_all(BEEP_ANSWER[1:])
            assert await receive_exactly(client, 8) == BEEP_ANSWER[1:]


async def test_a_late_answer_goes_to_its_own_client_and_the_next_request_waits_for_it(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_settings(pty.path, response_timeout=0.05, acquire_timeout=30))
    async with running_proxy(settings) as running:
        device = running.devices["ecr"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "ecr") as slow_one, await connect(running, "ecr") as next_client:
            await slow_one.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await wait_for(device, lambda: device.state == State.SETTLING)
            await next_client.send_all(BEEP_ACK_ONLY_REQUEST)
            await wait_for(device, lambda: device.waiting == 1)
            # Past response_timeout the proxy says nothing in the device's name: no NAK reaches the client,
            # and its late answer reaches it, not the next client.
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(slow_one, 9) == BEEP_ANSWER
            assert await receive_exactly(device_end, len(BEEP_ACK_ONLY_REQUEST)) == BEEP_ACK_ONLY_REQUEST
            await device_end.send_all(STATUS_ANSWER)
            assert await receive_exactly(next_client, len(STATUS_ANSWER)) == STATUS_ANSWER
            assert device.counters.exchanges[ExchangeResult.LATE] == 1
            assert device.counters.link_losses == 0


async def test_a_serial_device_that_never_answers_holds_the_next_request_until_exchange_timeout(pty):
    device_end = pty.plug()
    settings = settings_for(
        exchange_settings(
            pty.path, response_timeout=0.05, exchange_timeout=0.3, reconnect_interval=0.01, acquire_timeout=30
        )
    )
    async with running_proxy(settings) as running:
        device = running.devices["ecr"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "ecr") as unlucky, await connect(running, "ecr") as next_client:
            await unlucky.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await next_client.send_all(BEEP)
            # Nothing reaches the device until exchange_timeout has passed and the link was reset.
            assert await receive_exactly(device_end, 9) == BEEP
            assert device.counters.exchanges[ExchangeResult.TIMEOUT] == 1
            assert device.counters.link_losses == 1
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(next_client, 9) == BEEP_ANSWER
            # The unlucky client got nothing in the device's name, and it is still connected.
            await unlucky.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(unlucky, 9) == BEEP_ANSWER


async def test_a_tcp_device_is_waited_for_like_a_serial_one_since_it_may_be_a_converter(tcp_device):
    # A serial-to-TCP converter does not stop its register when the connection closes: a reset would
    # only move the late answer to the next connection, and to the next client.
    settings = settings_for(
        {
            "name": "ecr",
            "type": "tcp",
            "path": str(tcp_device.address),
            "protocol": "custom",
            "sharing": "exchange",
            "response_timeout": 0.05,
            "acquire_timeout": 30,
        }
    )
    async with running_proxy(settings) as running:
        device = running.devices["ecr"]
        link = await tcp_device.next_connection()
        async with await connect(running, "ecr") as slow_one, await connect(running, "ecr") as next_client:
            await slow_one.send_all(BEEP)
            assert await receive_exactly(link, 9) == BEEP
            await wait_for(device, lambda: device.state == State.SETTLING)
            await next_client.send_all(BEEP)
            await link.send_all(BEEP_ANSWER)
            assert await receive_exactly(slow_one, 9) == BEEP_ANSWER
            assert await receive_exactly(link, 9) == BEEP
            await link.send_all(BEEP_ANSWER)
            assert await receive_exactly(next_client, 9) == BEEP_ANSWER
            assert device.counters.link_losses == 0 and tcp_device.accepted == 1


async def test_a_client_that_leaves_mid_exchange_does_not_leak_its_answer_to_the_next(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_settings(pty.path, acquire_timeout=30))) as running:
        device = running.devices["ecr"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "ecr") as staying:
            leaving = await connect(running, "ecr")
            await leaving.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(H("06"))
            assert await receive_exactly(leaving, 1) == H("06")
            await leaving.aclose()
            status = build_frame(0x01, H("3F 42 0F 00"))
            await staying.send_all(status)
            await wait_for(device, lambda: device.waiting == 1)
            await device_end.send_all(BEEP_ANSWER[1:])
            assert await receive_exactly(device_end, len(status)) == status
            status_answer = H("06") + build_frame(0x01, H("00 00 63 00 01"))
            await device_end.send_all(status_answer)
            assert await receive_exactly(staying, len(status_answer)) == status_answer


async def test_a_refused_request_gets_the_registers_own_busy_answer_and_the_client_stays(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_settings(pty.path, acquire_timeout=0.05, busy_reply="auto"))
    async with running_proxy(settings) as running:
        device = running.devices["ecr"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "ecr") as holder, await connect(running, "ecr") as refused:
            await holder.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await refused.send_all(BEEP)
            answer = await receive_exactly(refused, 8)  # ACK, then a 7-byte frame with the error code
            assert answer[:1] == H("06")
            assert (decode(answer[1:]).command, decode(answer[1:]).error) == (0x13, 3505)
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(holder, 9) == BEEP_ANSWER
            await refused.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(refused, 9) == BEEP_ANSWER
            assert device.counters.exchanges[ExchangeResult.REFUSED] == 1


async def test_a_corrupt_frame_is_naked_by_the_proxy_and_never_reaches_the_device(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_settings(pty.path))) as running:
        await wait_for(running.devices["ecr"], lambda: running.devices["ecr"].state == State.IDLE)
        async with await connect(running, "ecr") as client:
            await client.send_all(BEEP[:-1] + b"\x00" + BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(client, 10) == H("15") + BEEP_ANSWER


async def test_raw_exchanges_end_in_frame_gap_silence(pty):
    device_end = pty.plug()
    settings = settings_for(
        {"name": "raw", "type": "serial", "path": str(pty.path), "sharing": "exchange", "frame_gap": 0.05}
    )
    async with running_proxy(settings) as running:
        device = running.devices["raw"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "raw") as first, await connect(running, "raw") as second:
            await first.send_all(b"hello")
            assert await receive_exactly(device_end, 5) == b"hello"
            await second.send_all(b"again")
            await device_end.send_all(b"wor")
            await device_end.send_all(b"ld")
            assert await receive_exactly(first, 5) == b"world"
            assert await receive_exactly(device_end, 5) == b"again"
            await device_end.send_all(b"done")
            assert await receive_exactly(second, 4) == b"done"
            await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.OK] == 2)


async def test_link_lost_before_the_answer_keeps_the_client_connected(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_settings(pty.path, reconnect_interval=0.01, acquire_timeout=30))
    async with running_proxy(settings) as running:
        device = running.devices["ecr"]
        await wait_for(device, lambda: device.state == State.IDLE)
        pty.release_slave()
        async with await connect(running, "ecr") as client:
            await client.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await pty.unplug()
            await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.LINK_LOST] == 1)
            device_end = pty.plug()
            await wait_for(device, lambda: device.state == State.IDLE)
            # No NAK was made up for the lost request: the next bytes the client reads are its answer.
            await client.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(client, 9) == BEEP_ANSWER


async def test_link_lost_mid_answer_disconnects_only_the_client_receiving_it(pty):
    device_end = pty.plug()
    settings = settings_for(exchange_settings(pty.path, reconnect_interval=0.01, acquire_timeout=30))
    async with running_proxy(settings) as running:
        device = running.devices["ecr"]
        await wait_for(device, lambda: device.state == State.IDLE)
        pty.release_slave()
        async with await connect(running, "ecr") as receiving, await connect(running, "ecr") as bystander:
            await receiving.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER[:4])
            assert await receive_exactly(receiving, 4) == BEEP_ANSWER[:4]
            await pty.unplug()
            # Half a frame: its driver must start again from a clean frame, as on a direct line.
            assert await receive_until_closed(receiving) == b""
            device_end = pty.plug()
            await wait_for(device, lambda: device.state == State.IDLE)
            await bystander.send_all(BEEP)
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(bystander, 9) == BEEP_ANSWER


async def test_a_refused_client_with_no_busy_answer_is_disconnected_and_others_go_on(pty, log_lines):
    device_end = pty.plug()
    settings = settings_for(
        {
            "name": "fr",
            "type": "serial",
            "path": str(pty.path),
            "protocol": "shtrih",
            "sharing": "exchange",
            "acquire_timeout": 0.05,
        }
    )
    async with running_proxy(settings) as running:
        device = running.devices["fr"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "fr") as holder, await connect(running, "fr") as refused:
            await holder.send_all(H("05"))
            assert await receive_exactly(device_end, 1) == H("05")
            await refused.send_all(H("05"))
            assert await receive_until_closed(refused) == b""
            assert device.counters.refused["busy"] == 1
            await device_end.send_all(H("15"))
            assert await receive_exactly(holder, 1) == H("15")
            await holder.send_all(H("05"))
            assert await receive_exactly(device_end, 1) == H("05")
    assert any("closing the connection (no busy answer to give)" in line for line in log_lines)
    assert not any("unexpected error" in line for line in log_lines)
