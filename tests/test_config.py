"""settings.toml: defaults, and one ConfigError naming table, key and value for every problem."""

from __future__ import annotations

import ipaddress
import os

import attrs
import pytest
import trio

from proxy.cli import main
from proxy.config import Address, ConfigError, ProxyConfig, Settings, load, parse

from helpers import BEEP, BEEP_ANSWER, connect, receive_exactly, receive_until_closed, running_proxy

GOOD_DEVICE = {"name": "fptr1", "type": "serial", "path": "/dev/ttyUSB0", "listen": ["127.0.0.1:8000"]}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(raw, "settings.toml")
    return caught.value.problems


def one_problem(raw: dict) -> str:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    return problems[0]


def device(**keys) -> dict:
    return {"device": [{**GOOD_DEVICE, **keys}]}


def test_shipped_settings_file_is_valid():
    settings = load("settings.toml")
    assert [d.name for d in settings.devices] == ["custom-sim"]
    assert settings.devices[0].type == "simulator"
    assert settings.devices[0].listen == (Address("127.0.0.1", 8000),)


def test_every_key_has_a_default():
    settings = parse(device())
    assert settings.proxy == ProxyConfig()
    config = settings.devices[0]
    assert (config.baudrate, config.bytesize, config.parity, config.stopbits) == (115200, 8, "N", 1)
    assert (config.protocol, config.sharing, config.acquire_timeout, config.busy_reply) == (
        "raw",
        "session",
        5.0,
        b"",
    )
    assert (config.reconnect_interval, config.release_port, config.idle_timeout, config.max_clients) == (
        2.0,
        False,
        0.0,
        32,
    )


def test_every_key_is_read():
    settings = parse(
        {
            "proxy": {
                "log_level": "TRACE",
                "log_file": "/tmp/devproxy.log",
                "log_rotation": "1 MB",
                "log_retention": 2,
                "log_json": True,
                "status": "0.0.0.0:8600",
                "status_token": "secret",
            },
            "device": [
                {
                    **GOOD_DEVICE,
                    "baudrate": 9600,
                    "bytesize": 7,
                    "parity": "E",
                    "stopbits": 2,
                    "protocol": "custom",
                    "listen": ["127.0.0.1:8000", "[::1]:8001"],
                    "acquire_timeout": 1,
                    "busy_reply": "15 0a",
                    "response_timeout": 2.5,
                    "exchange_timeout": 10,
                    "frame_gap": 0.1,
                    "reconnect_interval": 0,
                    "release_port": True,
                    "idle_timeout": 30,
                    "max_clients": 4,
                    "allow": ["192.168.1.0/24", "10.0.0.1"],
                }
            ],
        }
    )
    proxy, config = settings.proxy, settings.devices[0]
    assert proxy.log_json and proxy.status == Address("0.0.0.0", 8600) and proxy.status_token == "secret"
    assert config.listen == (Address("127.0.0.1", 8000), Address("::1", 8001))
    assert config.busy_reply == b"\x15\x0a"
    assert config.stopbits == 2 and config.parity == "E" and config.bytesize == 7
    assert config.allow == (ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("10.0.0.1/32"))
    assert config.acquire_timeout == 1.0 and isinstance(config.acquire_timeout, float)


def test_empty_status_turns_the_status_server_off():
    assert parse({"proxy": {"status": ""}}).proxy.status is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"dialup": {}}, "unknown table or key [dialup]"),
        ({"proxy": {"colour": "red"}}, "[proxy]: unknown key 'colour' = 'red'"),
        ({"proxy": {"log_level": "LOUD"}}, "[proxy]: log_level 'LOUD' is not one of TRACE"),
        ({"proxy": {"log_json": "yes"}}, "[proxy]: log_json 'yes' is a string, expected true or false"),
        ({"proxy": {"log_retention": -1}}, "[proxy]: log_retention -1 is not >= 0"),
        ({"proxy": {"log_rotation": "big"}}, "[proxy]: log_rotation 'big' is not a size"),
        ({"proxy": {"status": "8600"}}, "[proxy]: status '8600' is not HOST:PORT"),
        ({"proxy": "loud"}, "[proxy]: must be a table"),
        ({"device": {"name": "x"}}, "[[device]]: must be an array of tables"),
        (device(colour="red"), "device 'fptr1': unknown key 'colour' = 'red'"),
        (device(type="usb"), "device 'fptr1': type 'usb' is not one of serial, tcp, simulator"),
        (device(baudrate="fast"), "device 'fptr1': baudrate 'fast' is a string, expected an integer"),
        (device(baudrate=True), "device 'fptr1': baudrate True is a boolean, expected an integer"),
        (device(baudrate=0), "device 'fptr1': baudrate 0 is not >= 1"),
        (device(bytesize=9), "device 'fptr1': bytesize 9 is not in 5-8"),
        (device(parity="X"), "device 'fptr1': parity 'X' is not one of N, E, O, M, S"),
        (device(stopbits=3), "device 'fptr1': stopbits 3 is an integer, expected 1, 1.5 or 2"),
        (device(protocol="modbus"), "device 'fptr1': protocol 'modbus' is not one of raw, custom"),
        (
            device(listen="127.0.0.1:8000"),
            "device 'fptr1': listen '127.0.0.1:8000' is a string, expected a list",
        ),
        (device(listen=["8000"]), "device 'fptr1': listen '8000' is not HOST:PORT"),
        (
            device(listen=["127.0.0.1:70000"]),
            "device 'fptr1': listen '127.0.0.1:70000': port 70000 is not in 0-65535",
        ),
        (device(listen=[]), "device 'fptr1': listen is empty: no client could reach this device"),
        (device(sharing="shared"), "device 'fptr1': sharing 'shared' is not one of session, exchange"),
        (device(acquire_timeout=-1), "device 'fptr1': acquire_timeout -1 must be >= 0 seconds"),
        (
            device(acquire_timeout=float("nan")),
            "device 'fptr1': acquire_timeout nan is not a number of seconds: give a finite number",
        ),
        (device(exchange_timeout=float("inf")), "device 'fptr1': exchange_timeout inf is not a number of seconds"),
        (device(client_write_timeout=0), "device 'fptr1': client_write_timeout 0 must be > 0 seconds"),
        (device(max_message=0), "device 'fptr1': max_message 0 is not in 1-16777216"),
        (device(iec_signon_baudrate=0), "device 'fptr1': iec_signon_baudrate 0 is not >= 1"),
        (device(iec_baud_switch="yes"), "device 'fptr1': iec_baud_switch 'yes' is a string, expected true or false"),
        (device(response_timeout=0), "device 'fptr1': response_timeout 0 must be > 0 seconds"),
        (device(busy_reply="busy"), "device 'fptr1': busy_reply 'busy' is not hex bytes"),
        (
            device(busy_reply="auto"),
            "device 'fptr1': busy_reply 'auto' answers a refused request, so it needs sharing = 'exchange'",
        ),
        (device(release_port=1), "device 'fptr1': release_port 1 is an integer, expected true or false"),
        (device(max_clients=0), "device 'fptr1': max_clients 0 is not >= 1"),
        (device(allow=["everyone"]), "device 'fptr1': allow 'everyone' is not a network in CIDR form"),
        (
            device(allow="10.0.0.0/8"),
            "device 'fptr1': allow '10.0.0.0/8' is a string, expected a list of networks",
        ),
        (device(name="fptr 1"), "device 'fptr 1': name 'fptr 1' may hold only letters, digits, '-' and '_'"),
        (device(name="касса 1"), "device 'касса 1': name 'касса 1' may hold only letters, digits"),
        (device(path=""), "device 'fptr1': path is empty"),
        (device(type="tcp", path="printer"), "device 'fptr1': path 'printer' is not HOST:PORT"),
        (
            device(type="tcp", path="10.0.0.5:0"),
            "device 'fptr1': path '10.0.0.5:0': a device's port cannot be 0",
        ),
        (device(type="simulator", protocol="raw"), "device 'fptr1': protocol 'raw' has no simulator"),
    ],
)
def test_each_bad_value_is_one_problem_naming_table_key_and_value(raw, expected):
    assert one_problem(raw).startswith(expected) or expected in one_problem(raw)


def test_missing_name_and_path_are_reported():
    problems = problems_of({"device": [{"type": "serial", "listen": ["127.0.0.1:1"]}]})
    assert problems == [
        "[[device]] #1: name is missing",
        "[[device]] #1: path is missing (a serial device needs one)",
    ]


def test_missing_listen_is_reported():
    assert one_problem({"device": [{"name": "a", "path": "/dev/ttyS0"}]}) == (
        "device 'a': listen is missing: no client could reach this device"
    )


def test_duplicate_names_and_clashing_ports_are_reported():
    problems = problems_of(
        {
            "proxy": {"status": "127.0.0.1:8600"},
            "device": [
                {**GOOD_DEVICE, "name": "a", "listen": ["127.0.0.1:8000"]},
                {**GOOD_DEVICE, "name": "a", "listen": ["0.0.0.0:8000"]},
                {**GOOD_DEVICE, "name": "b", "listen": ["127.0.0.1:8600", "127.0.0.2:8001"]},
                {**GOOD_DEVICE, "name": "c", "listen": ["127.0.0.1:8001", "127.0.0.1:0", "127.0.0.1:0"]},
            ],
        }
    )
    assert problems == [
        "device 'a': name 'a' is used by another device",
        "device 'a': listen '0.0.0.0:8000' clashes with '127.0.0.1:8000' of device 'a' listen",
        "device 'b': listen '127.0.0.1:8600' clashes with '127.0.0.1:8600' of [proxy] status",
    ]


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        {
            "proxy": {"log_level": "LOUD", "status": "nowhere"},
            "device": [
                {**GOOD_DEVICE, "baudrate": -5, "listen": ["x"]},
                {**GOOD_DEVICE, "name": "b", "type": "fax"},
            ],
        }
    )
    assert len(problems) == 5
    assert str(ConfigError("settings.toml", problems)).startswith("settings.toml: 5 problem(s):\n  - [proxy]")


def test_unreadable_and_invalid_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy\nlog_level = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load(binary)


def dialin(**keys) -> dict:
    return {"proxy": {"status": ""}, "dialin": {"ping_after": 0, **keys}}


def test_dialin_defaults_and_every_key_are_read():
    assert parse({"proxy": {"status": ""}, "dialin": {"ping_bytes": "00"}}).dialin.direct_ports == (7500, 7999)
    config = parse(
        dialin(
            listen=["0.0.0.0:11001", "0.0.0.0:11002"],
            identify="regex",
            identify_pattern=r"ID=(\w+);",
            identify_timeout=10,
            autoregister=False,
            registry="/var/lib/devproxy/reg.sqlite3",
            direct_ports="20000-20099",
            protocol="iec61107",
            sharing="exchange",
            idle_after=30,
            disconnect_after=600,
            ping_after=60,
            ping_bytes="2f 3f 21 0d 0a",
            max_devices=100,
            acquire_timeout=1,
            busy_reply="auto",
            max_clients=2,
            allow=["10.0.0.0/8"],
        )
    ).dialin
    assert config.direct_ports == (20000, 20099) and config.ping_bytes == b"/?!\r\n"
    assert (config.identify, config.autoregister, config.max_devices, config.busy_reply) == (
        "regex",
        False,
        100,
        "auto",
    )
    device = config.device_config("METER1", "METER1", 20000)
    assert (device.type, device.path, device.protocol, device.max_clients) == ("dialin", "METER1", "iec61107", 2)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (dialin(identify="magic"), "[dialin]: identify 'magic' is not one of line, regex, fixed, iec61107"),
        (dialin(identify="regex"), "[dialin]: identify_pattern is missing"),
        (dialin(identify="regex", identify_pattern="(unclosed"), "[dialin]: identify_pattern '(unclosed' is not a"),
        (dialin(identify="regex", identify_pattern="ID"), "[dialin]: identify_pattern 'ID' has no group"),
        (dialin(identify="fixed"), "[dialin]: identify_length is 0"),
        (dialin(direct_ports="7999-7500"), "[dialin]: direct_ports '7999-7500' is not a port range"),
        (dialin(direct_ports="lots"), "[dialin]: direct_ports 'lots' is not a port range"),
        (dialin(ping_after=60), "[dialin]: ping_bytes is empty but ping_after = 60"),
        (dialin(listen=[]), "[dialin]: listen is empty"),
        (dialin(max_devices=0), "[dialin]: max_devices 0 is not >= 1"),
        (dialin(registry=""), "[dialin]: registry '' is a string, expected a file path"),
        (dialin(colour="red"), "[dialin]: unknown key 'colour' = 'red'"),
        (dialin(busy_reply="auto"), "[dialin]: busy_reply 'auto' answers a refused request"),
        (dialin(direct_ports="8000-8700"), "[dialin]: direct_ports 8000-8700 holds port 8600 of [proxy] status"),
        ({"dialin": "on"}, "[dialin]: must be a table"),
    ],
)
def test_each_bad_dialin_value_is_one_problem(raw, expected):
    if expected.startswith("[dialin]: direct_ports 8000-8700"):
        raw = {**raw, "proxy": {"status": "127.0.0.1:8600"}}
    problem = one_problem(raw)
    assert problem.startswith(expected), problem


def test_a_device_port_inside_the_direct_ports_is_a_clash():
    problems = problems_of({**dialin(), "device": [{**GOOD_DEVICE, "listen": ["127.0.0.1:7600"]}]})
    assert problems == ["device 'fptr1': listen '127.0.0.1:7600' is in [dialin] direct_ports"]


def test_names_may_be_in_any_script():
    settings = parse({"device": [{"name": "касса-1", "path": "/dev/ttyS0", "listen": ["127.0.0.1:1"]}]})
    assert settings.devices[0].name == "касса-1"


def test_a_log_file_that_is_a_directory_or_cannot_be_created_is_refused(tmp_path):
    assert one_problem({"proxy": {"log_file": str(tmp_path)}}).startswith(
        f"[proxy]: log_file {str(tmp_path)!r} is a directory"
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot be created" in one_problem({"proxy": {"log_file": str(blocker / "logs" / "devproxy.log")}})
    parse({"proxy": {"log_file": str(tmp_path / "new" / "devproxy.log")}})  # missing directories are created


def test_a_settings_path_that_is_no_regular_file_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "settings.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load("/dev/zero")


def test_arrays_nested_too_deeply_are_a_config_error_not_a_crash(tmp_path):
    deep = tmp_path / "settings.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load(deep)


def test_a_log_file_name_too_long_for_the_system_is_a_config_problem():
    assert "cannot be a file: File name too long" in one_problem({"proxy": {"log_file": "x" * 300}})


def test_an_iec_serial_line_opens_at_the_sign_on_rate_unless_switching_is_off():
    def iec(**keys):
        table = {"name": "m", "path": "/dev/ttyS0", "listen": ["127.0.0.1:1"], "protocol": "iec61107", **keys}
        return parse({"device": [table]}).devices[0]

    assert iec(baudrate=9600).line_baudrate == 300
    assert iec(baudrate=9600, iec_signon_baudrate=9600).line_baudrate == 9600
    assert iec(baudrate=9600, iec_baud_switch=False).line_baudrate == 9600
    assert iec(type="tcp", path="10.0.0.1:1", baudrate=9600).switches_baud is False


def test_ping_is_off_unless_ping_bytes_are_given_then_after_two_minutes():
    assert parse({"dialin": {"listen": ["127.0.0.1:0"]}}).dialin.ping_after == 0
    assert parse({"dialin": {"ping_bytes": "00"}}).dialin.ping_after == 120
    assert parse({"dialin": {"ping_bytes": "00", "ping_after": 30}}).dialin.ping_after == 30
    assert one_problem({"dialin": {"ping_after": 30}}).startswith("[dialin]: ping_bytes is empty but ping_after = 30")


def test_a_simulator_must_name_its_protocol_and_is_told_the_choices():
    problem = one_problem({"device": [{"name": "sim", "type": "simulator", "listen": ["127.0.0.1:0"]}]})
    assert problem == (
        "device 'sim': protocol is missing (a simulator plays one of custom, shtrih, atol2, atol3, dle, coges, "
        "energomera-ce, iec61107)"
    )


def checks(tmp_path, text: str, capsys) -> Settings:
    """`devproxy check` on `text` as a settings file must pass; returns the settings `run` would serve.

    The tests below give each table only its required keys, as a new user writes it: the defaults of
    the rest must make a configuration that passes `check` and runs.
    """
    path = tmp_path / "settings.toml"
    path.write_text(text)
    assert main(["check", "-c", str(path)]) == 0
    assert f"{path}: OK" in capsys.readouterr().out
    return load(path)


async def test_a_proxy_table_with_no_keys_checks_and_serves_its_status_page(tmp_path, capsys):
    settings = checks(tmp_path, "[proxy]\n", capsys)
    assert settings.proxy == ProxyConfig()
    # Its default port, 8600, may be taken on a machine that runs other proxies: the test binds any.
    # The other tests turn the status server off for the same reason.
    settings = attrs.evolve(settings, proxy=attrs.evolve(settings.proxy, status=Address("127.0.0.1", 0)))
    async with running_proxy(settings) as running, await trio.open_tcp_stream(*attrs.astuple(running.status)) as web:
        await web.send_all(b"GET /healthz HTTP/1.1\r\nHost: devproxy\r\nConnection: close\r\n\r\n")
        assert (await receive_until_closed(web)).startswith(b"HTTP/1.1 200 ")


async def test_a_serial_device_with_only_its_required_keys_checks_and_runs(tmp_path, capsys, pty):
    device = pty.plug()
    text = f'[proxy]\nstatus = ""\n\n[[device]]\nname = "fptr1"\npath = "{pty.path}"\nlisten = ["127.0.0.1:0"]\n'
    settings = checks(tmp_path, text, capsys)
    async with running_proxy(settings) as running, await connect(running, "fptr1") as client:
        await client.send_all(b"ping")
        assert await receive_exactly(device, 4) == b"ping"


async def test_a_tcp_device_with_only_its_required_keys_checks_and_runs(tmp_path, capsys, tcp_device):
    text = (
        '[proxy]\nstatus = ""\n\n[[device]]\nname = "printer"\ntype = "tcp"\n'
        f'path = "{tcp_device.address}"\nlisten = ["127.0.0.1:0"]\n'
    )
    settings = checks(tmp_path, text, capsys)
    async with running_proxy(settings) as running, await connect(running, "printer") as client:
        await client.send_all(b"ping")
        async with await tcp_device.next_connection() as device:
            assert await receive_exactly(device, 4) == b"ping"


async def test_a_simulator_with_only_its_required_keys_checks_and_runs(tmp_path, capsys):
    text = (
        '[proxy]\nstatus = ""\n\n[[device]]\nname = "sim"\ntype = "simulator"\nprotocol = "custom"\n'
        'listen = ["127.0.0.1:0"]\n'
    )
    settings = checks(tmp_path, text, capsys)
    async with running_proxy(settings) as running, await connect(running, "sim") as client:
        await client.send_all(BEEP)
        assert await receive_exactly(client, len(BEEP_ANSWER)) == BEEP_ANSWER


async def test_a_dialin_table_with_only_listen_checks_and_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default registry is ./devproxy.sqlite3
    text = '[proxy]\nstatus = ""\n\n[dialin]\nlisten = ["127.0.0.1:0"]\n'
    settings = checks(tmp_path, text, capsys)
    assert settings.dialin.ping_after == 0
    async with running_proxy(settings) as running:
        async with await trio.open_tcp_stream(*attrs.astuple(running.dialin[0])):
            pass
        assert (tmp_path / "devproxy.sqlite3").is_file()
