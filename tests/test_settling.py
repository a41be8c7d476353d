"""Session sharing under faults: an answer still owed to a client that left never reaches the next one.

Each test keeps a second device (a simulated register) in the same proxy and checks that it answers while
the first one settles: one device's trouble stalls nobody else.
"""

from __future__ import annotations

import contextlib
import struct

import httpx
import trio

from proxy.config import parse
from proxy.device import State
from proxy.protocols import Frame, custom, shtrih

from helpers import (
    BEEP,
    BEEP_ANSWER,
    OTHER,
    connect,
    other_device_answers,
    receive_exactly,
    receive_until_closed,
    reset_on_close,
    running_proxy,
    settings_for,
    wait_for,
)

H = bytes.fromhex


def serial(pty, **keys) -> dict:
    return {"name": "dev", "type": "serial", "path": str(pty.path), "acquire_timeout": 30, **keys}


async def test_an_answer_to_a_client_that_reset_its_connection_never_reaches_the_next_client(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial(pty), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        for round_number in range(20):
            leaving = await connect(running, "dev")
            await leaving.send_all(b"request %02d" % round_number)
            assert await receive_exactly(device_end, 10) == b"request %02d" % round_number
            reset_on_close(leaving)
            await leaving.aclose()
            async with await connect(running, "dev") as next_client:
                await next_client.send_all(b"mine")
                await wait_for(device, lambda: device.state == State.SETTLING and device.waiting == 1)
                await other_device_answers(running)
                await device_end.send_all(b"answer %02d" % round_number)
                # The next client's bytes reach the device only once the answer is over (frame_gap of silence).
                assert await receive_exactly(device_end, 4) == b"mine"
                await device_end.send_all(b"yours")
                assert await receive_exactly(next_client, 5) == b"yours"
        assert device.counters.discarded_bytes == 20 * 9


async def test_a_client_that_closes_its_sending_side_gets_a_slow_answer_and_the_next_client_does_not(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial(pty), OTHER)) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as asking, await connect(running, "dev") as next_client:
            await asking.send_all(b"request")
            await asking.send_eof()
            assert await receive_exactly(device_end, 7) == b"request"
            await wait_for(device, lambda: device.waiting == 1)
            await other_device_answers(running)
            await device_end.send_all(b"slow answer")
            assert await receive_until_closed(asking) == b"slow answer"
            await next_client.send_all(b"mine")
            assert await receive_exactly(device_end, 4) == b"mine"
            await device_end.send_all(b"yours")
            assert await receive_exactly(next_client, 5) == b"yours"


async def test_the_status_api_disconnect_lets_the_device_settle_before_the_next_client(pty):
    device_end = pty.plug()
    settings = settings_for(serial(pty), OTHER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as holder, await connect(running, "dev") as next_client:
            await holder.send_all(b"request")
            assert await receive_exactly(device_end, 7) == b"request"
            await next_client.send_all(b"mine")
            await wait_for(device, lambda: device.waiting == 1)
            async with httpx.AsyncClient() as http:
                response = await http.post(f"http://{running.status}/api/devices/dev/disconnect")
            assert response.status_code == 200
            assert await receive_until_closed(holder) == b""
            await wait_for(device, lambda: device.state == State.SETTLING)
            await other_device_answers(running)
            await device_end.send_all(b"answer for the holder")
            assert await receive_exactly(device_end, 4) == b"mine"
            await device_end.send_all(b"yours")
            assert await receive_exactly(next_client, 5) == b"yours"
            assert device.counters.discarded_bytes == len(b"answer for the holder")


async def test_idle_timeout_lets_the_device_settle_before_the_next_client(pty):
    device_end = pty.plug()
    settings = settings_for(serial(pty, idle_timeout=0.1, response_timeout=30), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as silent, await connect(running, "dev") as next_client:
            await silent.send_all(b"request")
            assert await receive_exactly(device_end, 7) == b"request"
            await next_client.send_all(b"mine")
            assert await receive_until_closed(silent) == b""
            await wait_for(device, lambda: device.state == State.SETTLING)
            await device_end.send_all(b"answer for the silent one")
            assert await receive_exactly(device_end, 4) == b"mine"
            await device_end.send_all(b"yours")
            assert await receive_exactly(next_client, 5) == b"yours"


async def test_a_framed_device_is_free_the_moment_the_answer_of_a_client_that_left_is_complete(pty):
    device_end = pty.plug()
    # Timeouts far beyond the test's limit: only the protocol's own end of the answer can free the device.
    settings = settings_for(serial(pty, protocol="custom", response_timeout=60, exchange_timeout=120), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        await leaving.send_all(BEEP)
        assert await receive_exactly(device_end, 9) == BEEP
        reset_on_close(leaving)
        await leaving.aclose()
        async with await connect(running, "dev") as next_client:
            await next_client.send_all(BEEP)
            await wait_for(device, lambda: device.state == State.SETTLING)
            await device_end.send_all(BEEP_ANSWER[:1])
            await other_device_answers(running)
            await device_end.send_all(BEEP_ANSWER[1:])
            assert await receive_exactly(device_end, 9) == BEEP
            await device_end.send_all(BEEP_ANSWER)
            assert await receive_exactly(next_client, 9) == BEEP_ANSWER


async def test_a_tcp_device_settles_on_its_connection_which_the_proxy_keeps(tcp_device):
    settings = settings_for({"name": "dev", "type": "tcp", "path": str(tcp_device.address), "acquire_timeout": 30})
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        link = await tcp_device.next_connection()
        leaving = await connect(running, "dev")
        await leaving.send_all(b"request")
        assert await receive_exactly(link, 7) == b"request"
        reset_on_close(leaving)
        await leaving.aclose()
        async with await connect(running, "dev") as next_client:
            await next_client.send_all(b"mine")
            await wait_for(device, lambda: device.state == State.SETTLING and device.waiting == 1)
            await link.send_all(b"answer for the one that left")
            assert await receive_exactly(link, 4) == b"mine"
            await link.send_all(b"yours")
            assert await receive_exactly(next_client, 5) == b"yours"
        assert device.counters.link_losses == 0 and tcp_device.accepted == 1


async def test_the_proxy_acknowledges_a_shtrih_answer_for_a_client_that_left(pty):
    device_end = pty.plug()
    settings = settings_for(serial(pty, protocol="shtrih", response_timeout=60, exchange_timeout=120), OTHER)
    request = shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", 30))
    answer = shtrih.build_frame(shtrih.SHORT_STATUS, bytes(16))
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        await leaving.send_all(request)
        assert await receive_exactly(device_end, len(request)) == request
        await leaving.aclose()
        async with await connect(running, "dev") as next_client:
            await next_client.send_all(H("05"))
            await wait_for(device, lambda: device.waiting == 1)
            await device_end.send_all(H("06") + answer)
            # The driver would ACK the answer; the proxy does it for the client that left, and the device is free.
            assert await receive_exactly(device_end, 2) == H("06 05")
            await device_end.send_all(H("15"))
            assert await receive_exactly(next_client, 1) == H("15")


async def test_a_device_that_never_answers_a_client_that_left_is_free_after_response_timeout(pty):
    device_end = pty.plug()
    settings = settings_for(serial(pty, response_timeout=0.05), OTHER)
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "dev") as printing:
            await printing.send_all(b"print job")
            assert await receive_exactly(device_end, 9) == b"print job"
        async with await connect(running, "dev") as next_client:
            await next_client.send_all(b"next job")
            assert await receive_exactly(device_end, 8) == b"next job"


async def test_a_tcp_device_that_stops_taking_bytes_is_reset_and_the_next_client_served(tcp_device):
    settings = settings_for(
        {"name": "dev", "type": "tcp", "path": str(tcp_device.address), "response_timeout": 0.2, "acquire_timeout": 30}
    )
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        stuck_link = await tcp_device.next_connection()  # never read: its window closes
        async with await connect(running, "dev") as pushing, await connect(running, "dev") as next_client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_push_until_closed, pushing)
                # The write stalls for response_timeout: the link is reset and the pushing client let go.
                second_link = await tcp_device.next_connection()
            await next_client.send_all(b"mine")
            assert await receive_exactly(second_link, 4) == b"mine"
        assert device.counters.link_losses == 1
        await stuck_link.aclose()


async def _push_until_closed(stream: trio.SocketStream) -> None:
    chunk = b"x" * 65536
    with contextlib.suppress(trio.BrokenResourceError):
        while True:
            await stream.send_all(chunk)


async def echoing_register(device_end, stop: trio.Event) -> None:
    """Answers every Custom frame with ACK and a response carrying the request's data."""
    framer = custom.Framer(from_device=False)
    with trio.move_on_after(20):
        while not stop.is_set():
            for event in framer.feed(await device_end.receive_some()):
                if isinstance(event, Frame):
                    message = custom.decode(event.raw)
                    await device_end.send_all(H("06") + custom.build_frame(message.command, b"\x00\x00" + message.data))


async def test_a_client_that_stops_reading_loses_its_turn_and_the_device_settles_before_the_next(pty):
    device_end = pty.plug()
    settings = settings_for(serial(pty, protocol="custom", client_write_timeout=0.2), OTHER)
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        stop = trio.Event()
        nursery.start_soon(echoing_register, device_end, stop)
        stuck = await connect(running, "dev")
        stuck.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await stuck.send_all(b"".join(custom.build_frame(0x13, b"A-%04d" % n + bytes(200)) for n in range(300)))
        async with stuck, await connect(running, "dev") as next_client:
            request = custom.build_frame(0x13, b"B-only")
            await next_client.send_all(request)
            framer = custom.Framer(from_device=True)
            frames = []
            with trio.fail_after(20):
                while not frames:
                    frames = [e.raw for e in framer.feed(await next_client.receive_some()) if isinstance(e, Frame)]
            assert [custom.decode(frame).data[2:] for frame in frames] == [b"B-only"]
            await other_device_answers(running)
        stop.set()
        nursery.cancel_scope.cancel()


async def test_a_device_changed_by_a_reload_settles_before_its_new_settings_take_over(pty):
    device_end = pty.plug()
    pty_path = str(pty.path)
    async with running_proxy(settings_for(serial(pty, listen=["127.0.0.1:0"]))) as running:
        device = running.devices["dev"]
        await wait_for(device, lambda: device.state == State.IDLE)
        leaving = await connect(running, "dev")
        await leaving.send_all(b"request")
        assert await receive_exactly(device_end, 7) == b"request"
        reset_on_close(leaving)
        await leaving.aclose()
        await wait_for(device, lambda: device.state == State.SETTLING)
        changed = parse(
            {
                "proxy": {"status": ""},
                "device": [
                    {"name": "dev", "type": "serial", "path": pty_path, "acquire_timeout": 7, "listen": ["127.0.0.1:0"]}
                ],
            }
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.reload, changed)
            await device_end.send_all(b"answer for the one that left")
        new_device = running.devices["dev"]
        assert new_device is not device and new_device.config.acquire_timeout == 7
        assert device.counters.discarded_bytes == len(b"answer for the one that left")
        await wait_for(new_device, lambda: new_device.state == State.IDLE)
        async with await connect(running, "dev") as next_client:
            await next_client.send_all(b"mine")
            assert await receive_exactly(device_end, 4) == b"mine"
            await device_end.send_all(b"yours")
            assert await receive_exactly(next_client, 5) == b"yours"
