"""The status server through a real socket: the page, the JSON API, metrics, token, bad requests."""

from __future__ import annotations

import gzip
import json
import re
import socket
from urllib.parse import quote, urlencode, urlsplit

import pytest
import trio
from http_client import Reply, request
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse
from proxy.device import State
from proxy.dialin.registry import Registry
from proxy.status import auth, html
from proxy.status.snapshot import FIELDS

from helpers import (
    connect,
    device_named,
    logged,
    modem,
    online,
    receive_exactly,
    receive_until_closed,
    running_proxy,
    settings_for,
    wait_for,
)

BEEP = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")
BEEP_ANSWER = bytes.fromhex("06 01 04 00 13 00 00 63 7A")
REGISTER = {"name": "reg", "type": "simulator", "protocol": "custom", "acquire_timeout": 0.05, "busy_reply": "15"}


async def get(url: str, method: str = "GET", **kwargs) -> Reply:
    """A request to `url` (http://HOST:PORT/...) on its own connection."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return await request(parts.netloc, method, target, **kwargs)


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
        assert 'id="device-reg"' in page.text and 'class="state-idle">idle<' in page.text and "To device" in page.text
        assert "<script" not in page.text
        hidden = await get(f"{base(running)}/?hide=bytes_to_device&hide=path")
        assert ">To device</a>" not in hidden.text and ">Path or peer</a>" not in hidden.text
        assert ">State</a>" in hidden.text
        # The page's own links keep the choice: the sort links, the pager, the refresh switch.
        assert 'href="?sort=state&amp;hide=path&amp;hide=bytes_to_device"' in hidden.text


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


async def test_token_is_required_everywhere_but_healthz_and_pages_send_browsers_to_the_login_form():
    settings = settings_for(REGISTER, status="127.0.0.1:0", status_token="s3cret")
    async with running_proxy(settings) as running:
        assert (await get(f"{base(running)}/healthz")).status_code == 200
        for path in ("/", "/devices/reg", "/api/devices", "/metrics", "/api/devices/reg", "/api/devices/reg/events"):
            denied = await get(f"{base(running)}{path}")
            if path.startswith(("/api", "/metrics")):
                assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
            else:
                assert denied.status_code == 303 and denied.headers["location"] == f"/login?next={quote(path, safe='')}"
            wrong = await get(f"{base(running)}{path}", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code in (303, 401)
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
        (b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", b"404"),
        (b"DELETE /api/devices HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", b"405"),
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
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 200)
            greedy.append(stream)
        # Past the cap a new connection is closed at once ...
        async with await trio.open_tcp_stream(running.status.host, running.status.port) as late:
            assert await receive_until_closed(late) == b""
        # ... and the ones that never read are dropped after RESPONSE_TIMEOUT, freeing their descriptors.
        await logged("dropped a client that took no byte of its response", log_lines, times=len(greedy))
        for stream in greedy:
            await stream.aclose()
        assert (await get(f"{base(running)}/healthz")).text == "ok\n"


# -- the console: summary, search, filters, sort, paging ------------------------------------------

# 52 release_port devices (closed until a client comes; nothing runs for them), two simulated registers
# and one absent serial port: more than a page of 50.
FLEET = [
    *({"name": f"rp-{n:02d}", "type": "tcp", "path": "127.0.0.1:1", "release_port": True} for n in range(52)),
    {**REGISTER, "acquire_timeout": 0},
    {"name": "ex", "type": "simulator", "protocol": "shtrih", "sharing": "exchange"},
    {"name": "gone", "type": "serial", "path": "/nonexistent/ttyGONE", "reconnect_interval": 3600},
]


def row_ids(page: str) -> list[str]:
    return re.findall(r'<tr id="device-([^"]+)">', page)


async def fleet_running(running) -> None:
    for name in ("reg", "ex"):
        device = running.devices[name]
        await wait_for(device, lambda device=device: device.state == State.IDLE)
    gone = running.devices["gone"]
    await wait_for(gone, lambda: gone.last_error is not None)


async def test_the_page_searches_filters_sorts_and_pages_on_the_server():
    async with running_proxy(settings_for(*FLEET, status="127.0.0.1:0")) as running:
        await fleet_running(running)
        url = base(running)
        assert row_ids((await get(f"{url}/")).text)[:3] == ["rp-00", "rp-01", "rp-02"]  # as configured
        assert row_ids((await get(f"{url}/?q=RP-1")).text) == [f"rp-{n}" for n in range(10, 20)]
        assert row_ids((await get(f"{url}/?q=ttyGONE")).text) == ["gone"]  # the path too
        assert row_ids((await get(f"{url}/?type=serial")).text) == ["gone"]
        assert row_ids((await get(f"{url}/?protocol=shtrih")).text) == ["ex"]
        assert row_ids((await get(f"{url}/?sharing=exchange")).text) == ["ex"]
        assert row_ids((await get(f"{url}/?state=online")).text) == ["reg", "ex"]
        assert row_ids((await get(f"{url}/?state=offline")).text) == ["gone"]
        assert row_ids((await get(f"{url}/?sort=id&desc=1")).text)[:2] == ["rp-51", "rp-50"]
        assert row_ids((await get(f"{url}/?sort=id")).text)[:3] == ["ex", "gone", "reg"]
        by_state = row_ids((await get(f"{url}/?sort=state")).text)
        assert by_state[:52] == [f"rp-{n:02d}" for n in range(52)] and by_state[52:] == ["reg", "ex", "gone"]
        first = await get(f"{url}/?state=closed&per=50")
        assert len(row_ids(first.text)) == 50 and "Devices 1 to 50 of 52" in first.text
        assert 'href="?state=closed&amp;page=2&amp;per=50" rel="next"' in first.text
        second = await get(f"{url}/?state=closed&per=50&page=2")
        assert row_ids(second.text) == ["rp-50", "rp-51"] and 'rel="next"' not in second.text
        assert row_ids((await get(f"{url}/?state=closed&per=50&page=999")).text) == ["rp-50", "rp-51"]
        # Values it does not know are its defaults: a stale bookmark still shows a page.
        assert len(row_ids((await get(f"{url}/?state=bogus&sort=nothing&per=7&page=x")).text)) == 55
        assert "No device matches." in (await get(f"{url}/?q=nothing-like-this")).text
        # The same filters and sort on the JSON API.
        api = (await get(f"{url}/api/devices?sharing=session&sort=state&desc=1&q=e")).json()
        assert [device["id"] for device in api] == ["gone", "reg"]


async def test_the_summary_line_counts_every_state_and_the_refusals_of_the_last_hour():
    async with running_proxy(settings_for(*FLEET, status="127.0.0.1:0")) as running:
        await fleet_running(running)
        async with await connect(running, "reg") as holder:
            await wait_for(running.devices["reg"], lambda: running.devices["reg"].state == State.BUSY)
            async with await connect(running, "reg") as refused:
                assert await receive_until_closed(refused) == b"\x15"
            page = (await get(f"{base(running)}/?q=nothing")).text
            await holder.send_all(b"")
        summary = re.sub(r"<[^>]+>", "", re.search(r'<p class="summary">(.*?)</p>', page).group(1))
        assert summary == (
            "55 devices: online 2 (idle 1, busy 1, settling 0) · connecting 0 · offline 1 · closed 52 · "
            "refusals in the last hour: 1"
        )
        assert 'href="?state=closed&amp;q=nothing"' not in page and 'href="?q=nothing&amp;state=closed"' in page


async def test_times_are_relative_with_the_exact_utc_time_on_hover():
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0")) as running:
        await wait_for(running.devices["reg"], lambda: running.devices["reg"].state == State.IDLE)
        # cols=1: every column, the last connect too (hidden unless asked for).
        row = (await get(f"{base(running)}/?cols=1")).text.split('<tr id="device-reg">')[1].split("</tr>")[0]
    # Connected since and last connect: "just now", the exact time in the title; no disconnect yet.
    assert (
        len(re.findall(r'<time datetime="[^"]+Z" title="\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC">just now</time>', row)) == 2
    )
    assert row.endswith("<td>-</td>")


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(2, "just now"), (42, "42 s ago"), (180, "3 min ago"), (7200, "2 h ago"), (3 * 86400, "3 d ago")],
)
def test_relative_times_read_as_an_operator_says_them(seconds, said):
    assert html.ago(seconds) == said


async def test_the_last_error_column_says_why_a_device_is_offline(tmp_path):
    settings = settings_for(
        {"name": "absent", "type": "serial", "path": str(tmp_path / "ttyNONE"), "reconnect_interval": 3600},
        {"name": "refusing", "type": "tcp", "path": "127.0.0.1:1", "reconnect_interval": 3600},
        status="127.0.0.1:0",
    )
    async with running_proxy(settings) as running:
        for device in running.devices.values():
            await wait_for(device, lambda device=device: device.last_error is not None)
        page = (await get(f"{base(running)}/?sort=last_error")).text
        devices = {device["id"]: device for device in (await get(f"{base(running)}/api/devices")).json()}
    assert devices["absent"]["last_error"] == f"{tmp_path / 'ttyNONE'}: no such device"
    assert "refused" in devices["refusing"]["last_error"].lower()
    assert devices["absent"]["last_error_at"].endswith("Z")
    assert f'<td class="error"><span class="cut" title="{tmp_path / "ttyNONE"}: no such device (just now, ' in page


async def test_an_idle_release_port_device_is_closed_and_up_until_an_open_fails(tcp_device):
    settings = settings_for(
        {"name": "printer", "type": "tcp", "path": str(tcp_device.address), "release_port": True},
        {"name": "unplugged", "type": "tcp", "path": "127.0.0.1:1", "release_port": True, "acquire_timeout": 0},
        status="127.0.0.1:0",
    )
    async with running_proxy(settings) as running:
        printer, unplugged = running.devices["printer"], running.devices["unplugged"]
        for device in (printer, unplugged):
            await wait_for(device, lambda device=device: device.state == State.CLOSED)
        assert (await metric_samples(running))[("devproxy_device_up", (("device", "printer"),))] == 1
        async with await connect(running, "printer") as client:
            device_end = await tcp_device.next_connection()
            await wait_for(printer, lambda: printer.state == State.BUSY)
            await client.send_all(b"x")
            assert await receive_exactly(device_end, 1) == b"x"
        await wait_for(printer, lambda: printer.state == State.CLOSED)
        # A client comes, the open fails: offline (and down) until an open succeeds.
        async with await connect(running, "unplugged") as client:
            await receive_until_closed(client)
        await wait_for(unplugged, lambda: unplugged.state == State.OFFLINE)
        samples = await metric_samples(running)
        api = (await get(f"{base(running)}/api/devices/printer")).json()
    assert samples[("devproxy_device_up", (("device", "printer"),))] == 1
    assert samples[("devproxy_device_up", (("device", "unplugged"),))] == 0
    assert api["state"] == "closed" and api["connected_since"] is None


async def metric_samples(running, headers: dict | None = None) -> dict:
    reply = await get(f"{base(running)}/metrics", headers=headers)
    body = gzip.decompress(reply.body) if reply.headers.get("content-encoding") == "gzip" else reply.body
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_have_snake_case_labels_and_histograms_only_where_a_device_asks(tmp_path):
    settings = settings_for(
        {**REGISTER, "max_clients": 1},
        {**REGISTER, "name": "lean", "metrics_histograms": False},
        status="127.0.0.1:0",
    )
    async with running_proxy(settings) as running:
        reg, lean = running.devices["reg"], running.devices["lean"]
        await wait_for(lean, lambda: lean.state == State.IDLE)
        before = await metric_samples(running)
        async with await connect(running, "reg"), await connect(running, "lean") as client:
            await wait_for(reg, lambda: reg.state == State.BUSY)
            async with await connect(running, "reg") as extra:
                assert await receive_until_closed(extra) == b"\x15"
            await client.send_all(BEEP)
            assert await receive_exactly(client, 9) == BEEP_ANSWER
            after = await metric_samples(running, {"accept-encoding": "gzip"})
    assert after[("devproxy_refused_total", (("device", "reg"), ("reason", "too_many_clients")))] == 1
    assert after[("devproxy_refused_total", (("device", "reg"), ("reason", "not_allowed")))] == 0
    assert ("devproxy_lock_wait_seconds_count", (("device", "reg"),)) in after
    assert not any(labels == (("device", "lean"),) for name, labels in after if "seconds" in name)
    # The lean device's zeros are left out; what moved is there, and its wait went to the pool.
    assert ("devproxy_refused_total", (("device", "lean"), ("reason", "busy"))) not in after
    assert after[("devproxy_device_bytes_total", (("device", "lean"), ("direction", "to_device")))] == 9
    pooled = ("devproxy_pooled_lock_wait_seconds_count", ())
    assert after[pooled] == before[pooled] + 1


async def test_metrics_are_gzipped_for_a_scraper_that_asks():
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0")) as running:
        plain = await get(f"{base(running)}/metrics")
        zipped = await get(f"{base(running)}/metrics", headers={"accept-encoding": "gzip"})
        refused = await get(f"{base(running)}/metrics", headers={"accept-encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in plain.headers and "content-encoding" not in refused.headers
    assert zipped.headers["content-encoding"] == "gzip" and zipped.headers["vary"] == "accept-encoding"
    assert gzip.decompress(zipped.body).startswith(b"# HELP devproxy_device_up")


# -- dial-in devices go by their id -------------------------------------------------------------------


def dialin_status_settings(tmp_path, **keys):
    return parse(
        {
            "proxy": {"status": "127.0.0.1:0"},
            "dialin": {
                "listen": ["127.0.0.1:0"],
                "registry": str(tmp_path / "registry.sqlite3"),
                "direct_ports": "any",
                **keys,
            },
        }
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_a_named_dialin_device_goes_by_its_id_with_its_name_beside(tmp_path):
    registry = Registry(tmp_path / "registry.sqlite3", None)
    registry.add("METER-001", free_port(), name="Meter 1")
    registry.close()
    async with running_proxy(dialin_status_settings(tmp_path)) as running:
        link = await modem(running, b"METER-001\n")
        device = await device_named(running, "METER-001")
        await online(device)
        url = base(running)
        assert device.name == "Meter 1"
        one = (await get(f"{url}/api/devices/METER-001")).json()
        assert (one["id"], one["name"], one["type"]) == ("METER-001", "Meter 1", "dialin")
        assert (await get(f"{url}/api/devices/Meter%201")).json()["id"] == "METER-001"  # the name works too
        assert (await get(f"{url}/api/devices/METER-001/events")).json()[-1]["event"] == "link_open"
        row = (await get(f"{url}/?q=meter%201")).text.split('<tr id="device-METER-001">')[1].split("</tr>")[0]
        assert '<a href="/devices/METER-001">METER-001</a> <span class="name">Meter 1</span>' in row
        assert '<h1>METER-001 <span class="name">Meter 1</span></h1>' in (await get(f"{url}/devices/METER-001")).text
        samples = await metric_samples(running)
        assert samples[("devproxy_device_up", (("device", "METER-001"),))] == 1
        await link.aclose()


async def test_text_a_device_or_peer_chooses_is_escaped_on_every_page(tmp_path):
    hostile = "<i>\"&'</i>"
    async with running_proxy(dialin_status_settings(tmp_path)) as running:
        link = await modem(running, hostile.encode() + b"\n")
        device = await device_named(running, hostile)
        await online(device)
        url = base(running)
        pages = [
            (await get(f"{url}/?q={quote(hostile)}")).text,
            (await get(f"{url}/devices/{quote(hostile, safe='')}")).text,
        ]
        api = (await get(f"{url}/api/devices/{quote(hostile, safe='')}")).json()
        await link.aclose()
    assert api["id"] == hostile
    for text in pages:
        assert hostile not in text and "<i>" not in text
        assert "&lt;i&gt;" in text
    assert '<tr id="device-&lt;i&gt;&quot;&amp;&#x27;&lt;/i&gt;">' in pages[0]
    assert 'href="/devices/%3Ci%3E%22%26%27%3C%2Fi%3E"' in pages[0]


# -- logins ---------------------------------------------------------------------------------------------


async def test_the_login_form_gives_a_strict_httponly_session_that_the_api_takes_until_logout():
    settings = settings_for(REGISTER, status="127.0.0.1:0", status_token="s3cret")
    async with running_proxy(settings) as running:
        address = running.status
        form = await request(address, "GET", "/login?next=%2Fdevices%2Freg")
        assert form.status_code == 200 and 'type="password" name="token"' in form.text
        assert 'name="next" value="/devices/reg"' in form.text
        wrong = await post_form(address, "/login", token="nope", next="/devices/reg")
        assert wrong.status_code == 401 and "That is not the status token." in wrong.text
        assert "set-cookie" not in wrong.headers
        good = await post_form(address, "/login", token="s3cret", next="/devices/reg")
        assert good.status_code == 303 and good.headers["location"] == "/devices/reg"
        cookie = good.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        session = {"cookie": cookie.split(";")[0]}
        for path in ("/", "/devices/reg", "/api/devices", "/metrics"):
            assert (await request(address, "GET", path, headers=session)).status_code == 200
        assert 'action="/logout"' in (await request(address, "GET", "/", headers=session)).text
        out = await post_form(address, "/logout", headers=session)
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
        assert (await request(address, "GET", "/api/devices", headers=session)).status_code == 401
        assert (await request(address, "GET", "/", headers=session)).status_code == 303
        # A login never sends the browser off this server.
        elsewhere = await post_form(address, "/login", token="s3cret", next="//evil.example/")
        assert elsewhere.headers["location"] == "/"
        unicode = await post_form(address, "/login", token="s3cret", next="/devices/касса-1")
        assert unicode.headers["location"] == "/devices/%D0%BA%D0%B0%D1%81%D1%81%D0%B0-1"


async def post_form(address, target: str, headers: dict | None = None, **fields: str) -> Reply:
    body = urlencode(fields).encode()
    form = {"content-type": "application/x-www-form-urlencoded", **(headers or {})}
    return await request(address, "POST", target, headers=form, body=body)


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"origin": "http://[x"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ],
)
async def test_posts_from_other_sites_are_refused(headers):
    settings = settings_for({**REGISTER, "acquire_timeout": 30}, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        async with await connect(running, "reg") as client:
            await wait_for(device, lambda: device.state == State.BUSY)
            refused = await request(running.status, "POST", "/api/devices/reg/disconnect", headers=headers)
            assert refused.status_code == 403
            assert device.holder is not None
            login = await post_form(running.status, "/login", headers=headers, token="")
            assert login.status_code == 403
            # The page's own button: same origin, and the browser goes back to the page.
            own = {"origin": f"http://{running.status}", "sec-fetch-site": "same-origin", "accept": "text/html"}
            done = await request(running.status, "POST", "/api/devices/reg/disconnect", headers=own)
            assert done.status_code == 303 and done.headers["location"] == "/devices/reg"
            assert await client.receive_some() == b""


# -- a device's page ------------------------------------------------------------------------------------


async def test_a_devices_page_shows_its_state_holder_waiters_counters_settings_and_events():
    settings = settings_for({**REGISTER, "acquire_timeout": 30}, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        async with await connect(running, "reg") as holder, await connect(running, "reg") as waiter:
            await wait_for(device, lambda: device.waiting == 1)
            await holder.send_all(BEEP)
            assert await receive_exactly(holder, 9) == BEEP_ANSWER
            reply = await get(f"{base(running)}/devices/reg")
            names = [f"127.0.0.1:{stream.socket.getsockname()[1]}" for stream in (holder, waiter)]
    text = reply.text
    assert reply.status_code == 200
    policy = reply.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "frame-ancestors 'none'" in policy
    assert '<span class="state-busy">busy</span>' in text
    assert f"<tr><th>Holder</th><td>{names[0]} (for " in text and 'action="/api/devices/reg/disconnect"' in text
    assert f"<tr><th>Waiting</th><td><ol><li>{names[1]} (waiting " in text
    assert "<tr><th>Bytes to device</th><td>9</td></tr>" in text
    assert "<tr><th>acquire_timeout</th><td>30</td></tr>" in text and "<tr><th>busy_reply</th><td>15</td></tr>" in text
    events = re.findall(r"<tr><td><time [^>]+>[^<]+</time></td><td>(\w+)</td><td>([^<]+)</td>", text)
    assert events[:3] == [("connect", names[1]), ("lease", names[0]), ("connect", names[0])]
    assert events[-1] == ("link_open", "-")
    assert 'data-src="/api/devices/reg/traffic"' in text and "<noscript>" in text


async def test_every_column_of_the_page_sorts():
    from proxy.status.listing import SORT_KEYS

    assert set(SORT_KEYS) == set(FIELDS)


def test_refusals_of_the_last_hour_are_counted_to_the_minute():
    from proxy.counters import RecentCount

    recent = RecentCount()
    hour = 3600 * 1000
    recent.add(hour + 10)
    recent.add(hour + 70)
    recent.add(hour + 75)
    assert recent.total(hour + 80) == 3
    assert recent.total(hour + 3599) == 3  # the first minute is still inside the hour
    assert recent.total(hour + 3600) == 2  # now it is not
    recent.add(hour + 3600 + 70)  # the same slot a new hour later replaces what it held
    assert recent.total(hour + 3600 + 80) == 1


# -- hostile requests: smuggling, HEAD, DNS rebinding, login guessing ------------------------------------


async def test_a_request_with_both_content_length_and_transfer_encoding_gets_400_and_the_connection_closes():
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        smuggled = (
            b"POST /logout HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        answer = await trio.to_thread.run_sync(raw_exchange, running.status, smuggled)
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1
        assert b"connection: close" in answer.lower()
        # Any 400 closes the connection: the request after it is never read.
        healthz = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        bad_target = b"GET http://[x/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + healthz
        answer = await trio.to_thread.run_sync(raw_exchange, running.status, bad_target)
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1


async def test_error_bodies_are_plain_text_without_python_reprs():
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        answer = await trio.to_thread.run_sync(raw_exchange, running.status, b"NOT HTTP AT ALL\r\n\r\n")
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body == {"error": "bad request: illegal request line: NOT HTTP AT ALL"}


async def test_head_answers_every_get_route_with_its_status_and_headers_and_no_body():
    settings = settings_for(REGISTER, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        for path in ("/healthz", "/", "/api/devices", "/metrics", "/devices/reg", "/api/devices/reg", "/nowhere"):
            got = await request(running.status, "GET", path)
            head = await request(running.status, "HEAD", path)
            assert (head.status_code, head.body) == (got.status_code, b"")
            assert head.headers["content-length"] == str(len(got.body))
            assert head.headers["content-type"] == got.headers["content-type"]
        view = await request(running.status, "HEAD", "/api/devices/reg/traffic")
        assert view.status_code == 200 and view.headers["content-type"].startswith("text/event-stream")
        assert view.body == b""
        await wait_for(running.devices["reg"], lambda: running.devices["reg"].traffic is None)  # released
        # A route that takes no GET still says which methods it takes.
        wrong = await request(running.status, "HEAD", "/logout")
        assert (wrong.status_code, wrong.headers["allow"], wrong.body) == (405, "POST", b"")
        # Keep-alive goes on after a HEAD: the next response on the same connection is read whole.
        two = (
            b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        answer = await trio.to_thread.run_sync(raw_exchange, running.status, two)
        assert answer.count(b"HTTP/1.1 200 ") == 2 and answer.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8600", "127.0.0.1.evil.example", "[::1].evil:1"])
async def test_without_a_token_a_request_for_another_name_is_refused_against_dns_rebinding(host):
    settings = settings_for({**REGISTER, "acquire_timeout": 30}, status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        rebound = {"host": host, "origin": f"http://{host}", "sec-fetch-site": "same-origin"}
        async with await connect(running, "reg") as client:
            await wait_for(device, lambda: device.state == State.BUSY)
            for method, path in (("GET", "/api/devices"), ("GET", "/"), ("POST", "/api/devices/reg/disconnect")):
                refused = await request(running.status, method, path, headers=rebound)
                assert refused.status_code == 421
                assert "set status_token" in refused.json()["error"]
            assert device.holder is not None
            await client.send_all(BEEP)
            assert await receive_exactly(client, 9) == BEEP_ANSWER
        port = running.status.port
        for own in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "[::1]"):
            assert (await request(running.status, "GET", "/api/devices", headers={"host": own})).status_code == 200
        # /healthz says only "ok": a monitor may use any name.
        assert (await request(running.status, "GET", "/healthz", headers={"host": host})).text == "ok\n"


def test_the_configured_status_host_is_a_name_of_this_server():
    assert auth.own_host("pos-proxy.lan:8600", "pos-proxy.lan")
    assert auth.own_host("POS-PROXY.LAN", "pos-proxy.lan")
    assert not auth.own_host("pos-proxy.lan.evil:8600", "pos-proxy.lan")
    assert not auth.own_host("pos-proxy.lan:x", "pos-proxy.lan")
    assert not auth.own_host("", "")
    assert auth.own_host(None, "")


async def test_with_a_token_any_name_reaches_the_server():
    settings = settings_for(REGISTER, status="127.0.0.1:0", status_token="s3cret")
    async with running_proxy(settings) as running:
        headers = {"host": "proxy.example.org:8600", "authorization": "Bearer s3cret"}
        assert (await request(running.status, "GET", "/api/devices", headers=headers)).status_code == 200


async def test_failed_logins_past_five_a_minute_are_refused_with_429_and_one_warning(log_lines):
    settings = settings_for(REGISTER, status="127.0.0.1:0", status_token="s3cret")
    async with running_proxy(settings) as running:
        address = running.status
        # Successful logins are never counted.
        for _ in range(auth.MAX_FAILED_LOGINS + 2):
            assert (await post_form(address, "/login", token="s3cret")).status_code == 303
        for _ in range(auth.MAX_FAILED_LOGINS):
            assert (await post_form(address, "/login", token="guess")).status_code == 401
        for token in ("guess", "another", "s3cret"):
            refused = await post_form(address, "/login", token=token)
            assert refused.status_code == 429 and "set-cookie" not in refused.headers
            assert 1 <= int(refused.headers["retry-after"]) <= auth.LOGIN_WINDOW
            assert "too many failed logins" in refused.json()["error"]
        # The bearer token is no login: scripts and Prometheus go on.
        bearer = {"authorization": "Bearer s3cret"}
        assert (await request(address, "GET", "/api/devices", headers=bearer)).status_code == 200
    warnings = [line for line in log_lines if line.startswith("WARNING") and "failed logins" in line]
    assert len(warnings) == 1
    assert sum("login from" in line and "failed" in line for line in log_lines) == auth.MAX_FAILED_LOGINS


def test_logins_are_taken_again_when_the_minute_of_the_first_failure_ends():
    throttle = auth.LoginThrottle()
    assert [throttle.failed(float(second)) for second in range(5)] == [False, False, False, False, True]
    assert throttle.refused_for(5.0) == auth.LOGIN_WINDOW - 5
    assert throttle.refused_for(59.5) == 0.5
    assert throttle.refused_for(60.0) == 0
    # A new window: four failures are taken, the fifth closes it again.
    assert [throttle.failed(60.0 + second) for second in range(5)] == [False, False, False, False, True]
    assert auth.retry_after(0.2) == "1" and auth.retry_after(59.5) == "60"
