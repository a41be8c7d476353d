"""TLS on every listener and toward a device, with certificates made here (trustme): who gets in, who is
refused before the lock, and what a reload changes."""

from __future__ import annotations

import contextlib
import datetime
import ssl
import subprocess
from pathlib import Path

import h11
import pytest
import trio
import trustme
from http_client import _next_event, _request_bytes
from prometheus_client.parser import text_string_to_metric_families
from test_cli import LIMIT, PROXY

from proxy import exposure
from proxy.config import ConfigError, parse
from proxy.device import State

from helpers import (
    BEEP,
    BEEP_ANSWER,
    WAIT_LIMIT,
    device_named,
    meter,
    online,
    receive_exactly,
    running_proxy,
    settings_for,
    wait_for,
)

REGISTER = {"name": "reg", "type": "simulator", "protocol": "custom", "acquire_timeout": 30}


class Pki:
    """A CA, the proxy's server certificate and key, and client certificates, as PEM files in `folder`."""

    def __init__(self, folder: Path, name: str = "pki") -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = self.write(f"{name}-ca.pem", self.ca.cert_pem.bytes())
        self.server_cert, self.server_key = self.files(self.ca.issue_cert("127.0.0.1", "localhost"), f"{name}-server")

    def write(self, file_name: str, data: bytes) -> str:
        path = self.folder / file_name
        path.write_bytes(data)
        return str(path)

    def files(self, cert: trustme.LeafCert, stem: str) -> tuple[str, str]:
        chain = b"".join(pem.bytes() for pem in cert.cert_chain_pems)
        return self.write(f"{stem}.pem", chain), self.write(f"{stem}.key", cert.private_key_pem.bytes())

    def server_keys(self, **keys: object) -> dict:
        return {"tls_cert": self.server_cert, "tls_key": self.server_key, "tls_client_ca": self.ca_file, **keys}

    def client_context(self, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        """A client's context that trusts this CA's servers and shows `cert`, if given."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if cert is not None:
            cert.configure_cert(context)
        return context


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


def tls_address(running, name: str):
    """The device's first TLS port (its plain ports come first, then listen_tls's)."""
    config = running.devices[name].config
    return running.addresses[name][len(config.listen)]


async def tls_connect(address, context: ssl.SSLContext) -> trio.SSLStream:
    """A TLS client, its handshake done (with TLS 1.3 the server may still refuse it after this)."""
    stream = await trio.open_ssl_over_tcp_stream(address.host, address.port, ssl_context=context)
    try:
        with trio.fail_after(WAIT_LIMIT):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def refused_silently(stream: trio.abc.Stream) -> None:
    """The proxy ends the connection without a byte: an end of stream, or TLS's alert."""
    with trio.fail_after(WAIT_LIMIT), contextlib.suppress(trio.BrokenResourceError):
        assert await stream.receive_some() == b""
    await trio.aclose_forcefully(stream)


async def beep(stream: trio.abc.Stream) -> None:
    await stream.send_all(BEEP)
    assert await receive_exactly(stream, 9) == BEEP_ANSWER


def tls_device(pki: Pki, **keys: object) -> dict:
    return {**REGISTER, "listen": [], "listen_tls": ["127.0.0.1:0"], **pki.server_keys(**keys)}


async def test_a_client_with_a_good_certificate_gets_the_device(pki):
    client_cert = pki.ca.issue_cert("pos-1.example", common_name="pos-1")
    async with running_proxy(settings_for(tls_device(pki, tls_client_names=["pos-1"]))) as running:
        client = await tls_connect(tls_address(running, "reg"), pki.client_context(client_cert))
        async with client:
            await beep(client)
            assert client.version() in ("TLSv1.2", "TLSv1.3")
            assert ("IP Address", "127.0.0.1") in client.getpeercert()["subjectAltName"]


def _past(days: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no certificate", "certificate"),
        ("unknown CA", "certificate verify failed"),
        ("expired", "certificate has expired"),
        ("name not allowed", "certificate names (pos-2, pos-2.example) are not in tls_client_names"),
    ],
)
async def test_a_bad_client_certificate_is_refused_before_the_lock_and_counted(tmp_path, pki, log_lines, case, reason):
    good = pki.ca.issue_cert("pos-1.example", common_name="pos-1")
    bad = {
        "no certificate": None,
        "unknown CA": trustme.CA().issue_cert("pos-1.example", common_name="pos-1"),
        "expired": pki.ca.issue_cert("pos-1.example", common_name="pos-1", not_before=_past(3), not_after=_past(1)),
        "name not allowed": pki.ca.issue_cert("pos-2.example", common_name="pos-2"),
    }[case]
    settings = settings_for(tls_device(pki, tls_client_names=["pos-1", "pos-3.example"]), status="127.0.0.1:0")
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        async with await tls_connect(address, pki.client_context(good)) as holder:
            await beep(holder)
            await wait_for(device, lambda: device.holder is not None)
            try:
                stranger = await tls_connect(address, pki.client_context(bad))
            except trio.BrokenResourceError:
                pass  # TLS 1.2, or a client that refuses first: the handshake itself fails
            else:
                await refused_silently(stranger)
            await wait_for(device, lambda: device.counters.refused["tls"] == 1)
            # It never counted as a client nor waited for the lock; the holder's session goes on.
            assert device.clients == 1 and device.waiting == 0
            await beep(holder)
            samples = await metric_samples(running)
    assert samples[("devproxy_refused_total", (("device", "reg"), ("reason", "tls")))] == 1
    refusals = [line for line in log_lines if "refused: TLS handshake failed" in line]
    assert len(refusals) == 1 and "127.0.0.1:" in refusals[0] and reason in refusals[0]


async def metric_samples(running) -> dict:
    body = (await http_get(running.status, "/metrics")).body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def test_a_peer_that_stalls_its_handshake_blocks_no_other_client(pki, log_lines):
    settings = settings_for(tls_device(pki, sharing="exchange"), tls_handshake_timeout=60)
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        staller = await trio.open_tcp_stream(address.host, address.port)
        client_cert = pki.ca.issue_cert("pos-1.example")
        async with await tls_connect(address, pki.client_context(client_cert)) as client:
            await beep(client)
            assert device.clients == 1
        # The staller leaves at last: its handshake ends as a refusal, with the reason.
        await staller.aclose()
        await wait_for(device, lambda: device.counters.refused["tls"] == 1)
    assert device.clients == 0


async def test_a_handshake_past_tls_handshake_timeout_is_refused(pki, log_lines):
    settings = settings_for(tls_device(pki), tls_handshake_timeout=0.2)
    async with running_proxy(settings) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        async with await trio.open_tcp_stream(address.host, address.port) as staller:
            await refused_silently(staller)
        await wait_for(device, lambda: device.counters.refused["tls"] == 1)
    assert any("no handshake within tls_handshake_timeout = 0.2 s" in line for line in log_lines)


async def test_a_plain_port_and_a_tls_port_of_one_device_queue_together(pki):
    device_keys = {**tls_device(pki), "listen": ["127.0.0.1:0"], "tls_client_ca": ""}
    async with running_proxy(settings_for(device_keys)) as running:
        device = running.devices["reg"]
        plain = await trio.open_tcp_stream(*_host_port(running.addresses["reg"][0]))
        await beep(plain)
        await wait_for(device, lambda: device.state == State.BUSY)
        async with await tls_connect(tls_address(running, "reg"), pki.client_context()) as secured:
            await wait_for(device, lambda: device.waiting == 1)
            await plain.aclose()
            await beep(secured)
            assert device.clients == 1


def _host_port(address) -> tuple[str, int]:
    return address.host, address.port


async def test_a_dialin_modem_over_tls_registers_and_its_direct_port_serves_over_tls(tmp_path, pki):
    clients = Pki(tmp_path, "clients")
    table = {
        "listen_tls": ["127.0.0.1:0"],
        "registry": str(tmp_path / "registry.sqlite3"),
        "direct_ports": "any",
        "identify_timeout": 5,
        **pki.server_keys(tls_client_names=["METER7"]),
        "direct_tls": True,
        "direct_tls_client_ca": clients.ca_file,
    }
    settings = parse({"proxy": {"status": ""}, "dialin": table})
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        assert len(running.dialin) == 1  # listen_tls alone: no plain dial-in port
        modem_context = pki.client_context(pki.ca.issue_cert("meter7.example", common_name="METER7"))
        link = await tls_connect(running.dialin[0], modem_context)
        await link.send_all(b"METER7\n")
        device = await device_named(running, "METER7")
        await online(device)
        nursery.start_soon(meter, link)
        direct = running.addresses[device.name][0]
        client_context = clients.client_context(clients.ca.issue_cert("metering.example"))
        client_context.load_verify_locations(pki.ca_file)
        async with await tls_connect(direct, client_context) as client:
            await client.send_all(b"read")
            assert await receive_exactly(client, 8) == b"ANS:read"
        # A modem's certificate is not a client's: the direct port wants the clients' CA.
        with contextlib.suppress(trio.BrokenResourceError):
            await refused_silently(await tls_connect(direct, modem_context))
        await wait_for(device, lambda: device.counters.refused["tls"] == 1)
        await link.aclose()


async def http_get(address, target: str, context: ssl.SSLContext | None = None):
    """One GET over HTTP, or HTTPS with `context`: (status, body)."""
    with trio.fail_after(WAIT_LIMIT):
        if context is None:
            stream = await trio.open_tcp_stream(address.host, address.port)
        else:
            stream = await tls_connect(address, context)
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            await stream.send_all(_request_bytes(connection, str(address), "GET", target, {}, b""))
            response = await _next_event(stream, connection)
            body = bytearray()
            while not isinstance(event := await _next_event(stream, connection), h11.EndOfMessage):
                body += event.data
    return Reply(response.status_code, bytes(body))


class Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body


async def test_the_status_page_and_api_over_tls(pki):
    viewer = pki.ca.issue_cert("ops.example")
    settings = settings_for(
        REGISTER,
        status="127.0.0.1:0",
        status_tls_cert=pki.server_cert,
        status_tls_key=pki.server_key,
        status_tls_client_ca=pki.ca_file,
        status_tls_client_names=["ops.example"],
    )
    async with running_proxy(settings) as running:
        page = await http_get(running.status, "/", pki.client_context(viewer))
        api = await http_get(running.status, "/api/devices", pki.client_context(viewer))
        assert page.status == 200 and b"reg" in page.body
        assert api.status == 200 and b'"reg"' in api.body
        # Plain HTTP on the HTTPS port, or a viewer with no certificate, gets no page.
        with pytest.raises((h11.RemoteProtocolError, trio.BrokenResourceError)):
            await http_get(running.status, "/api/devices")
        with pytest.raises((h11.RemoteProtocolError, trio.BrokenResourceError)):
            await http_get(running.status, "/api/devices", pki.client_context())


async def test_a_reload_serves_new_certificates_to_new_clients_and_keeps_connected_ones(tmp_path, pki):
    settings = settings_for(tls_device(pki, sharing="exchange", tls_client_ca=""))
    async with running_proxy(settings) as running:
        address = tls_address(running, "reg")
        async with await tls_connect(address, pki.client_context()) as before:
            await beep(before)
            old_serial = before.getpeercert()["serialNumber"]
            renewed = Pki(tmp_path, "renewed")
            pki.files(renewed.ca.issue_cert("127.0.0.1"), "pki-server")  # over the served files
            await running.reload(running.settings)
            assert running.devices["reg"].clients == 1
            async with await tls_connect(address, renewed.client_context()) as after:
                await beep(after)
                assert after.getpeercert()["serialNumber"] != old_serial
            # The old session goes on, and a client that trusts only the old CA cannot connect now.
            await beep(before)
            with pytest.raises(trio.BrokenResourceError):
                await tls_connect(address, pki.client_context())


async def test_a_reload_with_an_unreadable_certificate_keeps_the_loaded_one(pki):
    settings = settings_for(tls_device(pki, tls_client_ca=""))
    async with running_proxy(settings) as running:
        pki.write("pki-server.key", b"not a key")
        await running.reload(running.settings)
        async with await tls_connect(tls_address(running, "reg"), pki.client_context()) as client:
            await beep(client)


async def tls_device_server(pki: Pki, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A device behind a TLS gateway that wants the proxy's client certificate, and answers ANS:."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.ca.issue_cert("127.0.0.1").configure_cert(context)
    context.load_verify_locations(pki.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED

    async def answer(stream: trio.SSLStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some():
                await stream.send_all(b"ANS:" + data)

    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1")
    task_status.started(listeners[0].transport_listener.socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


async def test_a_tcp_device_behind_tls_is_reached_with_a_client_certificate(pki):
    proxy_cert, proxy_key = pki.files(pki.ca.issue_cert("devproxy.example"), "proxy-client")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(tls_device_server, pki)
        device_keys = {
            "name": "gw",
            "type": "tcp",
            "path": f"127.0.0.1:{port}",
            "tls": True,
            "tls_ca": pki.ca_file,
            "tls_cert": proxy_cert,
            "tls_key": proxy_key,
        }
        async with running_proxy(settings_for(device_keys)) as running:
            client = await trio.open_tcp_stream(*_host_port(running.addresses["gw"][0]))
            async with client:
                await client.send_all(b"hello")
                assert await receive_exactly(client, 9) == b"ANS:hello"
        nursery.cancel_scope.cancel()


async def test_a_tcp_device_whose_certificate_the_ca_did_not_sign_stays_offline(tmp_path, pki):
    other = Pki(tmp_path, "other")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(tls_device_server, pki)
        device_keys = {"name": "gw", "type": "tcp", "path": f"127.0.0.1:{port}", "tls": True, "tls_ca": other.ca_file}
        async with running_proxy(settings_for(device_keys)) as running:
            device = running.devices["gw"]
            await wait_for(device, lambda: device.last_error is not None)
            assert device.state == State.OFFLINE
            assert "TLS handshake with 127.0.0.1" in device.last_error[1]
            assert "certificate verify failed" in device.last_error[1]
        nursery.cancel_scope.cancel()


# -- configuration ---------------------------------------------------------------------------------


def problems(*devices: dict, **proxy: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings_for(*devices, **proxy)
    return caught.value.problems


def test_tls_keys_that_do_not_fit_together_are_errors_naming_table_and_key(pki):
    assert problems({**REGISTER, "listen_tls": ["127.0.0.1:0"]}) == [
        "device 'reg': tls_cert is missing: a TLS port needs a certificate and its key"
    ]
    assert problems({**REGISTER, "tls_client_ca": pki.ca_file}) == [
        f"device 'reg': tls_client_ca = {pki.ca_file!r} has no effect: listen_tls is not set"
    ]
    assert problems(tls_device(pki, tls_client_ca="", tls_client_names=["pos-1"])) == [
        "device 'reg': tls_client_names needs tls_client_ca: only the names of a certificate it verified count"
    ]
    assert problems({**REGISTER, "tls": True}) == [
        "device 'reg': tls is for type = \"tcp\" devices (a TLS-terminating gateway)"
    ]
    assert problems(REGISTER, tls_handshake_timeout=0) == ["[proxy]: tls_handshake_timeout 0 must be > 0 seconds"]


def test_unreadable_or_mismatched_files_are_errors_naming_the_file(tmp_path, pki):
    missing = str(tmp_path / "missing.pem")
    other_key = Pki(tmp_path, "other").server_key
    (found,) = problems(tls_device(pki, tls_cert=missing))
    assert found.startswith("device 'reg': tls_cert does not load: cannot read ") and missing in found
    (found,) = problems(tls_device(pki, tls_key=other_key))
    assert pki.server_cert in found and other_key in found and "key values mismatch" in found
    (found,) = problems(tls_device(pki, tls_client_ca=pki.server_key))
    assert found.startswith(f"device 'reg': tls_client_ca does not load: {pki.server_key}: not a PEM CA certificate")
    (found,) = problems(tls_device(pki, tls_key=missing))
    assert found.startswith(f"device 'reg': tls_key does not load: cannot read {missing}")


@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_exit_2_naming_a_certificate_file_that_does_not_load(tmp_path, pki, command):
    settings = tmp_path / "settings.toml"
    missing = tmp_path / "gone.pem"
    settings.write_text(
        '[proxy]\nstatus = ""\n\n[[device]]\nname = "reg"\ntype = "simulator"\nprotocol = "custom"\n'
        f'listen_tls = ["127.0.0.1:0"]\ntls_cert = "{missing}"\ntls_key = "{pki.server_key}"\n'
    )
    result = subprocess.run([*PROXY, command, "-c", str(settings)], capture_output=True, text=True, timeout=LIMIT)
    assert result.returncode == 2
    assert f"tls_cert does not load: cannot read {missing}" in result.stderr


def test_check_warns_of_ports_open_to_any_host(tmp_path, pki):
    settings = settings_for(
        {**REGISTER, "listen": ["0.0.0.0:0"]},
        {**REGISTER, "name": "guarded", "listen": ["0.0.0.0:0"], "allow": ["10.0.0.0/8"]},
        tls_device(pki, name="certified", listen_tls=["0.0.0.0:0"]),
        {**REGISTER, "name": "local", "listen": ["127.0.0.1:0", "[::1]:0", "localhost:0"]},
        status="0.0.0.0:0",
    )
    assert exposure.warnings(settings) == [
        "device 'reg': listen 0.0.0.0:0 is open to any host: set allow, or use listen_tls with tls_client_ca",
        "[proxy]: status 0.0.0.0:0 is open to any host with no status_token",
    ]
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text(
        '[proxy]\nstatus = "0.0.0.0:8600"\nstatus_token = "secret"\n\n[[device]]\nname = "reg"\n'
        'type = "simulator"\nprotocol = "custom"\nlisten = ["0.0.0.0:8000"]\n'
    )
    result = subprocess.run([*PROXY, "check", "-c", str(settings_file)], capture_output=True, text=True, timeout=LIMIT)
    assert result.returncode == 0
    assert "warning: device 'reg': listen 0.0.0.0:8000 is open to any host" in result.stderr
    assert "status" not in result.stderr
