"""A device's recent history and its live traffic: the bounded event ring, the bounded subscriber queues,
and both through the status server's API on real sockets."""

from __future__ import annotations

import pytest
import trio
from http_client import event_stream, get

from proxy import events
from proxy.device import State
from proxy.events import DEVICE_EVENTS, DIALIN_EVENTS, Direction, EventRing, Kind, Subscriber, Traffic, TrafficLine
from proxy.status import server
from proxy.status.server import _events

from helpers import (
    BEEP,
    BEEP_ANSWER,
    connect,
    device_named,
    dialin_settings,
    logged,
    modem,
    online,
    receive_exactly,
    receive_until_closed,
    reset_on_close,
    running_proxy,
    settings_for,
    wait_for,
)

REGISTER = {"name": "reg", "type": "simulator", "protocol": "custom", "acquire_timeout": 0.05, "busy_reply": "15"}


# -- the ring -----------------------------------------------------------------------------------------


def test_the_ring_keeps_the_last_events_oldest_first_and_is_made_at_the_first():
    ring = EventRing(3)
    assert ring.recent() == [] and ring._events is None
    for number in range(5):
        ring.record(Kind.CONNECT, f"#{number}")
    assert [event.detail for event in ring.recent()] == ["#2", "#3", "#4"]
    assert len(ring._events) == 3


def test_dialin_devices_keep_a_small_ring_and_configured_devices_200():
    from proxy.config import DialinConfig
    from proxy.device import Device

    dialin = DialinConfig()
    dialin_device = Device(dialin.device_config("M1", "M1", 7500), dialin)
    configured = Device(settings_for(REGISTER).devices[0])
    assert (dialin_device.events.capacity, configured.events.capacity) == (DIALIN_EVENTS, DEVICE_EVENTS) == (20, 200)
    assert dialin_device.events.recent() == [] and dialin_device.traffic is None


# -- subscribers ----------------------------------------------------------------------------------------


def line(number: int) -> TrafficLine:
    return TrafficLine(0.0, Direction.TO_DEVICE, "client", bytes([number % 256]), 1)


async def test_a_subscriber_that_falls_behind_drops_lines_and_is_told_how_many():
    subscriber = Subscriber()
    for number in range(events.SUBSCRIBER_LINES + 7):
        subscriber.offer(line(number))  # never waits: the byte path calls it
    lines, dropped = await subscriber.take()
    assert len(lines) == events.SUBSCRIBER_LINES and dropped == 7
    assert lines[0] == line(0)
    subscriber.offer(line(1))
    assert await subscriber.take() == ([line(1)], 0)


def test_dropped_lines_are_said_after_the_lines_that_came_before_them():
    text = _events([line(0x41)], 3).decode()
    traffic, dropped = text.split("\n\n")[:2]
    assert traffic.startswith("event: traffic\ndata: {") and '"hex": "41"' in traffic and '"text": "A"' in traffic
    assert dropped == 'event: dropped\ndata: {"dropped": 3}'


class Watched:
    def __init__(self) -> None:
        self.traffic: Traffic | None = None
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


def test_a_device_has_traffic_only_while_someone_watches_and_at_most_max_subscribers():
    device = Watched()
    with events.subscribed(device) as first:
        assert device.traffic is not None and device.traffic.subscribers == [first]
        others = [events.subscribed(device) for _ in range(events.MAX_SUBSCRIBERS - 1)]
        for other in others:
            other.__enter__()
        with pytest.raises(events.TooManySubscribers), events.subscribed(device):
            pass
        for other in others:
            other.__exit__(None, None, None)
    assert device.traffic is None and device.notified == 2 * events.MAX_SUBSCRIBERS


def test_a_traffic_line_keeps_the_head_of_a_big_chunk_and_its_size():
    traffic = Traffic()
    subscriber = Subscriber()
    traffic.subscribers.append(subscriber)
    traffic.publish(Direction.FROM_DEVICE, None, bytearray(b"x" * 70_000))
    (kept,) = subscriber._lines
    assert kept.data == b"x" * events.LINE_BYTES and kept.size == 70_000 and isinstance(kept.data, bytes)


# -- through the proxy ----------------------------------------------------------------------------------


async def test_the_events_api_lists_connects_leases_refusals_and_link_opens():
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0")) as running:
        device = running.devices["reg"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "reg") as holder:
            await wait_for(device, lambda: device.state == State.BUSY)
            async with await connect(running, "reg") as refused:
                other = f"127.0.0.1:{refused.socket.getsockname()[1]}"
                assert await receive_until_closed(refused) == b"\x15"
            name = f"127.0.0.1:{holder.socket.getsockname()[1]}"
        await wait_for(device, lambda: device.clients == 0)
        listed = (await get(running.status, "/api/devices/reg/events")).json()
    kinds = [(event["event"], event["client"]) for event in listed]
    assert kinds == [
        ("link_open", None),
        ("connect", name),
        ("lease", name),
        ("connect", other),
        ("refused", other),
        ("release", name),
        ("disconnect", name),
    ]
    assert listed[4]["detail"] == f"busy: held by {name}"
    assert listed[2]["seconds"] >= 0 and listed[0]["at"].endswith("Z")


async def test_exchanges_are_events_with_their_result_and_duration():
    settings = settings_for({**REGISTER, "sharing": "exchange"}, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        async with await connect(running, "reg") as client:
            await client.send_all(BEEP)
            assert await receive_exactly(client, 9) == BEEP_ANSWER
            await wait_for(device, lambda: device.counters.exchanges)
            name = f"127.0.0.1:{client.socket.getsockname()[1]}"
        exchange = [event for event in device.events.recent() if event.kind == Kind.EXCHANGE]
    assert [(event.client, event.detail) for event in exchange] == [(name, "ok")]
    assert exchange[0].seconds > 0


async def test_link_losses_and_failed_opens_are_events_said_once_while_they_repeat(tcp_device, tmp_path):
    settings = settings_for(
        {"name": "dev", "type": "tcp", "path": str(tcp_device.address), "reconnect_interval": 0.01},
        {"name": "absent", "type": "serial", "path": str(tmp_path / "ttyNONE"), "reconnect_interval": 0.01},
    )
    async with running_proxy(settings) as running:
        device, absent = running.devices["dev"], running.devices["absent"]
        await (await tcp_device.next_connection()).aclose()
        await wait_for(device, lambda: device.counters.link_losses == 1)
        await tcp_device.next_connection()
        await wait_for(absent, lambda: absent.last_error is not None)
        first_error = absent.last_error
        # The open keeps failing every 10 ms: the ring says it once, the last error keeps its latest time.
        await wait_for(absent, lambda: absent.last_error != first_error)
        assert [event.kind for event in device.events.recent()] == [Kind.LINK_OPEN, Kind.LINK_LOST, Kind.LINK_OPEN]
        assert device.events.recent()[1].detail == "end of file"
        assert [event.kind for event in absent.events.recent()] == [Kind.OPEN_FAILED]


async def test_live_traffic_streams_hex_and_text_with_direction_and_client():
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0")) as running:
        device = running.devices["reg"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with event_stream(running.status, "/api/devices/reg/traffic") as stream:
            assert stream.status_code == 200
            await wait_for(device, lambda: device.traffic is not None)
            async with await connect(running, "reg") as client:
                await client.send_all(BEEP)
                assert await receive_exactly(client, 9) == BEEP_ANSWER
                name = f"127.0.0.1:{client.socket.getsockname()[1]}"
            to_device = await stream.next()
            answer = [await stream.next()]
            while sum(event[1]["size"] for event in answer) < 9:
                answer.append(await stream.next())
        await wait_for(device, lambda: device.traffic is None)  # the view ended when the browser left
    assert to_device[0] == "traffic"
    assert to_device[1] | {"at": None} == {
        "at": None,
        "direction": "to_device",
        "client": name,
        "size": 9,
        "hex": "01 05 00 13 3f 42 0f 00 a8",
        "text": "....?B...",
    }
    assert {event[1]["direction"] for event in answer} == {"from_device"}
    assert {event[1]["client"] for event in answer} == {name}
    assert " ".join(event[1]["hex"] for event in answer) == BEEP_ANSWER.hex(" ")


async def test_a_view_that_never_reads_costs_the_byte_path_nothing(tcp_device):
    settings = settings_for({"name": "echo", "type": "tcp", "path": str(tcp_device.address)})
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        device = running.devices["echo"]
        device_end = await tcp_device.next_connection()

        async def echo() -> None:
            while data := await device_end.receive_some():
                await device_end.send_all(data)

        nursery.start_soon(echo)
        rounds = events.SUBSCRIBER_LINES
        with events.subscribed(device) as subscriber:
            async with await connect(running, "echo") as client:
                for number in range(rounds):
                    await client.send_all(b"%05d" % number)
                    assert await receive_exactly(client, 5) == b"%05d" % number
            lines, dropped = await subscriber.take()
        nursery.cancel_scope.cancel()
    # Every round trip was answered at once; the view kept what it could hold and counted the rest.
    assert len(lines) == events.SUBSCRIBER_LINES and dropped >= rounds
    assert device.traffic is None


async def test_more_live_views_than_allowed_are_refused(monkeypatch):
    monkeypatch.setattr(events, "MAX_SUBSCRIBERS", 1)
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0")) as running:
        device = running.devices["reg"]
        async with event_stream(running.status, "/api/devices/reg/traffic") as first:
            assert first.status_code == 200
            await wait_for(device, lambda: device.traffic is not None)
            async with event_stream(running.status, "/api/devices/reg/traffic") as second:
                assert second.status_code == 503
        await wait_for(device, lambda: device.traffic is None)
        async with event_stream(running.status, "/api/devices/reg/traffic") as again:
            assert again.status_code == 200


async def test_a_dialin_device_records_its_connections_by_peer(tmp_path):
    settings = dialin_settings(tmp_path)
    async with running_proxy(settings) as running:
        link = await modem(running, b"RING1\n")
        device = await device_named(running, "RING1")
        await online(device)
        peer = f"127.0.0.1:{link.socket.getsockname()[1]}"
        await link.aclose()
        await wait_for(device, lambda: device.state == State.OFFLINE)
    recent = [(event.kind, event.detail) for event in device.events.recent()]
    assert recent == [(Kind.LINK_OPEN, f"from {peer}"), (Kind.LINK_LOST, "end of file")]
    assert device.last_error is not None and device.last_error[1] == "end of file"


async def test_a_viewer_that_resets_its_connection_leaves_quietly(log_lines):
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0")) as running:
        device = running.devices["reg"]
        async with event_stream(running.status, "/api/devices/reg/traffic") as stream:
            assert stream.status_code == 200
            await wait_for(device, lambda: device.traffic is not None)
            reset_on_close(stream.stream)
        await logged("a live view's client left", log_lines)
        await wait_for(device, lambda: device.traffic is None)
        assert (await get(running.status, "/healthz")).text == "ok\n"
    assert not [line for line in log_lines if line.startswith(("ERROR", "WARNING"))]


async def views_at_once(address, count: int) -> list[bytes]:
    """`count` requests for reg's live traffic, all sent before any answer is read; each answer's status."""
    request = f"GET /api/devices/reg/traffic HTTP/1.1\r\nHost: {address}\r\n\r\n".encode()
    streams = [await trio.open_tcp_stream(address.host, address.port) for _ in range(count)]
    for stream in streams:
        await stream.send_all(request)
    statuses = []
    for stream in streams:
        head = b""
        while b"\r\n" not in head:
            head += await receive_exactly(stream, 1)
        statuses.append(head.split(b" ")[1])
    for stream in streams:
        await stream.aclose()
    return statuses


@pytest.mark.parametrize("cap", ["MAX_STREAMS", "MAX_SUBSCRIBERS"])
async def test_views_asked_for_at_once_are_admitted_up_to_the_cap(monkeypatch, cap):
    monkeypatch.setattr(server if cap == "MAX_STREAMS" else events, cap, 2)
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0")) as running:
        device = running.devices["reg"]
        statuses = await views_at_once(running.status, 8)
        assert sorted(statuses) == [b"200"] * 2 + [b"503"] * 6
        # Every view is released when it ends: as many are admitted again.
        await wait_for(device, lambda: device.traffic is None)
        assert sorted(await views_at_once(running.status, 3)) == [b"200", b"200", b"503"]
