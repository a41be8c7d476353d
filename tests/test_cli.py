"""The devproxy command as users run it: subprocesses, real ports, signals and exit codes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.cli import main

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


def test_send_exits_3_and_decodes_a_device_error_answer(simulator_port):
    result = send(simulator_port, "--command", "beep", "--password", "1")
    assert result.returncode == 3
    assert "command 13h, error 101" in result.stdout
    assert result.stderr == "error: the register answered error 101 to command 13h\n"


@pytest.mark.parametrize(
    ("protocol", "args", "expected"),
    [
        ("custom", ["--command", "beep"], "error: the register answered error 3503 (busy with another command)"),
        ("iec61107", ["--read", "VOLTA"], "error: the meter answered ERR19 (busy: another port holds programming"),
        ("shtrih", [], "error: the register answered error 50h to command 10h"),
        ("energomera-ce", [], "error: the meter answered error 02 to command 0120"),
    ],
)
def test_send_exits_3_when_a_busy_device_answers_with_its_error(protocol, args, expected):
    with spawn("simulate", protocol, "--listen", "127.0.0.1:0", "--busy", stdout=subprocess.PIPE) as sim:
        port = wait_for_line(sim.stdout, r"listening on 127\.0\.0\.1:(\d+)").group(1)
        result = subprocess.run(
            [*PROXY, "send", f"127.0.0.1:{port}", "--protocol", protocol, *args],
            capture_output=True,
            text=True,
            timeout=LIMIT,
        )
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(expected)
    assert len(result.stderr.splitlines()) == 1


def test_send_exits_1_when_nothing_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = send(port, "--command", "beep")
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr


@contextmanager
def listening() -> Iterator[socket.socket]:
    """A TCP port on 127.0.0.1 that the test answers by hand, as a device that stops half-way."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(LIMIT)
        yield server


def test_send_exits_1_on_a_timeout_showing_what_it_received():
    with listening() as device:
        port = device.getsockname()[1]
        beep = ("send", f"127.0.0.1:{port}", "--protocol", "custom", "--command", "beep", "--timeout", "1")
        with spawn(*beep, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as sender:
            connection, _ = device.accept()
            with connection:
                assert connection.recv(64) == bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")
                connection.sendall(bytes.fromhex("06 01 04 00"))  # the ACK, and a response cut short
                out, err = sender.communicate(timeout=LIMIT)
    assert sender.returncode == 1
    assert out.splitlines() == ["sent 01 05 00 13 3f 42 0f 00 a8", "ACK"]
    assert err == "error: no complete answer within 1 s; received 06 01 04 00\n"


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


def test_status_says_so_in_one_line_when_a_service_that_is_not_http_answers():
    with listening() as service:
        address = f"127.0.0.1:{service.getsockname()[1]}"
        with spawn("status", "--url", address, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
            connection, _ = service.accept()
            with connection:
                assert connection.recv(1024)  # the request is out
                connection.sendall(b"hello, this is no HTTP\r\nat all\r\n")
            out, err = process.communicate(timeout=LIMIT)
    assert process.returncode == 1
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: http://{address}: not a devproxy status server (BadStatusLine")


@pytest.mark.parametrize(
    ("protocol", "message"),
    [
        ("custom", "custom needs --command beep, status or read-vat (or --hex BYTES)"),
        ("dle", "dle needs --keys with key codes, e.g. 1,2,75 (or --hex BYTES)"),
        ("coges", "coges needs --keys (e.g. ENT,2,9), --price N or --manager-code CODE (or --hex BYTES)"),
        ("iec61107", "iec61107 needs --read NAME, the parameter to read, e.g. VOLTA (or --hex BYTES)"),
    ],
)
def test_send_names_the_choices_of_a_missing_option_before_connecting(protocol, message):
    with listening() as device:
        port = device.getsockname()[1]
        result = subprocess.run(
            [*PROXY, "send", f"127.0.0.1:{port}", "--protocol", protocol],
            capture_output=True,
            text=True,
            timeout=LIMIT,
        )
        device.settimeout(0)
        with pytest.raises(BlockingIOError):
            device.accept()  # nobody connected
    assert result.returncode == 2
    assert result.stderr == f"error: {message}\n"


@pytest.fixture
def dialin_settings(tmp_path):
    settings = tmp_path / "cenc.toml"
    settings.write_text(
        f'[proxy]\nstatus = ""\n\n[dialin]\nlisten = ["127.0.0.1:0"]\nregistry = "{tmp_path / "reg.sqlite3"}"\n'
    )
    return settings


def test_config_option_comes_before_or_after_the_command_and_its_action(dialin_settings, tmp_path):
    path = str(dialin_settings)
    added = subprocess.run(
        [*PROXY, "devices", "add", "METER-001", "-c", path], capture_output=True, text=True, timeout=LIMIT
    )
    assert added.returncode == 0, added.stderr
    for command in (
        ["devices", "list", "-c", path],
        ["devices", "-c", path, "list"],
        ["-c", path, "devices", "list"],
        ["check", "-c", path],
        ["-c", path, "check"],
    ):
        # cwd has no settings.toml: only the -c file can make these work.
        result = subprocess.run([*PROXY, *command], capture_output=True, text=True, timeout=LIMIT, cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        assert ("METER-001" if "devices" in command else "cenc.toml: OK") in result.stdout


def test_config_option_is_refused_where_no_settings_are_read_and_checked_where_named(tmp_path):
    send = subprocess.run(
        [*PROXY, "-c", "cenc.toml", "send", "127.0.0.1:1", "--protocol", "custom"], capture_output=True, text=True
    )
    assert send.returncode == 2
    assert send.stderr.startswith("devproxy: error: -c/--config is for run, check, status and devices;")
    status = subprocess.run([*PROXY, "status", "-c", str(tmp_path / "missing.toml")], capture_output=True, text=True)
    assert status.returncode == 2
    assert status.stderr == f"{tmp_path / 'missing.toml'}: cannot read the file: No such file or directory\n"


def test_version_is_the_installed_packages():
    result = subprocess.run([*PROXY, "--version"], capture_output=True, text=True, timeout=LIMIT)
    assert result.returncode == 0
    assert result.stdout == f"devproxy {importlib.metadata.version('devproxy')}\n"


@pytest.mark.parametrize("command", ["send", "status"])
def test_ctrl_c_while_waiting_for_an_answer_exits_130_without_a_traceback(command):
    with listening() as device:
        address = f"127.0.0.1:{device.getsockname()[1]}"
        args = ("send", address, "--protocol", "custom", "--command", "beep") if command == "send" else ()
        args = args or ("status", "--url", address)
        with spawn(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
            connection, _ = device.accept()
            with connection:
                assert connection.recv(1024)  # the request is out: the command waits for its answer
                process.send_signal(signal.SIGINT)
                out, err = process.communicate(timeout=LIMIT)
    assert process.returncode == 130
    assert err == ""
    assert out == ("sent 01 05 00 13 3f 42 0f 00 a8\n" if command == "send" else "")


@pytest.mark.parametrize("command", [["check"], ["devices", "list"], ["--version"]])
def test_a_reader_that_closed_the_pipe_ends_the_command_quietly(command, dialin_settings):
    reader, writer = os.pipe()
    os.close(reader)  # as `| head -1` does once it has its line
    config = [] if command == ["--version"] else ["-c", str(dialin_settings)]
    try:
        result = subprocess.run([*PROXY, *command, *config], stdout=writer, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(writer)
    assert result.returncode == 141
    assert result.stderr == ""


def test_import_with_output_dash_writes_the_settings_to_stdout(tmp_path):
    source = Path(__file__).parent / "data" / "cencn-appsettings.json"
    result = subprocess.run(
        [*PROXY, "import", "cencn", str(source), "-o", "-"], capture_output=True, text=True, timeout=LIMIT, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "dialin" in tomllib.loads(result.stdout)
    assert f"wrote a [dialin] table from {source} to stdout" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_errors_are_one_line_without_a_traceback(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        failures = {
            ("simulate", "custom", "--listen", f"127.0.0.1:{port}"): 2,
            ("simulate", "custom", "--pty", str(tmp_path / "no" / "such" / "dir")): 2,
            ("status", "--url", "http://[::1"): 2,
            ("send", "127.0.0.1:1", "--protocol", "custom", "--timeout", "-1"): 2,
            ("send", "127.0.0.1:1", "--protocol", "dle", "--keys", "1", "--id", "300"): 2,
            ("import", "cencn", str(tmp_path / "missing.json")): 1,
            ("no-such-command",): 2,
        }
        for args, code in failures.items():
            result = subprocess.run([*PROXY, *args], capture_output=True, text=True, timeout=LIMIT, cwd=tmp_path)
            assert result.returncode == code, (args, result.stderr)
            assert len(result.stderr.splitlines()) == 1, (args, result.stderr)
            assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        *("run", "check", "simulate", "send", "import", "status"),
        *("devices", "devices list", "devices add", "devices remove", "devices import"),
    ],
)
def test_each_command_help_has_a_description_and_examples(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    _usage, description, *rest = capsys.readouterr().out.split("\n\n")
    assert description.strip() and not description.startswith("options:")
    assert f"examples:\n  devproxy {command}" in rest[-1]


def test_the_command_line_imports_neither_trio_nor_loguru_until_a_command_needs_them():
    # What keeps `devproxy --help` and `check` fast: trio and loguru take most of a start's time.
    code = "import sys; from proxy import cli; cli.build_parser(); print(sorted({'trio', 'loguru'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=LIMIT)
    assert result.stdout == "[]\n", result.stderr
