"""Session sharing end to end: real sockets on 127.0.0.1, real pseudo-terminals, the real proxy."""

from __future__ import annotations

import os

import pytest
import trio

from proxy.device import State

from helpers import (
    connect,
    receive_exactly,
    receive_until_closed,
    running_proxy,
    settings_for,
    wait_for,
)

SIZES = [1, 1000, 65536 + 7, 1024 * 1024]


def payload(size: int) -> bytes:
    return os.urandom(size)


async def exchange_both_ways(client: trio.SocketStream, device: trio.abc.Stream, size: int) -> None:
    """Bytes go client -> device and device -> client unchanged, while both sides send at once."""
    up, down = payload(size), payload(size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, up)
        nursery.start_soon(device.send_all, down)
        assert await receive_exactly(device, size) == up
        assert await receive_exactly(client, size) == down


@pytest.mark.parametrize("size", SIZES)
async def test_serial_device_on_a_pty_passes_bytes_both_ways_unchanged(pty, size):
    device_end = pty.plug()
    settings = settings_for({"name": "fptr", "type": "serial", "path": str(pty.path)})
    async with running_proxy(settings) as running:
        await wait_for(running.devices["fptr"], lambda: running.devices["fptr"].state == State.IDLE)
        pty.release_slave()
        async with await connect(running, "fptr") as client:
            await exchange_both_ways(client, device_end, size)


@pytest.mark.parametrize("size", SIZES)
async def test_tcp_device_passes_bytes_both_ways_unchanged(size, tcp_device):
    settings = settings_for({"name": "printer", "type": "tcp", "path": str(tcp_device.address)})
    async with running_proxy(settings) as running:
        device_end = await tcp_device.next_connection()
        async with await connect(running, "printer") as client:
            await wait_for(running.devices["printer"], lambda: running.devices["printer"].state == State.BUSY)
            await exchange_both_ways(client, device_end, size)


async def test_second_client_is_refused_with_busy_reply_after_acquire_timeout():
    settings = settings_for(
        {
            "name": "reg",
            "type": "simulator",
            "protocol": "custom",
            "acquire_timeout": 0.2,
            "busy_reply": "15 42",
        }
    )
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        holder = await connect(running, "reg")
        await wait_for(device, lambda: device.state == State.BUSY)
        async with await connect(running, "reg") as second:
            assert await receive_until_closed(second) == b"\x15\x42"
        assert device.counters.refused["busy"] == 1
        assert device.holder is not None and device.holder.endswith(str(holder.socket.getsockname()[1]))
        await holder.aclose()


async def test_a_refused_client_gets_the_busy_reply_even_with_an_unread_request():
    settings = settings_for(
        {"name": "reg", "type": "simulator", "protocol": "custom", "acquire_timeout": 0.1, "busy_reply": "aa"}
    )
    async with running_proxy(settings) as running, await connect(running, "reg"):
        await wait_for(running.devices["reg"], lambda: running.devices["reg"].state == State.BUSY)
        async with await connect(running, "reg") as second:
            await second.send_all(b"request that nobody reads" * 100)
            assert await receive_until_closed(second) == b"\xaa"


async def test_waiting_clients_get_the_device_in_arrival_order(tcp_device):
    settings = settings_for({"name": "dev", "type": "tcp", "path": str(tcp_device.address), "acquire_timeout": 30})
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        device_end = await tcp_device.next_connection()
        first = await connect(running, "dev")
        await wait_for(device, lambda: device.state == State.BUSY)
        waiters = []
        for number in range(3):
            waiter = await connect(running, "dev")
            await waiter.send_all(b"waiter %d" % number)
            await wait_for(device, lambda n=number: device.waiting == n + 1)
            waiters.append(waiter)
        await first.aclose()
        for number, waiter in enumerate(waiters):
            assert await receive_exactly(device_end, 8) == b"waiter %d" % number
            await device_end.send_all(b"you are %d" % number)
            assert await receive_exactly(waiter, 9) == b"you are %d" % number
            await waiter.aclose()


async def test_client_waiting_for_an_absent_device_is_served_once_it_appears(pty):
    settings = settings_for(
        {
            "name": "late",
            "type": "serial",
            "path": str(pty.path),
            "reconnect_interval": 0.02,
            "acquire_timeout": 30,
        }
    )
    async with running_proxy(settings) as running:
        device = running.devices["late"]
        await wait_for(device, lambda: device.state == State.OFFLINE)
        async with await connect(running, "late") as client:
            await client.send_all(b"hello")
            await wait_for(device, lambda: device.waiting == 1)
            device_end = pty.plug()
            assert await receive_exactly(device_end, 5) == b"hello"
            await device_end.send_all(b"world")
            assert await receive_exactly(client, 5) == b"world"


async def test_link_lost_disconnects_the_holder_and_the_next_client_is_served_after_reconnect(pty):
    pty.plug()
    settings = settings_for(
        {
            "name": "lost",
            "type": "serial",
            "path": str(pty.path),
            "reconnect_interval": 0.02,
            "acquire_timeout": 30,
        }
    )
    async with running_proxy(settings) as running:
        device = running.devices["lost"]
        await wait_for(device, lambda: device.state == State.IDLE)
        pty.release_slave()
        async with await connect(running, "lost") as holder:
            await wait_for(device, lambda: device.state == State.BUSY)
            await pty.unplug()
            assert await receive_until_closed(holder) == b""
        assert device.counters.link_losses == 1
        device_end = pty.plug()
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "lost") as client:
            await client.send_all(b"again")
            assert await receive_exactly(device_end, 5) == b"again"


async def test_bytes_sent_after_a_lease_ended_never_reach_the_next_client(pty):
    device_end = pty.plug()
    settings = settings_for({"name": "stale", "type": "serial", "path": str(pty.path), "response_timeout": 0.05})
    async with running_proxy(settings) as running:
        device = running.devices["stale"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "stale") as first:
            await first.send_all(b"slow request")
            assert await receive_exactly(device_end, 12) == b"slow request"
        # No answer began within response_timeout: the device settled, and what it sends now is nobody's.
        await wait_for(device, lambda: device.holder is None)
        await device_end.send_all(b"LATE ANSWER")
        await wait_for(device, lambda: device.counters.unsolicited_bytes == 11)
        async with await connect(running, "stale") as second:
            await second.send_all(b"ping")
            assert await receive_exactly(device_end, 4) == b"ping"
            await device_end.send_all(b"pong")
            assert await receive_exactly(second, 4) == b"pong"


async def test_bytes_buffered_before_a_lease_are_discarded_when_it_starts(tcp_device):
    settings = settings_for({"name": "buf", "type": "tcp", "path": str(tcp_device.address)})
    async with running_proxy(settings) as running:
        device = running.devices["buf"]
        device_end = await tcp_device.next_connection()
        await wait_for(device, lambda: device.state == State.IDLE)
        await device_end.send_all(b"x" * 100_000)
        async with await connect(running, "buf") as client:
            await wait_for(device, lambda: device.state == State.BUSY)
            await client.send_all(b"q")
            assert await receive_exactly(device_end, 1) == b"q"
            assert device.counters.unsolicited_bytes == 100_000
            await device_end.send_all(b"answer")
            assert await receive_exactly(client, 6) == b"answer"


async def test_client_outside_allow_is_closed_without_a_reply():
    settings = settings_for(
        {
            "name": "reg",
            "type": "simulator",
            "protocol": "custom",
            "allow": ["10.0.0.0/8"],
            "busy_reply": "15",
        }
    )
    async with running_proxy(settings) as running:
        async with await connect(running, "reg") as client:
            assert await receive_until_closed(client) == b""
        assert running.devices["reg"].counters.refused["not allowed"] == 1


async def test_client_inside_allow_is_served():
    settings = settings_for(
        {"name": "reg", "type": "simulator", "protocol": "custom", "allow": ["127.0.0.0/8", "::1/128"]}
    )
    async with running_proxy(settings) as running, await connect(running, "reg") as client:
        await wait_for(running.devices["reg"], lambda: running.devices["reg"].state == State.BUSY)
        await client.send_all(bytes.fromhex("01 05 00 13 3F 42 0F 00 A8"))
        assert await receive_exactly(client, 9) == bytes.fromhex("06 01 04 00 13 00 00 63 7A")


async def test_client_over_max_clients_is_refused_at_once_with_busy_reply():
    settings = settings_for(
        {
            "name": "reg",
            "type": "simulator",
            "protocol": "custom",
            "max_clients": 2,
            "acquire_timeout": 60,
            "busy_reply": "15",
        }
    )
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        async with await connect(running, "reg"), await connect(running, "reg"):
            await wait_for(device, lambda: device.clients == 2)
            async with await connect(running, "reg") as third:
                assert await receive_until_closed(third) == b"\x15"
            assert device.counters.refused["too many clients"] == 1


async def test_release_port_opens_the_device_per_lease_and_closes_it_after(tcp_device):
    # This device never answers: after each client the proxy waits response_timeout for an answer to pass on.
    settings = settings_for(
        {"name": "rp", "type": "tcp", "path": str(tcp_device.address), "release_port": True, "response_timeout": 0.05}
    )
    async with running_proxy(settings) as running:
        device = running.devices["rp"]
        assert tcp_device.accepted == 0
        for round_number in range(2):
            async with await connect(running, "rp") as client:
                device_end = await tcp_device.next_connection()
                await client.send_all(b"round %d" % round_number)
                assert await receive_exactly(device_end, 7) == b"round %d" % round_number
            assert await receive_until_closed(device_end) == b""
            await wait_for(device, lambda: device.holder is None)
        assert tcp_device.accepted == 2
        # Idle with its link closed until the next client: "closed", not offline (issue 11).
        assert device.state == State.CLOSED


async def test_silent_client_loses_the_device_after_idle_timeout():
    settings = settings_for(
        {"name": "reg", "type": "simulator", "protocol": "custom", "idle_timeout": 0.3, "acquire_timeout": 30}
    )
    async with running_proxy(settings) as running:
        silent = await connect(running, "reg")
        next_client = await connect(running, "reg")
        # Sent while waiting: the proxy forwards it the moment the lease starts, well inside idle_timeout.
        await next_client.send_all(bytes.fromhex("01 05 00 13 3F 42 0F 00 A8"))
        async with silent, next_client:
            assert await receive_until_closed(silent) == b""
            assert await receive_exactly(next_client, 9) == bytes.fromhex("06 01 04 00 13 00 00 63 7A")


async def test_device_that_cannot_be_reached_refuses_clients_as_offline(tmp_path):
    settings = settings_for(
        {
            "name": "gone",
            "type": "serial",
            "path": str(tmp_path / "missing"),
            "acquire_timeout": 0.05,
            "busy_reply": "ee",
        }
    )
    async with running_proxy(settings) as running:
        device = running.devices["gone"]
        async with await connect(running, "gone") as client:
            assert await receive_until_closed(client) == b"\xee"
        assert device.counters.refused["offline"] == 1
        assert device.state == State.OFFLINE


async def test_reconnect_interval_zero_gives_up_and_refuses_at_once(tmp_path):
    settings = settings_for(
        {
            "name": "once",
            "type": "serial",
            "path": str(tmp_path / "missing"),
            "acquire_timeout": 3600,
            "reconnect_interval": 0,
        }
    )
    async with running_proxy(settings) as running:
        await wait_for(running.devices["once"], lambda: running.devices["once"].state == State.OFFLINE)
        async with await connect(running, "once") as client:
            assert await receive_until_closed(client) == b""
        assert running.devices["once"].counters.refused["offline"] == 1


async def test_one_client_vanishing_mid_transfer_does_not_disturb_the_next(tcp_device):
    settings = settings_for({"name": "dev", "type": "tcp", "path": str(tcp_device.address)})
    async with running_proxy(settings) as running:
        device = running.devices["dev"]
        device_end = await tcp_device.next_connection()
        client = await connect(running, "dev")
        await wait_for(device, lambda: device.state == State.BUSY)
        client.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await client.aclose()
        await device_end.send_all(b"z" * 200_000)
        await wait_for(device, lambda: device.holder is None)
        async with await connect(running, "dev") as second:
            await second.send_all(b"ok?")
            assert await receive_exactly(device_end, 3) == b"ok?"


async def test_release_port_retries_the_open_while_a_client_waits(pty):
    settings = settings_for(
        {
            "name": "rp",
            "type": "serial",
            "path": str(pty.path),
            "release_port": True,
            "reconnect_interval": 0.02,
            "acquire_timeout": 30,
        }
    )
    async with running_proxy(settings) as running:
        device = running.devices["rp"]
        async with await connect(running, "rp") as client:
            await client.send_all(b"first")
            await wait_for(device, lambda: device.counters.link_opens == 0 and device.state == State.OFFLINE)
            device_end = pty.plug()
            assert await receive_exactly(device_end, 5) == b"first"


async def test_acquire_timeout_zero_takes_a_free_device_and_refuses_a_held_one():
    settings = settings_for(
        {"name": "reg", "type": "simulator", "protocol": "custom", "acquire_timeout": 0, "busy_reply": "15"}
    )
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "reg") as holder:
            await holder.send_all(bytes.fromhex("01 05 00 13 3F 42 0F 00 A8"))
            assert await receive_exactly(holder, 9) == bytes.fromhex("06 01 04 00 13 00 00 63 7A")
            async with await connect(running, "reg") as second:
                assert await receive_until_closed(second) == b"\x15"


async def test_a_client_that_half_closes_still_gets_the_answer(tcp_device):
    settings = settings_for({"name": "dev", "type": "tcp", "path": str(tcp_device.address)})
    async with running_proxy(settings) as running:
        device_end = await tcp_device.next_connection()
        async with await connect(running, "dev") as client:
            await client.send_all(b"request")
            await client.send_eof()
            assert await receive_exactly(device_end, 7) == b"request"
            await device_end.send_all(b"answer")
            assert await receive_until_closed(client) == b"answer"
