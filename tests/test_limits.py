"""Bounds a peer cannot push the proxy past: memory for a client that never pauses, descriptors over
thousands of connections."""

from __future__ import annotations

import os

import trio

from proxy.counters import ExchangeResult
from proxy.device import State

from helpers import connect, receive_exactly, running_proxy, settings_for, wait_for


async def test_a_raw_client_that_never_pauses_is_passed_on_in_max_message_pieces(pty):
    device_end = pty.plug()
    settings = settings_for(
        {
            "name": "raw",
            "type": "serial",
            "path": str(pty.path),
            "sharing": "exchange",
            "max_message": 4096,
            "frame_gap": 0.05,
            "response_timeout": 0.01,
        }
    )
    flood = os.urandom(200_000)
    async with running_proxy(settings) as running:
        device = running.devices["raw"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "raw") as client, trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, flood)
            # Every byte arrives, in order, as requests of at most max_message bytes: the proxy never held
            # more than that of the client's message, however long it went on without a pause.
            assert await receive_exactly(device_end, len(flood)) == flood
        assert device.counters.leases_granted >= len(flood) // 4096
        await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.TIMEOUT] >= len(flood) // 4096)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_connections_leave_no_descriptor_behind():
    settings = settings_for(
        {"name": "reg", "type": "simulator", "protocol": "custom"},
        {"name": "ecr", "type": "simulator", "protocol": "custom", "sharing": "exchange"},
    )
    beep = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")
    async with running_proxy(settings) as running:
        await wait_for(running.devices["ecr"], lambda: running.devices["ecr"].state == State.IDLE)
        before = open_descriptors()
        for number in range(1000):
            name = ("reg", "ecr")[number % 2]
            async with await connect(running, name) as client:
                if number % 3:
                    await client.send_all(beep)
                    assert await receive_exactly(client, 9) == bytes.fromhex("06 01 04 00 13 00 00 63 7A")
        for device in running.devices.values():
            await wait_for(device, lambda device=device: device.clients == 0 and device.holder is None)
        assert open_descriptors() == before
