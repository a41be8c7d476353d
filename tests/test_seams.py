"""Where today's features meet the older machinery: reloads that add, move or renew TLS and RFC 2217 ports,
line settings changed under a holder, what `check`, the status page, its API and `devproxy status` say of
each port, keys given in the wrong table, and every settings example in the README."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import termios
import tomllib
from pathlib import Path

import pytest
import trio
from loguru import logger
from test_line_control import ComPortClient, serial_device, termios_of
from test_tls import REGISTER, Pki, beep, http_get, tls_address, tls_connect, tls_device

from proxy import cli, exposure
from proxy.config import ConfigError, Port, parse
from proxy.device import State
from proxy.rfc2217 import Command
from proxy.simulators.script import load_script
from proxy.status.client import fetch, table

from helpers import connect, receive_until_closed, running_proxy, settings_for, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def reload_log():
    """As conftest's log_lines, for a test that reloads: a reload sets the logging up anew and removes
    this sink after the lines a reload logs about its devices."""
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{level} {message}")
    yield lines
    with contextlib.suppress(ValueError):
        logger.remove(sink)


def free_port() -> int:
    """A port nothing listens on now, for a test that must name a port in two settings."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def reloaded(*devices: dict) -> object:
    return parse({"proxy": {"status": ""}, "device": list(devices)})


def ports_of(running, name: str) -> dict[str, list[Port]]:
    found: dict[str, list[Port]] = {}
    for address in running.addresses[name]:
        found.setdefault(address.kind, []).append(address)
    return found


# Reloads


async def test_a_reload_that_adds_tls_and_rfc2217_ports_serves_both(pki):
    plain = {**REGISTER, "listen": ["127.0.0.1:0"]}
    async with running_proxy(settings_for(plain)) as running:
        await running.reload(
            reloaded(
                {**tls_device(pki, tls_client_ca=""), "listen": ["127.0.0.1:0"], "listen_rfc2217": ["127.0.0.1:0"]}
            )
        )
        ports = ports_of(running, "reg")
        assert set(ports) == {"plain", "tls", "rfc2217"}
        async with await tls_connect(ports["tls"][0], pki.client_context()) as client:
            await beep(client)
        client = await ComPortClient.open(ports["rfc2217"][0])
        async with client.stream:
            # A simulator has no line: the configured rate comes back.
            assert (await client.ask(Command.SET_BAUDRATE, 1200)).value == 115200


async def test_a_port_moved_from_listen_to_listen_tls_speaks_tls_after_the_reload(pki):
    port = free_port()
    async with running_proxy(settings_for({**REGISTER, "listen": [f"127.0.0.1:{port}"]})) as running:
        await running.reload(reloaded({**tls_device(pki, tls_client_ca=""), "listen_tls": [f"127.0.0.1:{port}"]}))
        assert running.addresses["reg"] == [Port("127.0.0.1", port, "tls")]
        async with await tls_connect(running.addresses["reg"][0], pki.client_context()) as client:
            await beep(client)


async def test_new_certificate_file_names_alone_keep_the_device_and_its_clients(tmp_path, pki, reload_log):
    keys = tls_device(pki, tls_client_ca="", listen=["127.0.0.1:0"])
    async with running_proxy(settings_for(keys)) as running:
        device = running.devices["reg"]
        async with (
            await connect(running, "reg") as holder,
            await tls_connect(tls_address(running, "reg"), pki.client_context()) as waiter,
        ):
            await beep(holder)
            await wait_for(device, lambda: device.clients == 2)
            renewed = Pki(tmp_path, "renewed")
            cert, key = renewed.files(renewed.ca.issue_cert("127.0.0.1"), "renewed-server")
            # The ports stay as they were (0: bound once, at the start), only the files change.
            await running.reload(reloaded({**keys, "tls_cert": cert, "tls_key": key}))
            assert any("TLS ports serve" in line for line in reload_log)
            assert running.devices["reg"] is device and device.clients == 2
            await beep(holder)
            async with await tls_connect(tls_address(running, "reg"), renewed.client_context()) as newcomer:
                assert newcomer.getpeercert() is not None
            await holder.aclose()
            await beep(waiter)  # the TLS client made before the reload gets the device in its turn


async def test_new_certificate_files_that_no_longer_load_keep_the_device_as_it_was(tmp_path, pki, reload_log):
    keys = tls_device(pki, tls_client_ca="")
    async with running_proxy(settings_for(keys)) as running:
        device = running.devices["reg"]
        address = tls_address(running, "reg")
        async with await tls_connect(address, pki.client_context()) as client:
            await beep(client)
            renewed = Pki(tmp_path, "renewed")
            cert, key = renewed.files(renewed.ca.issue_cert("127.0.0.1"), "renewed-server")
            new = reloaded({**keys, "tls_cert": cert, "tls_key": key})
            renewed.write("renewed-server.key", b"not a key")  # spoilt between the check and the reload
            await running.reload(new)
            assert any("keep the certificate loaded before" in line for line in reload_log)
            assert running.devices["reg"] is device and device.clients == 1
            assert running.settings.devices[0].tls_cert == pki.server_cert
            await beep(client)
        async with await tls_connect(address, pki.client_context()) as again:
            await beep(again)


async def test_a_changed_rtscts_restarts_the_device_under_an_rfc2217_holder_and_takes_effect(pty):
    device_end = pty.plug()
    keys = serial_device(pty, baudrate=9600)
    async with running_proxy(settings_for(keys)) as running:
        device = running.devices["port"]
        await wait_for(device, lambda: device.link_up)
        address = ports_of(running, "port")["rfc2217"][0]
        client = await ComPortClient.open(address)
        async with client.stream:
            assert (await client.ask(Command.SET_BAUDRATE, 1200)).value == 1200
            assert pty.line_speed() == 1200
            await running.reload(reloaded({**keys, "listen_rfc2217": [str(address)], "rtscts": True}))
            assert await receive_until_closed(client.stream) == b""
        restarted = running.devices["port"]
        await wait_for(restarted, lambda: restarted.link_up)
        assert termios_of(pty)[2] & termios.CRTSCTS
        assert pty.line_speed() == 9600
        again = await ComPortClient.open(address)
        async with again.stream:
            assert (await again.ask(Command.SET_CONTROL, 0)).value == 3  # hardware flow control in force
    await device_end.aclose()


# What check, the status server and `devproxy status` say of each port


def test_check_shows_every_kind_of_port_and_the_line_settings(tmp_path, pki, capsys):
    settings = tmp_path / "settings.toml"
    settings.write_text(
        f'[proxy]\nstatus = "127.0.0.1:8600"\nstatus_tls_cert = "{pki.server_cert}"\n'
        f'status_tls_key = "{pki.server_key}"\n'
        '[[device]]\nname = "fptr1"\npath = "/dev/ttyUSB0"\nrtscts = true\ndtr = "off"\n'
        'listen_rfc2217 = ["127.0.0.1:8100"]\n'
        '[dialin]\nlisten = ["127.0.0.1:11001"]\ndirect_rfc2217 = true\n'
        f'registry = "{tmp_path / "registry.sqlite3"}"\n'
    )
    assert cli.main(["check", "-c", str(settings)]) == 0
    out = capsys.readouterr().out
    assert "no plain port" in out and "clients on \n" not in out
    assert "RFC 2217 clients on 127.0.0.1:8100" in out
    assert "rtscts, DTR off, RTS keep" in out
    assert "direct ports 7500-7999 (RFC 2217)" in out
    assert "status page on https://127.0.0.1:8600/" in out


async def test_the_status_api_page_and_table_say_which_ports_speak_tls_and_rfc2217(pki):
    keys = {**tls_device(pki, tls_client_ca=""), "listen": ["127.0.0.1:0"], "listen_rfc2217": ["127.0.0.1:0"]}
    async with running_proxy(settings_for(keys, status="127.0.0.1:0")) as running:
        ports = ports_of(running, "reg")
        listed = (await http_get(running.status, "/api/devices")).body
        (device,) = [entry for entry in json.loads(listed) if entry["id"] == "reg"]
        assert device["listen"] == [str(address) for address in running.addresses["reg"]]
        assert device["listen_tls"] == [str(ports["tls"][0])]
        assert device["listen_rfc2217"] == [str(ports["rfc2217"][0])]
        page = (await http_get(running.status, "/")).body.decode()
        assert f":{ports['tls'][0].port} TLS" in page and f":{ports['rfc2217'][0].port} RFC 2217" in page
        device_page = (await http_get(running.status, "/devices/reg")).body.decode()
        assert f"{ports['tls'][0]} (TLS)" in device_page
        text = table([device])
        assert f"{ports['tls'][0]} (TLS)" in text and f"{ports['rfc2217'][0]} (RFC 2217)" in text


async def test_devproxy_status_reads_an_https_status_server(pki, monkeypatch):
    keys = {"status_tls_cert": pki.server_cert, "status_tls_key": pki.server_key}
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0", **keys)) as running:
        monkeypatch.setenv("SSL_CERT_FILE", pki.ca_file)
        devices = await trio.to_thread.run_sync(fetch, f"https://{running.status}")
        assert [device["id"] for device in devices] == ["reg"]


# Keys in the wrong table


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"dialin": {"listen_rfc2217": ["127.0.0.1:8100"]}}, "[dialin]: unknown key 'listen_rfc2217'"),
        ({"dialin": {"listen_rfc2217": ["127.0.0.1:8100"]}}, "direct_rfc2217 = true"),
        ({"dialin": {"rtscts": True}}, "a dial-in device's line is its modem's"),
        ({"proxy": {"tls_cert": "x.pem"}}, "status_tls_cert"),
        ({"device": [{**REGISTER, "listen": ["127.0.0.1:0"], "direct_tls": True}]}, "a [dialin] key"),
        ({"device": [{**REGISTER, "listen": ["127.0.0.1:0"], "rtscts": True}]}, "rtscts = True is for type"),
        ({"proxy": {"status": "", "status_tls_cert": "x.pem"}}, "status_tls_cert = 'x.pem' has no effect"),
    ],
)
def test_a_key_in_the_wrong_table_is_an_error_that_says_where_it_belongs(tmp_path, document, problem):
    with pytest.raises(ConfigError) as raised:
        parse({"proxy": {"status": ""}, **document} if "proxy" not in document else document)
    assert any(problem in line for line in raised.value.problems), raised.value.problems


# The shipped settings and the README's examples


def readme_blocks() -> list[tuple[int, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"^```toml\n(.*?)^```$", text, re.M | re.S)
    ]


def test_the_shipped_settings_parse():
    parse(tomllib.loads((ROOT / "settings.toml").read_text(encoding="utf-8")), "settings.toml")


@pytest.mark.parametrize(("line", "block"), readme_blocks(), ids=[f"README.md:{line}" for line, _ in readme_blocks()])
def test_every_readme_toml_example_is_valid(tmp_path, pki, line, block):
    if "[[fault]]" in block:
        script = tmp_path / "faults.toml"
        script.write_text(block)
        load_script(str(script)).check("custom")
        return
    # The Securing example's files, made here: the check loads them.
    files = {"/etc/devproxy/tls/server.pem": pki.server_cert, "/etc/devproxy/tls/server.key": pki.server_key}
    files["/etc/devproxy/tls/ca.pem"] = pki.ca_file
    for name, made in files.items():
        block = block.replace(name, made)
    parse(tomllib.loads(block), f"README.md:{line}")


def test_readme_toml_examples_are_found():
    assert len(readme_blocks()) >= 7


async def test_state_is_unchanged_for_a_device_reload_left_alone(pki):
    """A reload of the same settings touches no device, TLS or not."""
    async with running_proxy(settings_for(tls_device(pki, tls_client_ca=""))) as running:
        device = running.devices["reg"]
        await running.reload(running.settings)
        assert running.devices["reg"] is device and device.state != State.OFFLINE


def test_check_warns_of_an_rfc2217_port_open_to_any_host():
    open_port = {**REGISTER, "listen": [], "listen_rfc2217": ["0.0.0.0:8100"]}
    guarded = {**open_port, "name": "guarded", "listen_rfc2217": ["0.0.0.0:8101"], "allow": ["10.0.0.0/8"]}
    found = exposure.warnings(parse({"proxy": {"status": ""}, "device": [open_port, guarded]}))
    assert found == ["device 'reg': listen_rfc2217 0.0.0.0:8100 is open to any host, who may set the line: set allow"]


async def test_devproxy_status_with_a_url_and_no_scheme_asks_https_when_the_settings_say_so(tmp_path, pki, monkeypatch):
    keys = {"status_tls_cert": pki.server_cert, "status_tls_key": pki.server_key}
    async with running_proxy(settings_for(REGISTER, status="127.0.0.1:0", **keys)) as running:
        settings = tmp_path / "settings.toml"
        settings.write_text(
            f'[proxy]\nstatus = "127.0.0.1:0"\n'
            f'status_tls_cert = "{pki.server_cert}"\nstatus_tls_key = "{pki.server_key}"\n'
        )
        monkeypatch.setenv("SSL_CERT_FILE", pki.ca_file)
        command = ["status", "--url", str(running.status), "--token", "unused", "-c", str(settings)]
        assert await trio.to_thread.run_sync(cli.main, command) == 0
