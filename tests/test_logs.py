"""Log lines for machines and people: flat JSON objects, byte dumps with a text column, and a log_level per
device."""

from __future__ import annotations

import json
import re

import pytest
import trio
from loguru import logger

from proxy import log
from proxy.config import ConfigError, ProxyConfig, parse
from proxy.device import State

from helpers import (
    BEEP,
    BEEP_ANSWER,
    connect,
    device_named,
    dialin_settings,
    modem,
    online,
    receive_exactly,
    running_proxy,
    settings_for,
    wait_for,
)

REGISTER = {"type": "simulator", "protocol": "custom"}
ISO_UTC_MILLISECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def beep(running, name: str) -> str:
    """One beep through the proxy to device `name`; returns the client's name as the proxy logs it."""
    async with await connect(running, name) as client:
        device = running.devices[name]
        await wait_for(device, lambda: device.state == State.BUSY)
        await client.send_all(BEEP)
        assert await receive_exactly(client, 9) == BEEP_ANSWER
        return f"127.0.0.1:{client.socket.getsockname()[1]}"


async def test_json_lines_are_flat_objects_with_utc_time_device_client_and_event(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="INFO", log_file=str(log_file), log_json=True))
    async with running_proxy(settings_for({"name": "reg", **REGISTER})) as running:
        client = await beep(running, "reg")
    lines = json_lines(log_file)
    for line in lines:
        assert ISO_UTC_MILLISECONDS.fullmatch(line["time"]), line
        assert line["level"] == "INFO" and line["message"]
        assert all(not isinstance(value, dict | list) for value in line.values()), line
    connected = next(line for line in lines if line.get("event") == "connect")
    assert connected["device"] == "reg" and connected["client"] == client
    assert connected["message"] == f"reg: client {client} connected (1 connected)"
    lease = next(line for line in lines if line.get("event") == "lease")
    assert (lease["device"], lease["client"]) == ("reg", client)
    # loguru's own serialization was ~800 bytes a line; these carry only what an operator needs.
    assert max(len(line) for line in log_file.read_text().splitlines()) < 300


async def test_json_trace_lines_carry_direction_hex_and_text(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="TRACE", log_file=str(log_file), log_json=True))
    async with running_proxy(settings_for({"name": "reg", **REGISTER})) as running:
        client = await beep(running, "reg")
    dumps = [line for line in json_lines(log_file) if "direction" in line]
    sent = next(line for line in dumps if line["direction"] == "to_device")
    assert sent == {
        "time": sent["time"],
        "level": "TRACE",
        "message": f"reg: {client} -> device",
        "device": "reg",
        "client": client,
        "direction": "to_device",
        "size": 9,
        "hex": "01 05 00 13 3f 42 0f 00 a8",
        "text": "....?B...",
    }
    answered = [line for line in dumps if line["direction"] == "from_device"]
    assert "".join(line["hex"] for line in answered).replace(" ", "") == BEEP_ANSWER.hex()
    assert all(line["client"] == client and line["device"] == "reg" for line in answered)


async def test_trace_text_lines_show_the_bytes_as_text_beside_the_hex(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="TRACE", log_file=str(log_file)))
    async with running_proxy(settings_for({"name": "reg", **REGISTER})) as running:
        client = await beep(running, "reg")
    assert f"reg: {client} -> device: 01 05 00 13 3f 42 0f 00 a8  |....?B...|\n" in log_file.read_text()


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"/?!\r\n", "/?!.."),  # an IEC 61107 sign-on
        (b"\x01R1\x02VOLTA()\x03\x7f", ".R1.VOLTA().."),  # a read command and its BCC
        (bytes(range(0x1E, 0x22)), ".. !"),
        (bytes([0x7E, 0x7F, 0x80, 0xFF]), "~..."),
    ],
)
def test_the_text_column_keeps_printable_ascii_and_dots_the_rest(data, text):
    assert log.printable(data) == text
    assert log.wire_bytes(data) == {"size": len(data), "hex": data.hex(" "), "text": text}


def test_a_long_chunk_shows_its_first_bytes_and_its_size(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="TRACE", log_file=str(log_file)))
    data = b"A" * 300
    logger.trace("dev: device -> nobody", device="dev", direction=log.FROM_DEVICE, **log.wire_bytes(data))
    line = log_file.read_text()
    assert line.endswith(f"dev: device -> nobody: {'41 ' * 255}41 ...  |{'A' * 256}| (300 bytes)\n")


def test_a_json_line_of_an_exception_carries_its_traceback(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_file=str(log_file), log_json=True))
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("dev: client x: unexpected error; connection closed", device="dev", client="x")
    [line] = json_lines(log_file)
    assert line["device"] == "dev" and line["level"] == "ERROR"
    assert line["exception"].startswith("Traceback") and line["exception"].endswith("ValueError: boom")


async def test_a_device_at_trace_dumps_its_bytes_and_the_others_stay_at_the_proxy_level(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="INFO", log_file=str(log_file), log_json=True))
    settings = settings_for({"name": "loud", **REGISTER, "log_level": "TRACE"}, {"name": "quiet", **REGISTER})
    async with running_proxy(settings) as running:
        # Only the device at TRACE formats hex on its byte path.
        assert running.devices["loud"].tracing and not running.devices["quiet"].tracing
        loud_client = await beep(running, "loud")
        quiet_client = await beep(running, "quiet")
    lines = json_lines(log_file)
    dumps = [line for line in lines if "hex" in line]
    assert {line["device"] for line in dumps} == {"loud"}
    assert {line["client"] for line in dumps} == {loud_client}
    assert {line["level"] for line in lines if line.get("device") != "loud"} == {"INFO"}
    assert any(line.get("event") == "lease" and line["client"] == quiet_client for line in lines)


async def test_one_device_at_trace_makes_no_other_device_format_its_bytes(monkeypatch):
    log.setup(ProxyConfig(log_level="INFO"))
    formatted: list[bytes] = []
    for name in ("wire_bytes", "hexdump"):
        original = getattr(log, name)
        monkeypatch.setattr(log, name, lambda data, *rest, original=original: formatted.append(data) or original(data))
    settings = settings_for(
        {"name": "loud", **REGISTER, "log_level": "TRACE"}, {"name": "quiet", **REGISTER, "sharing": "exchange"}
    )
    async with running_proxy(settings) as running:
        async with await connect(running, "quiet") as client:
            for _ in range(3):
                await client.send_all(BEEP)
                assert await receive_exactly(client, 9) == BEEP_ANSWER
        assert formatted == []
        await beep(running, "loud")
        assert BEEP in formatted


async def test_a_device_at_warning_drops_its_info_lines_and_the_others_keep_theirs(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="DEBUG", log_file=str(log_file), log_json=True))
    settings = settings_for({"name": "hushed", **REGISTER, "log_level": "WARNING"}, {"name": "chatty", **REGISTER})
    async with running_proxy(settings) as running:
        assert not running.devices["hushed"].debugging and running.devices["chatty"].debugging
        await beep(running, "hushed")
        await beep(running, "chatty")
    devices = {line.get("device") for line in json_lines(log_file)}
    assert "chatty" in devices and "hushed" not in devices


async def test_the_dialin_log_level_applies_to_every_dialin_device(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="INFO", log_file=str(log_file)))
    settings = dialin_settings(tmp_path, log_level="TRACE")
    async with running_proxy(settings) as running:
        link = await modem(running, b"METER0001\r\n")
        async with link:
            device = await device_named(running, "METER0001")
            await online(device)
            assert device.tracing and device.config.log_level == "TRACE"
            port = device.config.listen[0].port
            async with await trio.open_tcp_stream("127.0.0.1", port) as client:
                await client.send_all(b"R1 VOLTA()")
                assert await receive_exactly(link, 10) == b"R1 VOLTA()"
                await link.send_all(b"ANS:R1 VOLTA(230.1)\r\n")
                assert await receive_exactly(client, 21) == b"ANS:R1 VOLTA(230.1)\r\n"
    text = log_file.read_text()
    assert "-> device: 52 31 20 56 4f 4c 54 41 28 29  |R1 VOLTA()|" in text
    assert "|ANS:R1 VOLTA(230.1)..|" in text


async def test_a_reload_moves_the_devices_without_a_level_of_their_own_and_keeps_the_others(tmp_path):
    log.setup(ProxyConfig(log_level="INFO"))
    settings = settings_for({"name": "own", **REGISTER, "log_level": "WARNING"}, {"name": "follows", **REGISTER})
    async with running_proxy(settings) as running:
        own, follows = running.devices["own"], running.devices["follows"]
        assert not own.tracing and not follows.tracing
        tracing = settings_for(
            {"name": "own", **REGISTER, "log_level": "WARNING"}, {"name": "follows", **REGISTER}, log_level="TRACE"
        )
        await running.reload(tracing)
        assert running.devices["own"] is own and running.devices["follows"] is follows
        assert follows.tracing and follows.debugging
        assert not own.tracing and not own.debugging


@pytest.mark.parametrize("table", ["device", "dialin"])
def test_a_log_level_that_does_not_exist_is_a_config_error(table):
    raw = {"dialin": {"log_level": "LOUD"}}
    where = "[dialin]"
    if table == "device":
        raw = {"device": [{"name": "reg", **REGISTER, "listen": ["127.0.0.1:0"], "log_level": "LOUD"}]}
        where = "device 'reg'"
    with pytest.raises(ConfigError, match=re.escape(f"{where}: log_level 'LOUD' is not one of TRACE, DEBUG")):
        parse(raw)
