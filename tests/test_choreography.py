"""Every protocol's host choreography, cut at every step: the device is never held beyond its exchange.

A client plays the protocol's part of a host with a simulated device behind the proxy, and resets its
connection right after sending step k (for every k); the next client then plays the whole choreography
and must get every answer it expects at once. exchange_timeout is 60 s: a device held until then, or
left in the middle of an exchange (a Shtrih answer pending, an ATOL v2 turn open, an IEC session on),
fails the next client. A property test then has clients leave inside a request, at any byte, after
whole choreographies.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import protocols
from proxy.app import Running
from proxy.config import Address
from proxy.protocols import Control, Frame, atol2, atol3, coges, custom, dle, iec61107, shtrih
from proxy.protocols import energomera_ce as ce
from proxy.simulators import serve_tcp
from proxy.simulators.base import Faults

from helpers import WAIT_LIMIT, connect, reset_on_close, running_proxy, settings_for

H = bytes.fromhex
SIMULATOR_DROPS_WITHIN = 0.3  # seconds: six times the simulators' byte timeout
ACK, NAK, ENQ, EOT = 0x06, 0x15, 0x05, 0x04
# What a step expects back: a control byte, or a frame ("frame").
Expected = list[int | str]
Step = tuple[bytes, Expected]

ATOL3_SYNC = bytes((atol3.ADD, 0x01, 7, 0, 0, 0x47))
ATOL3_ASYNC = bytes((atol3.ADD, 0x01 | atol3.ASYNC_FLAG, 8, 0, 0, 0x47))
CE_REQUEST = ce.build(ce.Packet(46950, ce.HOST_ADDRESS, ce.DEFAULT_PASSWORD, True, 5, ce.READ_SERIAL, b"\x00"))

CHOREOGRAPHIES: dict[str, tuple[str, list[Step]]] = {
    "custom": ("custom", [(custom.build_frame(0x13, custom.password_bytes()), [ACK, "frame"])]),
    "shtrih": (
        "shtrih",
        [
            (bytes((ENQ,)), [NAK]),
            (shtrih.build_frame(shtrih.SHORT_STATUS, struct.pack("<I", 30)), [ACK, "frame"]),
            (bytes((ACK,)), []),
        ],
    ),
    "atol2": (
        "atol2",
        [
            (bytes((ENQ,)), [ACK]),
            (atol2.build_frame(H("00 00 47")), [ACK]),
            (bytes((EOT,)), [ENQ]),
            (bytes((ACK,)), ["frame"]),
            (bytes((ACK,)), [EOT]),
        ],
    ),
    "atol3": (
        "atol3",
        [
            (atol3.build_packet(0, ATOL3_SYNC), ["frame"]),
            (atol3.build_packet(1, bytes((atol3.ACK_RESULT, 7))), ["frame"]),
        ],
    ),
    "atol3-async": (
        "atol3",
        [
            (atol3.build_packet(0, ATOL3_ASYNC), ["frame", "frame"]),
            (atol3.build_packet(1, bytes((atol3.ACK_RESULT, 8))), ["frame"]),
        ],
    ),
    "dle": ("dle", [(dle.build_frame(1, 1, dle.KEYBOARD, b"\x01"), [ACK])]),
    "coges": ("coges", [(coges.build_frame(coges.key_payload("5")), ["frame"])]),
    "energomera-ce": ("energomera-ce", [(CE_REQUEST, ["frame"])]),
    "iec61107": (
        "iec61107",
        [
            (b"/?!\r\n", ["frame"]),
            (b"\x06051\r\n", ["frame"]),
            (iec61107.command("P1", "(777777)"), [ACK]),
            (iec61107.command("R1", "VOLTA()"), ["frame"]),
            (iec61107.command("B0"), []),
        ],
    ),
    "iec61107-readout": ("iec61107", [(b"/?!\r\n", ["frame"]), (b"\x06050\r\n", ["frame"])]),
}
CASES = [
    (name, sharing, cut)
    for name, (_, steps) in CHOREOGRAPHIES.items()
    for sharing in ("exchange", "session")
    for cut in range(len(steps))
]


def device_framer(protocol: str):
    if protocol == "custom":
        return custom.Framer(from_device=True)
    if protocol == "iec61107":
        return iec61107.Framer(from_host=False)
    return {"shtrih": shtrih, "atol2": atol2, "atol3": atol3, "dle": dle, "coges": coges, "energomera-ce": ce}[
        protocol
    ].Framer()


async def play(stream: trio.SocketStream, protocol: str, steps: list[Step]) -> None:
    """Sends each step and checks that exactly what it expects comes back."""
    framer = device_framer(protocol)
    received: list = []
    for request, expected in steps:
        await stream.send_all(request)
        with trio.fail_after(WAIT_LIMIT):
            while len(received) < len(expected):
                data = await stream.receive_some()
                assert data, f"connection closed before {expected} for {request!r}"
                received += framer.feed(data)
        got = [event.byte if isinstance(event, Control) else "frame" for event in received[: len(expected)]]
        assert all(isinstance(event, (Control, Frame)) for event in received[: len(expected)])
        assert got == expected, f"after {request!r}: {got} instead of {expected}"
        received = received[len(expected) :]
    assert not received, f"more than the choreography: {received}"


@asynccontextmanager
async def device_behind_proxy(protocol: str, sharing: str) -> AsyncIterator[Running]:
    """The protocol's simulator (answering at once) behind a proxy whose timeouts are all 60 s."""
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(serve_tcp, protocol, Address("127.0.0.1", 0), Faults(reaction_time=0))
        device_address = ready.rsplit(" ", 1)[1]
        settings = settings_for(
            {
                "name": "dev",
                "type": "tcp",
                "path": device_address,
                "protocol": protocol,
                "sharing": sharing,
                "response_timeout": 60,
                "exchange_timeout": 60,
                "acquire_timeout": 60,
            }
        )
        async with running_proxy(settings) as running:
            yield running
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("name", "sharing", "cut"), CASES)
async def test_a_client_that_resets_at_any_step_leaves_the_device_free_for_the_next(name, sharing, cut):
    protocol, steps = CHOREOGRAPHIES[name]
    async with device_behind_proxy(protocol, sharing) as running:
        leaving = await connect(running, "dev")
        await play(leaving, protocol, steps[:cut])
        await leaving.send_all(steps[cut][0])
        reset_on_close(leaving)
        await leaving.aclose()
        async with await connect(running, "dev") as next_client:
            await play(next_client, protocol, steps)


@pytest.mark.parametrize("sharing", ["exchange", "session"])
@pytest.mark.parametrize("name", list(CHOREOGRAPHIES))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, 99), st.integers(1, 999)), min_size=1, max_size=2))
async def test_clients_that_leave_mid_byte_after_complete_exchanges_never_hold_the_device(
    name, sharing, cuts, monkeypatch
):
    """Each client plays the whole choreography, then part of the next run up to a byte inside a step,
    and resets; every next client's whole choreography must go through at once.

    A request left unfinished holds the device in session sharing until the device has dropped it: the
    simulators drop a partial frame after 50 ms of silence, so the proxy is told the device's byte
    timeout is 0.3 s (a real device's is up to 1.5 s) to keep the test short.
    """
    protocol, steps = CHOREOGRAPHIES[name]
    monkeypatch.setattr(protocols.get(protocol), "request_byte_timeout", SIMULATOR_DROPS_WITHIN)
    async with device_behind_proxy(protocol, sharing) as running:
        for step_index, byte_index in cuts:
            cut = step_index % len(steps)
            request = steps[cut][0]
            leaving = await connect(running, "dev")
            await play(leaving, protocol, steps)
            await play(leaving, protocol, steps[:cut])
            await leaving.send_all(request[: 1 + byte_index % len(request)])
            reset_on_close(leaving)
            await leaving.aclose()
        async with await connect(running, "dev") as next_client:
            await play(next_client, protocol, steps)
