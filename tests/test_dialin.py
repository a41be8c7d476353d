"""Dial-in devices: a simulated GPRS modem connects, says its id, and answers like a meter."""

from __future__ import annotations

import contextlib
import socket
import sqlite3

import httpx
import pytest
import trio

from proxy.config import parse
from proxy.counters import ExchangeResult
from proxy.device import State
from proxy.dialin.identify import IdentifyFailed, parse_id
from proxy.simulators import serve_stream
from proxy.simulators.custom import CustomRegister
from proxy.status.snapshot import device_snapshot

from helpers import (
    WAIT_LIMIT,
    device_named,
    dialin_settings,
    meter,
    modem,
    online,
    receive_exactly,
    receive_until_closed,
    running_proxy,
    wait_for,
)


async def direct_client(device) -> trio.SocketStream:
    address = device.config.listen[0]
    return await trio.open_tcp_stream("127.0.0.1", address.port)


async def test_a_modem_registers_gets_a_direct_port_and_a_client_talks_to_its_meter(tmp_path):
    settings = dialin_settings(tmp_path)
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        link = await modem(running, b"METER0001\r\n")
        nursery.start_soon(meter, link)
        device = await device_named(running, "METER0001")
        await online(device)
        assert device.config.listen[0].port == running.registry.known["METER0001"].direct_port
        async with await direct_client(device) as client:
            await client.send_all(b"read energy")
            assert await receive_exactly(client, 15) == b"ANS:read energy"
        await link.aclose()


async def test_bytes_after_the_id_reach_the_first_client(tmp_path):
    settings = dialin_settings(tmp_path)
    async with running_proxy(settings) as running:
        link = await modem(running, b"METER0002\nHELLO FROM METER")
        device = await device_named(running, "METER0002")
        await online(device)
        async with await direct_client(device) as client:
            assert await receive_exactly(client, 16) == b"HELLO FROM METER"
        await link.aclose()


async def test_the_same_id_gets_the_same_port_after_a_restart(tmp_path):
    settings = dialin_settings(tmp_path)
    ports = []
    for _ in range(2):
        async with running_proxy(settings) as running:
            for identity in (b"A-1\n", b"B-2\n"):
                link = await modem(running, identity)
                device = await device_named(running, identity.strip().decode())
                await online(device)
                await link.aclose()
            ports.append({d.config.path: d.config.listen[0].port for d in running.devices.values()})
    assert ports[0] == ports[1]
    assert set(ports[0]) == {"A-1", "B-2"}


async def test_in_a_port_range_a_new_device_gets_the_lowest_port_no_registered_device_has(tmp_path):
    low, high = free_ports(3)
    settings = dialin_settings(tmp_path, direct_ports=f"{low}-{high}")
    ports = {}
    # One new device a run: the second run starts A-1 from the registry, and B-2 takes the next port.
    for identity in (b"A-1\n", b"B-2\n"):
        async with running_proxy(settings) as running:
            link = await modem(running, identity)
            await online(await device_named(running, identity.strip().decode()))
            await link.aclose()
            ports = {d.config.path: d.config.listen[0].port for d in running.devices.values()}
    assert ports == {"A-1": low, "B-2": low + 1}


async def test_a_registered_device_listens_while_offline_and_refuses_after_acquire_timeout(tmp_path):
    settings = dialin_settings(tmp_path, acquire_timeout=0.05, busy_reply="ee")
    async with running_proxy(settings) as running:
        link = await modem(running, b"OFFLINE1\n")
        device = await device_named(running, "OFFLINE1")
        await online(device)
        await link.aclose()
        with trio.fail_after(WAIT_LIMIT):
            while device.state != State.OFFLINE:
                await device.changed()
        async with await direct_client(device) as client:
            assert await receive_until_closed(client) == b"\xee"
        assert device.counters.refused["offline"] == 1


async def test_a_second_connection_with_the_same_id_replaces_the_first(tmp_path):
    settings = dialin_settings(tmp_path, acquire_timeout=10)
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        first = await modem(running, b"TWICE\n")
        device = await device_named(running, "TWICE")
        await online(device)
        second = await modem(running, b"TWICE\n")
        assert await receive_until_closed(first) == b""
        await first.aclose()
        nursery.start_soon(meter, second)
        async with await direct_client(device) as client:
            await client.send_all(b"who")
            assert await receive_exactly(client, 7) == b"ANS:who"
        assert device.counters.link_opens == 2
        await second.aclose()


async def test_a_device_that_says_nothing_is_closed_after_identify_timeout(tmp_path, log_lines):
    settings = dialin_settings(tmp_path, identify_timeout=0.1)
    async with running_proxy(settings) as running, await modem(running, b"") as silent:
        assert await receive_until_closed(silent) == b""
    assert any("did not identify within identify_timeout = 0.1 s" in line for line in log_lines)


async def test_a_failed_identification_logs_only_the_start_of_what_was_sent(tmp_path, log_lines):
    settings = dialin_settings(tmp_path)
    async with running_proxy(settings) as running, await modem(running, b"\x01" * 1000 + b"\n") as junk:
        assert await receive_until_closed(junk) == b""
    (line,) = [line for line in log_lines if "did not identify" in line]
    assert "... (1000 bytes) is no device id" in line
    assert len(line) < 1000  # not the ~4 KB of the whole line's repr and hex


async def test_an_unknown_id_is_refused_when_autoregister_is_off(tmp_path, log_lines):
    settings = dialin_settings(tmp_path, autoregister=False)
    async with running_proxy(settings) as running:
        async with await modem(running, b"STRANGER\n") as stranger:
            assert await receive_until_closed(stranger) == b""
        assert not running.devices
    assert any("STRANGER" in line and "autoregister = false" in line for line in log_lines)
    rows = sqlite3.connect(settings.dialin.registry).execute("SELECT COUNT(*) FROM devices").fetchone()
    assert rows == (0,)


async def test_a_silent_device_is_pinged_then_closed(tmp_path):
    settings = dialin_settings(tmp_path, ping_after=0.1, ping_bytes="50494e47", disconnect_after=0.3)
    async with running_proxy(settings) as running:
        link = await modem(running, b"QUIET\n")
        device = await device_named(running, "QUIET")
        assert await receive_exactly(link, 4) == b"PING"
        assert await receive_until_closed(link) == b""
        await link.aclose()
        with trio.fail_after(WAIT_LIMIT):
            while device.state != State.OFFLINE:
                await device.changed()


def free_ports(count: int) -> tuple[int, int]:
    """A direct_ports range of `count` ports that are free now (each one bound once to check)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            low = probe.getsockname()[1]
        if low + count > 65536:
            continue
        with contextlib.ExitStack() as probes:
            try:
                for port in range(low, low + count):
                    probes.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return low, low + count - 1


async def test_a_full_port_range_refuses_only_the_device_that_does_not_fit(tmp_path, log_lines):
    low, _ = free_ports(1)
    settings = dialin_settings(tmp_path, direct_ports=f"{low}-{low}")
    async with running_proxy(settings) as running:
        first = await modem(running, b"FITS\n")
        await online(await device_named(running, "FITS"))
        async with await modem(running, b"LATE\n") as late:
            assert await receive_until_closed(late) == b""
        assert [d.config.path for d in running.devices.values()] == ["FITS"]
        await first.aclose()
    assert any(f"direct_ports {low}-{low} are all taken; LATE gets no port" in line for line in log_lines)


@pytest.mark.parametrize(
    ("keys", "data", "expected"),
    [
        ({"identify": "line"}, b"  ID42 \r\nrest", ("ID42", b"rest")),
        ({"identify": "regex", "identify_pattern": r"IMEI:(\d+);"}, b"xxIMEI:351234;yy", ("351234", b"yy")),
        ({"identify": "fixed", "identify_length": 4}, b"ABCDrest", ("ABCD", b"rest")),
        ({"identify": "fixed", "identify_length": 2}, b"\x01\x02rest", ("0102", b"rest")),
        ({"identify": "iec61107"}, b"/EKT5CE308 SN0123456789\r\nX", ("0123456789", b"X")),
        ({"identify": "iec61107"}, b"/EKT5CE301v12\r\n", ("CE301v12", b"")),
    ],
)
def test_each_identify_method_finds_the_id_and_keeps_the_rest(tmp_path, keys, data, expected):
    config = dialin_settings(tmp_path, **keys).dialin
    assert parse_id(config, data[:1]) is None or (keys.get("identify") == "fixed" and len(data) < 2)
    assert parse_id(config, data) == expected


def test_a_line_that_is_no_id_fails_with_what_was_sent(tmp_path):
    config = dialin_settings(tmp_path).dialin
    with pytest.raises(IdentifyFailed, match="no device id"):
        parse_id(config, b"two words\n")


async def test_devices_beyond_max_devices_are_refused_with_a_log_line_and_take_no_port(tmp_path, log_lines):
    low, high = free_ports(2)
    settings = dialin_settings(tmp_path, max_devices=1, direct_ports=f"{low}-{high}")
    async with running_proxy(settings) as running:
        first = await modem(running, b"ONE\n")
        await online(await device_named(running, "ONE"))
        async with await modem(running, b"TWO\n") as second:
            assert await receive_until_closed(second) == b""
        assert list(running.registry.known) == ["ONE"]
        await first.aclose()
    assert any("refused: max_devices = 1 connected" in line for line in log_lines)


async def test_the_status_api_shows_a_dialin_device_with_its_peer(tmp_path):
    settings = dialin_settings(tmp_path)
    settings = parse({"proxy": {"status": "127.0.0.1:0"}, "dialin": {**_raw_dialin(settings)}})
    async with running_proxy(settings) as running:
        link = await modem(running, b"SHOWN\n")
        device = await device_named(running, "SHOWN")
        await online(device)
        shown = device_snapshot(*running.devices_and_addresses()[device.name])
        assert shown["type"] == "dialin" and shown["state"] == "idle"
        assert shown["path"] == f"127.0.0.1:{link.socket.getsockname()[1]}"
        await link.aclose()


def _raw_dialin(settings) -> dict:
    dialin = settings.dialin
    return {
        "listen": ["127.0.0.1:0"],
        "registry": dialin.registry,
        "direct_ports": "any",
        "ping_after": 0,
    }


async def test_a_dialin_register_is_shared_request_by_request(tmp_path):
    settings = dialin_settings(tmp_path, protocol="custom", sharing="exchange")
    beep, answer = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8"), bytes.fromhex("06 01 04 00 13 00 00 63 7A")
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        link = await modem(running, b"REGISTER7\n")
        nursery.start_soon(serve_stream, link, CustomRegister())
        device = await device_named(running, "REGISTER7")
        await online(device)
        async with await direct_client(device) as first, await direct_client(device) as second:
            await first.send_all(beep)
            await second.send_all(beep)
            assert await receive_exactly(first, 9) == answer
            assert await receive_exactly(second, 9) == answer
        assert device.counters.exchanges[ExchangeResult.OK] == 2
        nursery.cancel_scope.cancel()
    await link.aclose()


async def test_connections_with_one_id_at_once_end_with_the_newest_attached_and_the_device_online(tmp_path):
    settings = dialin_settings(tmp_path, acquire_timeout=10)
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        links = [await modem(running, b"SAMEID\n") for _ in range(5)]
        device = await device_named(running, "SAMEID")
        # Every older connection is closed; the newest stays and serves.
        for older in links[:-1]:
            with trio.fail_after(WAIT_LIMIT):
                assert await receive_until_closed(older) == b""
        await online(device)
        nursery.start_soon(meter, links[-1])
        async with await direct_client(device) as client:
            await client.send_all(b"who")
            assert await receive_exactly(client, 7) == b"ANS:who"
        assert device.peer == f"127.0.0.1:{links[-1].socket.getsockname()[1]}"
        assert [d.config.path for d in running.devices.values()] == ["SAMEID"]
        for link in links:
            await link.aclose()


async def test_connections_still_identifying_count_against_max_devices(tmp_path, log_lines):
    settings = dialin_settings(tmp_path, max_devices=2, identify_timeout=30)
    async with running_proxy(settings) as running:
        silent = [await modem(running, b"") for _ in range(2)]
        async with await modem(running, b"THIRD\n") as third:
            assert await receive_until_closed(third) == b""
        for link in silent:
            await link.aclose()
    assert any("refused: max_devices = 2 connected" in line for line in log_lines)


async def test_a_pings_answer_never_reaches_a_client_that_takes_the_device_just_after(tmp_path):
    settings = dialin_settings(tmp_path, ping_after=0.05, ping_bytes="50494e47", acquire_timeout=30)
    async with running_proxy(settings) as running:
        link = await modem(running, b"PINGED\n")
        device = await device_named(running, "PINGED")
        assert await receive_exactly(link, 4) == b"PING"
        async with await direct_client(device) as client:
            await client.send_all(b"mine")
            await wait_for(device, lambda: device.waiting == 1)
            # The ping holds the device like an exchange until its answer is over (frame_gap of silence).
            await link.send_all(b"PONG")
            assert await receive_exactly(link, 4) == b"mine"
            await link.send_all(b"yours")
            assert await receive_exactly(client, 5) == b"yours"
        assert device.counters.discarded_bytes == 4
        await link.aclose()


async def test_the_registry_leaves_no_shared_memory_file_beside_it(tmp_path):
    settings = dialin_settings(tmp_path)
    async with running_proxy(settings) as running:
        link = await modem(running, b"NOSHM\n")
        await online(await device_named(running, "NOSHM"))
        await link.aclose()
        assert not (tmp_path / "registry.sqlite3-shm").exists()


async def test_ids_that_clash_with_names_or_hold_a_slash_stay_apart_and_reachable(tmp_path):
    settings = parse(
        {
            "proxy": {"status": "127.0.0.1:0"},
            "dialin": _raw_dialin(dialin_settings(tmp_path)),
            "device": [{"name": "good", "type": "simulator", "protocol": "custom", "listen": ["127.0.0.1:0"]}],
        }
    )
    async with running_proxy(settings) as running:
        links = [await modem(running, identity) for identity in (b"dialin-good\n", b"good\n", b"../odd\n")]
        devices = [await device_named(running, identity) for identity in ("dialin-good", "good", "../odd")]
        assert len({device.name for device in devices} | {"good"}) == 4
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://{running.status}/api/devices/..%2Fodd")
        assert response.status_code == 200 and response.json()["path"].startswith("127.0.0.1:")
        for link in links:
            await link.aclose()
