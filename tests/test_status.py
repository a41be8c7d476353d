"""The status server through a real socket: the page, the JSON API, metrics, token, bad requests."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from proxy.device import State
from proxy.status.snapshot import FIELDS

from helpers import connect, logged, receive_exactly, receive_until_closed, running_proxy, settings_for, wait_for

BEEP = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")
BEEP_ANSWER = bytes.fromhex("06 01 04 00 13 00 00 63 7A")
REGISTER = {"name": "reg", "type": "simulator", "protocol": "custom", "acquire_timeout": 0.05, "busy_reply": "15"}


async def get(url: str, **kwargs) -> httpx.Response:
    """An HTTP request in a worker thread, so that the proxy keeps running meanwhile."""
    return await trio.to_thread.run_sync(lambda: httpx.request(kwargs.pop("method", "GET"), url, timeout=10, **kwargs))


def base(running) -> str:
    return f"http://{running.status}"


async def test_api_lists_every_device_with_exactly_the_documented_fields():
    settings = settings_for(REGISTER, {**REGISTER, "name": "other"}, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        await wait_for(device, lambda: device.state == State.IDLE)
        async with await connect(running, "reg") as client:
            await client.send_all(BEEP)
            assert await receive_exactly(client, 9) == BEEP_ANSWER
            async with await connect(running, "reg") as refused:
                assert await refused.receive_some() == b"\x15"
            answer = await get(f"{base(running)}/api/devices")
            assert answer.status_code == 200
            devices = answer.json()
            assert [d["name"] for d in devices] == ["reg", "other"]
            reg = devices[0]
            assert tuple(reg) == FIELDS
            assert reg["state"] == "busy"
            assert reg["holder"] == f"127.0.0.1:{client.socket.getsockname()[1]}"
            assert (reg["bytes_to_device"], reg["bytes_from_device"]) == (9, 9)
            assert (reg["refused"], reg["clients"], reg["waiting"]) == (1, 1, 0)
            assert reg["listen"] == [str(running.addresses["reg"][0])]
            assert reg["type"] == "simulator" and reg["path"] is None and reg["sharing"] == "session"
            assert reg["connected_since"].endswith("Z") and reg["last_disconnect"] is None
        one = await get(f"{base(running)}/api/devices/other")
        assert one.json()["name"] == "other"
        assert (await get(f"{base(running)}/api/devices/missing")).status_code == 404


async def test_page_shows_a_row_per_device_and_hides_chosen_columns():
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        await wait_for(running.devices["reg"], lambda: running.devices["reg"].state == State.IDLE)
        page = await get(f"{base(running)}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="device-reg"' in page.text and "idle" in page.text and "Bytes to device" in page.text
        assert "<script" not in page.text
        hidden = await get(f"{base(running)}/?hide=bytes_to_device&hide=path")
        assert "<th>Bytes to device</th>" not in hidden.text and "<th>State</th>" in hidden.text
        assert (
            "url=/?hide=bytes_to_device&amp;hide=path" in hidden.text or "hide=bytes_to_device&hide=path" in hidden.text
        )


async def test_metrics_parse_and_move_with_traffic():
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        await wait_for(device, lambda: device.state == State.IDLE)

        async def samples() -> dict:
            text = (await get(f"{base(running)}/metrics")).text
            found = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            return found

        before = await samples()
        assert before[("devproxy_device_up", (("device", "reg"),))] == 1
        async with await connect(running, "reg") as client:
            await client.send_all(BEEP)
            assert await receive_exactly(client, 9) == BEEP_ANSWER
            async with await connect(running, "reg") as refused:
                assert await refused.receive_some() == b"\x15"
            after = await samples()
        key = ("devproxy_device_bytes_total", (("device", "reg"), ("direction", "to_device")))
        assert before[key] == 0 and after[key] == 9
        assert after[("devproxy_refused_total", (("device", "reg"), ("reason", "busy")))] == 1
        assert after[("devproxy_clients", (("device", "reg"),))] == 1
        assert after[("devproxy_lock_wait_seconds_count", (("device", "reg"),))] == 2
        assert ("devproxy_exchange_seconds_count", (("device", "reg"),)) in after
        assert ("devproxy_waiting_clients", (("device", "reg"),)) in after


async def test_disconnect_ends_the_holders_lease():
    settings = settings_for({**REGISTER, "acquire_timeout": 30}, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        async with await connect(running, "reg") as client:
            await wait_for(device, lambda: device.state == State.BUSY)
            answer = await get(f"{base(running)}/api/devices/reg/disconnect", method="POST")
            assert answer.status_code == 200
            assert answer.json()["disconnected"].endswith(str(client.socket.getsockname()[1]))
            assert await client.receive_some() == b""
        await wait_for(device, lambda: device.holder is None)
        assert (await get(f"{base(running)}/api/devices/reg/disconnect", method="POST")).status_code == 409
        assert (await get(f"{base(running)}/api/devices/reg/disconnect")).status_code == 405


async def test_token_is_required_everywhere_but_healthz():
    settings = settings_for(REGISTER, status="127.0.0.1:0", status_token="s3cret")
    async with running_proxy(settings) as running:
        assert (await get(f"{base(running)}/healthz")).status_code == 200
        for path in ("/", "/api/devices", "/metrics", "/api/devices/reg"):
            denied = await get(f"{base(running)}{path}")
            assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
            wrong = await get(f"{base(running)}{path}", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            allowed = await get(f"{base(running)}{path}", headers={"Authorization": "Bearer s3cret"})
            assert allowed.status_code == 200


def raw_exchange(address, data: bytes) -> bytes:
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (b"GET http://[x/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"400"),
        (b"POST /api/devices/reg/disconnect HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b"413"),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"404"),
        (b"DELETE /api/devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405"),
    ],
)
async def test_bad_requests_get_the_right_status_and_the_proxy_goes_on(request_bytes, status):
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        answer = await trio.to_thread.run_sync(raw_exchange, running.status, request_bytes)
        assert answer.split(b" ")[1] == status
        assert (await get(f"{base(running)}/healthz")).text == "ok\n"


async def test_a_silent_http_client_does_not_stop_the_others():
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        stuck = await trio.open_tcp_stream(running.status.host, running.status.port)
        await stuck.send_all(b"GET / HTTP/1.1\r\nHo")
        devices = (await get(f"{base(running)}/api/devices")).json()
        assert json.dumps(devices)
        await stuck.aclose()


async def test_a_page_that_fails_answers_500_and_the_proxy_goes_on(monkeypatch, log_lines):
    from proxy.status import page

    def broken(*args):
        raise RuntimeError("a bug in the page")

    monkeypatch.setattr(page, "render", broken)
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        assert (await get(f"{base(running)}/")).status_code == 500
        assert (await get(f"{base(running)}/api/devices")).status_code == 200
    assert any("status: GET / failed" in line for line in log_lines)


async def test_clients_that_never_read_their_responses_are_dropped_and_capped(monkeypatch, log_lines):
    from proxy.status import server

    monkeypatch.setattr(server, "RESPONSE_TIMEOUT", 0.2)
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 3)
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        greedy = []
        for _ in range(3):
            stream = await trio.open_tcp_stream(running.status.host, running.status.port)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
            greedy.append(stream)
        # Past the cap a new connection is closed at once ...
        async with await trio.open_tcp_stream(running.status.host, running.status.port) as late:
            assert await receive_until_closed(late) == b""
        # ... and the ones that never read are dropped after RESPONSE_TIMEOUT, freeing their descriptors.
        await logged("dropped a client that took no byte of its response", log_lines, times=len(greedy))
        for stream in greedy:
            await stream.aclose()
        assert (await get(f"{base(running)}/healthz")).text == "ok\n"
