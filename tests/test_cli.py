"""The devproxy command as users run it: subprocesses, real ports, signals and exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PROXY = [sys.executable, "-m", "proxy"]
LIMIT = 20


def write_settings(settings_file: Path, port: int, **device: object) -> Path:
    keys = {
        "name": "reg",
        "type": "simulator",
        "protocol": "custom",
        "listen": [f"127.0.0.1:{port}"],
        **device,
    }
    body = "\n".join(f"{key} = {_toml(value)}" for key, value in keys.items())
    settings_file.write_text(f'[proxy]\nstatus = ""\n\n[[device]]\n{body}\n')
    return settings_file


def _toml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value).lower()


@contextmanager
def spawn(*args: str, **popen: object) -> Iterator[subprocess.Popen]:
    """A devproxy subprocess that is killed, whatever happens, when the block ends."""
    process = subprocess.Popen([*PROXY, *args], text=True, **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(LIMIT)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def wait_for_line(stream, pattern: str) -> re.Match:
    """Reads lines until one matches: the process says it is ready (the test has a timeout of its own)."""
    seen = []
    for line in stream:
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"process ended without printing {pattern!r}:\n{''.join(seen)}")


def test_run_serves_then_exits_0_on_sigterm_closing_its_clients(tmp_path):
    settings = write_settings(tmp_path / "settings.toml", 0)
    with spawn("run", "-c", str(settings), stderr=subprocess.PIPE) as proxy:
        port = int(wait_for_line(proxy.stderr, r"sharing\) on 127\.0\.0\.1:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as client:
            client.sendall(bytes.fromhex("01 05 00 13 3F 42 0F 00 A8"))
            answer = b""
            while len(answer) < 9:
                answer += client.recv(64)
            assert answer == bytes.fromhex("06 01 04 00 13 00 00 63 7A")
            proxy.send_signal(signal.SIGTERM)
            assert client.recv(64) == b""
        assert proxy.wait(LIMIT) == 0


def test_run_exits_0_on_sigint(tmp_path):
    settings = write_settings(tmp_path / "settings.toml", 0)
    with spawn("run", "-c", str(settings), stderr=subprocess.PIPE) as proxy:
        wait_for_line(proxy.stderr, r"sharing\) on 127\.0\.0\.1:\d+")
        proxy.send_signal(signal.SIGINT)
        assert proxy.wait(LIMIT) == 0


def test_run_exits_2_when_a_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = write_settings(tmp_path / "settings.toml", port)
        result = subprocess.run([*PROXY, "run", "-c", str(settings)], capture_output=True, text=True, timeout=LIMIT)
    assert result.returncode == 2
    assert f"device 'reg': cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_run_and_check_exit_2_listing_every_config_problem(tmp_path):
    settings = write_settings(tmp_path / "settings.toml", 8000, baudrate=-1, sharing="everyone")
    for command in ("run", "check"):
        result = subprocess.run([*PROXY, command, "-c", str(settings)], capture_output=True, text=True, timeout=LIMIT)
        assert result.returncode == 2
        assert "2 problem(s)" in result.stderr
        assert "device 'reg': baudrate -1 is not >= 1" in result.stderr
        assert "device 'reg': sharing 'everyone' is not one of session, exchange" in result.stderr


def test_check_prints_what_would_run(tmp_path):
    settings = write_settings(tmp_path / "settings.toml", 8123)
    result = subprocess.run([*PROXY, "check", "-c", str(settings)], capture_output=True, text=True, timeout=LIMIT)
    assert result.returncode == 0
    assert "reg: simulator simulated custom device" in result.stdout
    assert "clients on 127.0.0.1:8123" in result.stdout


def test_config_path_comes_from_the_environment(tmp_path):
    settings = write_settings(tmp_path / "elsewhere.toml", 8124)
    env = {**os.environ, "DEVPROXY_CONFIG": str(settings)}
    result = subprocess.run([*PROXY, "check"], capture_output=True, text=True, timeout=LIMIT, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:8124" in result.stdout


def test_simulate_on_a_pty_and_send_through_the_proxy(tmp_path):
    link = tmp_path / "ttyREG"
    with spawn("simulate", "custom", "--pty", str(link), stdout=subprocess.PIPE) as sim:
        slave = wait_for_line(sim.stdout, r"on (/dev/pts/\d+)").group(1)
        assert os.readlink(link) == slave
        settings = write_settings(tmp_path / "settings.toml", 0, type="serial", path=str(link))
        with spawn("run", "-c", str(settings), stderr=subprocess.PIPE) as proxy:
            port = wait_for_line(proxy.stderr, r"sharing\) on 127\.0\.0\.1:(\d+)").group(1)
            sent = subprocess.run(
                [*PROXY, "send", f"127.0.0.1:{port}", "--protocol", "custom", "--command", "beep"],
                capture_output=True,
                text=True,
                timeout=LIMIT,
            )
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(LIMIT) == 0
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(LIMIT) == 0
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.splitlines() == [
        "sent 01 05 00 13 3f 42 0f 00 a8",
        "ACK",
        "response 01 04 00 13 00 00 63 7a: command 13h, OK, data 63",
    ]
    assert not link.exists()


@pytest.fixture
def simulator_port():
    with spawn("simulate", "custom", "--listen", "127.0.0.1:0", stdout=subprocess.PIPE) as sim:
        yield int(wait_for_line(sim.stdout, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(LIMIT) == 0


def send(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PROXY, "send", f"127.0.0.1:{port}", "--protocol", "custom", *args],
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )


def test_send_hex_prints_the_decoded_answer(simulator_port):
    result = send(simulator_port, "--hex", "01 07 00 04 3F 42 0F 00 10 00 AB")
    assert result.returncode == 0
    assert "command 04h, OK, data 63 08 07 e8 03" in result.stdout


def test_send_exits_1_on_a_nak(simulator_port):
    result = send(simulator_port, "--hex", "01 05 00 13 3F 42 0F 00 A9")
    assert result.returncode == 1
    assert "error: NAK" in result.stderr


def test_send_reports_a_device_error_code(simulator_port):
    result = send(simulator_port, "--command", "beep", "--password", "1")
    assert result.returncode == 0
    assert "error 101" in result.stdout


def test_send_exits_1_when_nothing_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = send(port, "--command", "beep")
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr


def test_send_exits_1_on_a_timeout(simulator_port):
    result = send(simulator_port, "--hex", "01 05 00", "--timeout", "0.01")
    assert result.returncode == 1
    assert "no complete answer within 0.01 s" in result.stderr or "NAK" in result.stderr


def test_status_prints_the_device_table_and_json(tmp_path):
    settings = write_settings(tmp_path / "settings.toml", 0)
    text = settings.read_text().replace('status = ""', 'status = "127.0.0.1:0"\nstatus_token = "t0ken"')
    settings.write_text(text)
    with spawn("run", "-c", str(settings), stderr=subprocess.PIPE) as proxy:
        address = wait_for_line(proxy.stderr, r"status page on http://(127\.0\.0\.1:\d+)/").group(1)
        wait_for_line(proxy.stderr, r"sharing\) on 127\.0\.0\.1:\d+")
        table = subprocess.run(
            [*PROXY, "status", "--url", address, "--token", "t0ken"], capture_output=True, text=True, timeout=LIMIT
        )
        as_json = subprocess.run(
            [*PROXY, "status", "-c", str(settings), "--url", address, "--json"],
            capture_output=True,
            text=True,
            timeout=LIMIT,
        )
        refused = subprocess.run([*PROXY, "status", "--url", address], capture_output=True, text=True, timeout=LIMIT)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:2] == ["DEVICE", "STATE"]
    assert table.stdout.splitlines()[1].split()[:2] == ["reg", "idle"]
    assert as_json.returncode == 0 and json.loads(as_json.stdout)[0]["name"] == "reg"
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr


def test_status_says_why_when_no_proxy_answers():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [*PROXY, "status", "--url", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=LIMIT
    )
    assert result.returncode == 1 and "cannot reach" in result.stderr
