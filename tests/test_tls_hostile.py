"""TLS under attack: peers that send garbage or stall their handshake, vanish mid-answer, read nothing, or
flood the port; devices and dial-in modems that misbehave over TLS; certificate files that are not files.
Each must cost only its own connection, with a clear log line, and leave the device free for the next."""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
from loguru import logger
from test_tls import REGISTER, Pki, beep, http_get, refused_silently, tls_address, tls_connect, tls_device

from proxy import tls, wire
from proxy.config import Address, parse
from proxy.device import State

from helpers import (
    BEEP,
    OTHER,
    WAIT_LIMIT,
    device_named,
    logged,
    meter,
    online,
    other_device_answers,
    receive_exactly,
    reset_on_close,
    running_proxy,
    settings_for,
    wait_for,
)

# The start of a TLS record that announces a ClientHello: the proxy waits for the rest of it.
HALF_A_CLIENT_HELLO = bytes.fromhex("16 03 01 02 00 01 00 01 fc 03 03") + bytes(20)


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


def open_fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/self/fd/{fd}").split(":")[0])
    return sorted(found)


async def plain_connect(address: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(address.host, address.port)


async def test_garbage_instead_of_a_client_hello_is_refused_with_the_reason(pki, log_lines):
    async with running_proxy(settings_for(tls_device(pki, tls_client_ca=""))) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        async with await plain_connect(address) as stranger:
            await stranger.send_all(b"GET / HTTP/1.0\r\n\r\n" * 100)
            await refused_silently(stranger)
        await wait_for(device, lambda: device.counters.refused["tls"] == 1)
        async with await tls_connect(address, pki.client_context()) as client:
            await beep(client)
    (line,) = [line for line in log_lines if "refused: TLS handshake failed" in line]
    assert line.startswith("INFO") and "127.0.0.1:" in line and "http request" in line
    assert not [line for line in log_lines if line.startswith(("ERROR", "CRITICAL"))]


async def test_a_stalled_handshake_takes_no_slot_of_max_clients_and_is_cut_at_the_timeout(pki, log_lines):
    settings = settings_for(tls_device(pki, tls_client_ca="", max_clients=1), tls_handshake_timeout=2)
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        async with await plain_connect(address) as staller:
            await staller.send_all(HALF_A_CLIENT_HELLO)
            async with await tls_connect(address, pki.client_context()) as client:
                await beep(client)
                assert device.clients == 1
            await refused_silently(staller)
        await wait_for(device, lambda: device.counters.refused["tls"] == 1)
        assert device.counters.refused["too many clients"] == 0
    assert any("no handshake within tls_handshake_timeout = 2 s" in line for line in log_lines)


async def test_hundreds_of_failing_handshakes_leak_no_descriptor(pki):
    flood = 200
    async with running_proxy(settings_for(tls_device(pki, tls_client_ca=""))) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        before = open_fds()

        async def stranger(garbage: bytes) -> None:
            async with await plain_connect(address) as stream:
                await stream.send_all(garbage)
                await refused_silently(stream)

        async with trio.open_nursery() as nursery:
            for number in range(flood):
                nursery.start_soon(stranger, HALF_A_CLIENT_HELLO[:5] + b"\xff" * 600 if number % 2 else b"\x00" * 64)
        await wait_for(device, lambda: device.counters.refused["tls"] == flood)
        async with await tls_connect(address, pki.client_context()) as client:
            await beep(client)
        # Every connection's task has finished closing it.
        await trio.testing.wait_all_tasks_blocked()
        assert open_fds() == before


async def test_a_client_that_resets_mid_session_releases_the_device(pki, log_lines):
    async with running_proxy(settings_for(tls_device(pki, tls_client_ca=""))) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        client = await tls_connect(address, pki.client_context())
        await beep(client)
        await wait_for(device, lambda: device.holder is not None)
        reset_on_close(client.transport_stream)
        await client.transport_stream.aclose()
        await wait_for(device, lambda: device.clients == 0 and device.holder is None)
        async with await tls_connect(address, pki.client_context()) as next_client:
            await beep(next_client)
    assert not [line for line in log_lines if line.startswith(("ERROR", "CRITICAL"))]


async def flood_device(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A TCP device that answers any request with 32 MiB, more than any socket buffer holds."""

    async def answer(stream: trio.SocketStream) -> None:
        chunk = b"x" * 65536
        try:
            while await stream.receive_some():
                for _ in range(512):
                    await stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(Address(*listeners[0].socket.getsockname()[:2]))
    await trio.serve_listeners(answer, listeners)


def flooding(pki: Pki, address: Address, **keys: object) -> dict:
    return {
        **tls_device(pki, tls_client_ca="", **keys),
        "name": "flood",
        "type": "tcp",
        "path": str(address),
        "protocol": "raw",
    }


async def test_a_tls_client_that_reads_nothing_is_cut_at_client_write_timeout(pki, log_lines, nursery):
    address = await nursery.start(flood_device)
    settings = settings_for(flooding(pki, address, client_write_timeout=0.5))
    async with running_proxy(settings) as running:
        device = running.devices["flood"]
        await online(device)
        proxy_address = tls_address(running, "flood")
        async with await tls_connect(proxy_address, pki.client_context()) as sleeper:
            await sleeper.send_all(b"go")
            await logged("took no byte of its answer for client_write_timeout = 0.5 s", log_lines)
            await wait_for(device, lambda: device.clients == 0)
        # The device is free for the next client, which reads its answer.
        async with await tls_connect(proxy_address, pki.client_context()) as reader:
            await reader.send_all(b"go")
            assert len(await receive_exactly(reader, 1 << 20)) == 1 << 20
    assert not [line for line in log_lines if line.startswith(("ERROR", "CRITICAL"))]


@pytest.mark.parametrize("leaving", ["reset", "close_notify"])
async def test_a_tls_client_that_leaves_mid_answer_frees_the_device(pki, log_lines, nursery, leaving):
    address = await nursery.start(flood_device)
    async with running_proxy(settings_for(flooding(pki, address))) as running:
        device = running.devices["flood"]
        await online(device)
        proxy_address = tls_address(running, "flood")
        client = await tls_connect(proxy_address, pki.client_context())
        await client.send_all(b"go")
        await receive_exactly(client, 100_000)
        if leaving == "reset":
            reset_on_close(client.transport_stream)
            await trio.aclose_forcefully(client)
        else:
            with trio.move_on_after(WAIT_LIMIT):
                await client.aclose()
        await wait_for(device, lambda: device.clients == 0 and device.holder is None)
        async with await tls_connect(proxy_address, pki.client_context()) as reader:
            await reader.send_all(b"go")
            await receive_exactly(reader, 1 << 20)
    assert not [line for line in log_lines if line.startswith(("ERROR", "CRITICAL"))]


@pytest.mark.parametrize("sends_first", [False, True])
@pytest.mark.parametrize("refusal", ["max_clients", "acquire_timeout"])
async def test_the_busy_reply_reaches_a_tls_client_before_the_close(pki, sends_first, refusal):
    keys = {"max_clients": 1} if refusal == "max_clients" else {"acquire_timeout": 0.2}
    keys["busy_reply"] = "42 55 53 59"
    async with running_proxy(settings_for(tls_device(pki, tls_client_ca="", **keys))) as running:
        address = tls_address(running, "reg")
        async with await tls_connect(address, pki.client_context()) as holder:
            await beep(holder)
            refused = await tls_connect(address, pki.client_context())
            if sends_first:
                await refused.send_all(BEEP * 1000)
            assert await receive_exactly(refused, 4) == b"BUSY"
            await trio.aclose_forcefully(refused)
            await beep(holder)


async def test_a_long_busy_reply_reaches_a_slow_tls_client_that_sent_a_request(pki):
    reply = b"B" * 256 * 1024
    keys = {"max_clients": 1, "busy_reply": reply.hex()}
    async with running_proxy(settings_for(tls_device(pki, tls_client_ca="", **keys))) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        async with await tls_connect(address, pki.client_context()) as holder:
            await beep(holder)
            sock = trio.socket.socket()
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect((address.host, address.port))
            refused = trio.SSLStream(trio.SocketStream(sock), pki.client_context(), server_hostname="127.0.0.1")
            await refused.do_handshake()
            # A request the proxy never reads, then no reading until the proxy has written its reply.
            await refused.send_all(BEEP * 100)
            await wait_for(device, lambda: device.counters.refused["too many clients"] == 1)
            assert await receive_exactly(refused, len(reply)) == reply
            await trio.aclose_forcefully(refused)


async def tls_misbehaving_device(behaviour: str, accepted: list, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A 'TLS gateway' that sends garbage, resets, or never answers the ClientHello; `accepted` counts
    the proxy's attempts."""

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        if behaviour == "garbage":
            await stream.send_all(b"\x00garbage\xff" * 100)
            await trio.sleep_forever()
        elif behaviour == "reset":
            await stream.receive_some()
            reset_on_close(stream)
            await stream.aclose()
        else:
            await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(Address(*listeners[0].socket.getsockname()[:2]))
    await trio.serve_listeners(handler, listeners)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [("garbage", "wrong version number"), ("reset", "Connection reset"), ("stall", "timed out")],
)
async def test_a_tls_device_that_misbehaves_stays_offline_with_the_reason(pki, nursery, monkeypatch, behaviour, reason):
    from proxy.links import tcp

    monkeypatch.setattr(tcp, "CONNECT_TIMEOUT", 0.5)
    accepted: list[trio.SocketStream] = []
    address = await nursery.start(tls_misbehaving_device, behaviour, accepted)
    device_keys = {
        **{"name": "gw", "type": "tcp", "path": str(address), "tls": True, "tls_ca": pki.ca_file},
        "reconnect_interval": 0.05,
    }
    async with running_proxy(settings_for(device_keys, OTHER)) as running:
        device = running.devices["gw"]
        await wait_for(device, lambda: device.last_error is not None)
        assert device.state == State.OFFLINE
        assert f"TLS handshake with {address}" in device.last_error[1]
        assert reason in device.last_error[1]
        # It tries again, and the proxy's other device answers meanwhile.
        await wait_for(device, lambda: len(accepted) >= 3)
        await other_device_answers(running)


async def test_a_tls_device_that_resets_mid_session_comes_back_for_the_next_client(pki, nursery, log_lines):
    links: list[trio.SSLStream] = []
    got_link = trio.Event()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.ca.issue_cert("127.0.0.1").configure_cert(context)

    async def gateway(stream: trio.SSLStream) -> None:
        links.append(stream)
        got_link.set()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some():
                await stream.send_all(b"ANS:" + data)

    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1")
    port = listeners[0].transport_listener.socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, gateway, listeners)
    device_keys = {"name": "gw", "type": "tcp", "path": f"127.0.0.1:{port}", "tls": True, "tls_ca": pki.ca_file}
    async with running_proxy(settings_for({**device_keys, "reconnect_interval": 0.05})) as running:
        device = running.devices["gw"]
        async with await plain_connect(running.addresses["gw"][0]) as client:
            await client.send_all(b"one")
            assert await receive_exactly(client, 7) == b"ANS:one"
            await got_link.wait()
            reset_on_close(links[0].transport_stream)
            await trio.aclose_forcefully(links[0])
            await wait_for(device, lambda: len(links) == 2 and device.state != State.OFFLINE)
        async with await plain_connect(running.addresses["gw"][0]) as client:
            await client.send_all(b"two")
            assert await receive_exactly(client, 7) == b"ANS:two"
    assert not [line for line in log_lines if line.startswith(("ERROR", "CRITICAL"))]


async def test_a_dialin_modem_whose_identity_comes_a_byte_a_record_registers(tmp_path, pki):
    table = {
        "listen_tls": ["127.0.0.1:0"],
        "registry": str(tmp_path / "registry.sqlite3"),
        "direct_ports": "any",
        "identify_timeout": 5,
        "tls_cert": pki.server_cert,
        "tls_key": pki.server_key,
    }
    settings = parse({"proxy": {"status": ""}, "dialin": table})
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        link = await tls_connect(running.dialin[0], pki.client_context())
        for byte in b"METER7\n":
            await link.send_all(bytes([byte]))
        device = await device_named(running, "METER7")
        await online(device)
        nursery.start_soon(meter, link)
        async with await plain_connect(running.addresses[device.name][0]) as client:
            await client.send_all(b"read")
            assert await receive_exactly(client, 8) == b"ANS:read"
        await link.aclose()


async def test_a_dialin_modem_that_stalls_its_handshake_holds_no_other(tmp_path, pki, log_lines):
    table = {
        "listen_tls": ["127.0.0.1:0"],
        "registry": str(tmp_path / "registry.sqlite3"),
        "direct_ports": "any",
        "identify_timeout": 5,
        "tls_cert": pki.server_cert,
        "tls_key": pki.server_key,
    }
    settings = parse({"proxy": {"status": "", "tls_handshake_timeout": 1}, "dialin": table})
    async with running_proxy(settings) as running, await plain_connect(running.dialin[0]) as staller:
        await staller.send_all(HALF_A_CLIENT_HELLO)
        async with await tls_connect(running.dialin[0], pki.client_context()) as link:
            await link.send_all(b"METER7\n")
            await online(await device_named(running, "METER7"))
        await refused_silently(staller)
    assert any("refused: TLS handshake failed: no handshake within" in line for line in log_lines)


async def test_the_status_page_is_served_while_a_peer_stalls_its_handshake(pki):
    settings = settings_for(
        REGISTER, status="127.0.0.1:0", status_tls_cert=pki.server_cert, status_tls_key=pki.server_key
    )
    async with running_proxy(settings) as running, await plain_connect(running.status) as staller:
        await staller.send_all(HALF_A_CLIENT_HELLO)
        page = await http_get(running.status, "/api/devices", pki.client_context())
        assert page.status == 200 and b'"reg"' in page.body


@pytest.fixture
def reload_log():
    """The log lines of a reload (which sets the log's sinks up again, this one's too)."""
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{level} {message}")
    yield lines
    with contextlib.suppress(ValueError):
        logger.remove(sink)


def break_certificate(folder: Path, pki: Pki, replacement: str) -> Path:
    """Puts something unusable where the server's certificate or key was; returns which file."""
    path = Path(pki.server_cert)
    if replacement == "garbage":
        path.write_bytes(os.urandom(4096))
    elif replacement == "directory":
        path.unlink()
        path.mkdir()
    elif replacement == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        path = Path(pki.server_key)
        path.write_bytes(Path(Pki(folder, "other").server_key).read_bytes())
    return path


@pytest.mark.parametrize("replacement", ["garbage", "directory", "fifo", "other key"])
async def test_a_reload_with_a_broken_certificate_file_keeps_serving_the_loaded_one(
    tmp_path, pki, reload_log, replacement
):
    log_lines = reload_log
    async with running_proxy(settings_for(tls_device(pki, tls_client_ca=""))) as running:
        path = break_certificate(tmp_path, pki, replacement)
        await running.reload(running.settings)
        async with await tls_connect(tls_address(running, "reg"), pki.client_context()) as client:
            await beep(client)
    (line,) = [line for line in log_lines if "SIGHUP" in line and "the certificate loaded before stays" in line]
    assert line.startswith("ERROR") and str(path) in line


def special_file(folder: Path, pki: Pki, special: str) -> str:
    """A path that is no certificate file OpenSSL should read: a device, a FIFO with no writer, a huge file."""
    if special == "fifo":
        path = str(folder / "fifo.pem")
        os.mkfifo(path)
        return path
    if special == "huge":
        path = folder / "huge.pem"
        chain = Path(pki.server_cert).read_bytes()
        path.write_bytes(chain * (tls.MAX_PEM_FILE // len(chain) + 1))
        return str(path)
    return special


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "huge"])
async def test_a_certificate_path_that_is_not_a_small_file_is_refused_at_once(tmp_path, pki, special):
    path = special_file(tmp_path, pki, special)
    files = tls.TlsFiles(path, pki.server_key)
    with trio.fail_after(5), pytest.raises(tls.TlsError) as caught:
        await trio.to_thread.run_sync(tls.server_context, files, 1.0, abandon_on_cancel=True)
    assert path in str(caught.value)


async def test_client_names_match_whatever_their_ascii_case_but_no_look_alike(pki, log_lines):
    keys = {"tls_client_names": ["kiosk"], "sharing": "exchange"}
    async with running_proxy(settings_for(tls_device(pki, **keys))) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        async with await tls_connect(address, pki.client_context(pki.ca.issue_cert(common_name="KIOSK"))) as client:
            await beep(client)
        # KELVIN SIGN, which Unicode case folding turns into "k".
        look_alike = pki.client_context(pki.ca.issue_cert(common_name="\u212aiosk"))
        with contextlib.suppress(trio.BrokenResourceError):
            await refused_silently(await tls_connect(address, look_alike))
        await wait_for(device, lambda: device.counters.refused["tls"] == 1)
    assert any("certificate names (\u212aiosk) are not in tls_client_names" in line for line in log_lines)


def test_a_wildcard_certificate_name_is_a_name_not_a_pattern(pki):
    files = tls.TlsFiles(pki.server_cert, pki.server_key, pki.ca_file, ("pos-1.example", "*.shop.example"))
    context = tls.server_context(files, 1.0)
    assert not tls.allowed(context, ["*.example"])
    assert not tls.allowed(context, ["till.shop.example"])
    assert tls.allowed(context, ["*.SHOP.example"])


async def test_a_layered_peer_that_keeps_reading_slowly_is_not_a_stalled_one(autojump_clock):
    # TLS and Telnet streams have no descriptor: the Outlet writes them a piece at a time, and every
    # piece taken restarts the stall timeout, as every byte does on a socket.
    sender, receiver = trio.testing.lockstep_stream_pair()
    data = bytes(range(256)) * 512
    got = bytearray()

    async def slow_reader() -> None:
        while len(got) < len(data):
            await trio.sleep(0.1)
            got.extend(await receiver.receive_some(wire.LAYERED_PIECE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_reader)
        await wire.Outlet(sender).send(data, stall_timeout=0.25)
    assert got == data
    assert trio.current_time() > 0.25 * 3


async def test_a_layered_peer_that_takes_nothing_is_stalled(autojump_clock):
    sender, _receiver = trio.testing.lockstep_stream_pair()
    with pytest.raises(trio.TooSlowError):
        await wire.Outlet(sender).send(b"x" * 10, stall_timeout=0.25)
