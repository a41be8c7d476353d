"""Exchange sharing writes the next request before it passes an answer's last bytes on: what that order
must not break.

The answer's last bytes are held back (a monkeypatched Client.send that waits for the test) while the
next exchange runs: they still reach their client, whole and in order, when the next request's write
stalls and the link is reset, when their client resets its connection, or when the next client leaves;
the device is owed its replies before it gets the next request; the clock still times out a device that
never answers the next request.
"""

from __future__ import annotations

import struct
import termios

import trio

from proxy import clients
from proxy.counters import ExchangeResult
from proxy.protocols import shtrih

from helpers import (
    BEEP,
    BEEP_ANSWER,
    connect,
    receive_exactly,
    reset_on_close,
    running_proxy,
    settings_for,
    wait_for,
)

H = bytes.fromhex
PATIENT = {"response_timeout": 60, "exchange_timeout": 120, "acquire_timeout": 60}
SHTRIH_REQUEST = shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", 30))
SHTRIH_ANSWER = shtrih.build_frame(shtrih.SHORT_STATUS, bytes(16))


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


class HeldBack:
    """Client.send, patched: the chunk for client `name` that ends with `tail` waits for release()."""

    def __init__(self, monkeypatch, tail: bytes) -> None:
        self.name: str | None = None
        self.tail = tail
        self.reached = trio.Event()
        self._released = trio.Event()
        original = clients.Client.send

        async def send(client: clients.Client, data: bytes) -> bool:
            if client.name == self.name and data.endswith(tail) and not self._released.is_set():
                self.reached.set()
                await self._released.wait()
            return await original(client, data)

        monkeypatch.setattr(clients.Client, "send", send)

    def release(self) -> None:
        self._released.set()


async def a_holds_b_waits(running, device, device_end, request: bytes):
    """Client A's request is at the device, B's queued behind it; returns (a, b)."""
    a = await connect(running, "dev")
    await a.send_all(request)
    assert await receive_exactly(device_end, len(request)) == request
    b = await connect(running, "dev")
    await b.send_all(request)
    await wait_for(device, lambda: device.waiting == 1)
    return a, b


async def test_a_device_that_takes_no_next_request_still_lets_the_last_bytes_reach_their_client(pty, monkeypatch):
    # A's last bytes wait behind B's request, which the device does not take (its side stopped the
    # line): the link is reset at response_timeout, and A must still get its whole answer.
    held = HeldBack(monkeypatch, BEEP_ANSWER[1:])
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "custom", response_timeout=0.2))) as running:
        device = running.devices["dev"]
        a, b = await a_holds_b_waits(running, device, device_end, BEEP)
        held.name = device.holder
        termios.tcflow(pty._slave, termios.TCOOFF)
        await device_end.send_all(BEEP_ANSWER)
        await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.TIMEOUT] == 1)
        held.release()
        assert await receive_exactly(a, len(BEEP_ANSWER)) == BEEP_ANSWER
        await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.OK] == 1)
        termios.tcflow(pty._slave, termios.TCOON)
        # A stays served: its next request goes once the link is back.
        device_end = pty.plug()
        await a.send_all(BEEP)
        assert await receive_exactly(device_end, len(BEEP)) == BEEP
        await device_end.send_all(BEEP_ANSWER)
        assert await receive_exactly(a, len(BEEP_ANSWER)) == BEEP_ANSWER
        await a.aclose()
        await b.aclose()


async def test_a_client_that_resets_with_its_last_bytes_pending_crosses_nothing_into_the_next(pty, monkeypatch):
    held = HeldBack(monkeypatch, BEEP_ANSWER[1:])
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "custom"))) as running:
        device = running.devices["dev"]
        a, b = await a_holds_b_waits(running, device, device_end, BEEP)
        held.name = device.holder
        await device_end.send_all(BEEP_ANSWER)
        # B's request leaves while A's last bytes wait; the device ACKs it at once.
        assert await receive_exactly(device_end, len(BEEP)) == BEEP
        await held.reached.wait()
        await device_end.send_all(BEEP_ANSWER[:1])
        reset_on_close(a)
        await a.aclose()
        await wait_for(device, lambda: device.clients == 1)
        held.release()
        await device_end.send_all(BEEP_ANSWER[1:])
        assert await receive_exactly(b, len(BEEP_ANSWER)) == BEEP_ANSWER
        await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.OK] == 1)
        assert device.counters.exchanges[ExchangeResult.CLIENT_GONE] == 1
        await b.aclose()


async def test_the_next_client_leaving_before_its_answer_while_the_last_bytes_wait(pty, monkeypatch):
    held = HeldBack(monkeypatch, BEEP_ANSWER[1:])
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "custom"))) as running:
        device = running.devices["dev"]
        a, b = await a_holds_b_waits(running, device, device_end, BEEP)
        held.name = device.holder
        await device_end.send_all(BEEP_ANSWER)
        assert await receive_exactly(device_end, len(BEEP)) == BEEP
        await held.reached.wait()
        reset_on_close(b)
        await b.aclose()
        await wait_for(device, lambda: device.clients == 1)
        held.release()
        assert await receive_exactly(a, len(BEEP_ANSWER)) == BEEP_ANSWER
        # B's answer, when it comes, settles the device and reaches nobody; C's request goes after it.
        c = await connect(running, "dev")
        await c.send_all(BEEP)
        await wait_for(device, lambda: device.waiting == 1)
        await device_end.send_all(BEEP_ANSWER)
        assert await receive_exactly(device_end, len(BEEP)) == BEEP
        await device_end.send_all(BEEP_ANSWER)
        assert await receive_exactly(c, len(BEEP_ANSWER)) == BEEP_ANSWER
        await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.OK] == 2)
        assert device.counters.exchanges[ExchangeResult.CLIENT_GONE] == 1
        await a.aclose()
        await c.aclose()


async def test_the_device_gets_the_ack_owed_for_an_absent_client_before_the_next_request(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(exchange_device(pty, "shtrih"))) as running:
        device = running.devices["dev"]
        a, b = await a_holds_b_waits(running, device, device_end, SHTRIH_REQUEST)
        reset_on_close(a)
        await a.aclose()
        await wait_for(device, lambda: device.clients == 1)
        await device_end.send_all(H("06") + SHTRIH_ANSWER)
        assert await receive_exactly(device_end, 1 + len(SHTRIH_REQUEST)) == H("06") + SHTRIH_REQUEST
        await device_end.send_all(H("06") + SHTRIH_ANSWER)
        assert await receive_exactly(b, 1 + len(SHTRIH_ANSWER)) == H("06") + SHTRIH_ANSWER
        await b.send_all(H("06"))
        assert await receive_exactly(device_end, 1) == H("06")
        await b.aclose()


async def test_a_device_that_never_answers_the_next_request_times_out_after_the_slow_client(pty, monkeypatch):
    held = HeldBack(monkeypatch, BEEP_ANSWER[1:])
    device_end = pty.plug()
    quick = {"response_timeout": 0.05, "exchange_timeout": 0.1}
    async with running_proxy(settings_for(exchange_device(pty, "custom", **quick))) as running:
        device = running.devices["dev"]
        a, b = await a_holds_b_waits(running, device, device_end, BEEP)
        held.name = device.holder
        await device_end.send_all(BEEP_ANSWER)
        assert await receive_exactly(device_end, len(BEEP)) == BEEP
        await held.reached.wait()
        await trio.sleep(0.3)  # the condition under test: A slow beyond exchange_timeout, not a wait
        assert device.counters.exchanges[ExchangeResult.TIMEOUT] == 0
        held.release()
        assert await receive_exactly(a, len(BEEP_ANSWER)) == BEEP_ANSWER
        await wait_for(device, lambda: device.counters.exchanges[ExchangeResult.TIMEOUT] == 1)
        await a.send_all(BEEP)
        assert await receive_exactly(device_end, len(BEEP)) == BEEP
        await a.aclose()
        await b.aclose()
