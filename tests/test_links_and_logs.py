"""Opening links (and why they fail), and the log lines operators read."""

from __future__ import annotations

import json
import os
import socket

import pytest
import trio

from proxy import log, wire
from proxy.config import ProxyConfig, parse
from proxy.device import State
from proxy.links import LinkError, open_link
from proxy.links.serial import SerialLink

from helpers import PtyDevice, connect, receive_exactly, running_proxy, settings_for, wait_for


def device_config(**keys):
    return parse({"device": [{"name": "dev", "listen": ["127.0.0.1:0"], **keys}]}).devices[0]


async def test_a_serial_port_is_opened_exclusively(tmp_path):
    pty = PtyDevice(tmp_path / "ttyEXCL")
    pty.plug()
    config = device_config(type="serial", path=str(pty.path))
    async with trio.open_nursery() as nursery:
        first = await open_link(config, nursery)
        with pytest.raises(LinkError, match="already in use by another program"):
            await open_link(config, nursery)
        await first.aclose()
        second = await open_link(config, nursery)
        await second.aclose()
    await pty.unplug()


async def test_a_missing_serial_port_says_so(tmp_path):
    config = device_config(type="serial", path=str(tmp_path / "ttyUSB9"))
    async with trio.open_nursery() as nursery:
        with pytest.raises(LinkError, match="ttyUSB9: no such device"):
            await open_link(config, nursery)


async def test_a_path_that_is_not_a_serial_port_says_why(tmp_path):
    plain = tmp_path / "notatty"
    plain.write_text("")
    config = device_config(type="serial", path=str(plain))
    async with trio.open_nursery() as nursery:
        with pytest.raises(LinkError, match="notatty: not a serial port \\(Inappropriate ioctl for device\\)"):
            await open_link(config, nursery)


async def test_a_line_setting_the_driver_refuses_is_a_link_error_naming_it(tmp_path, monkeypatch):
    # A pty takes any baud rate; a USB-serial driver refuses some, and trio-serial raises ValueError then.
    async def refuse(self):
        raise ValueError("Invalid baud rate: 250000")

    monkeypatch.setattr(SerialLink, "aopen", refuse)
    config = device_config(type="serial", path=str(tmp_path / "ttyUSB0"), baudrate=250000)
    async with trio.open_nursery() as nursery:
        with pytest.raises(LinkError, match="ttyUSB0: the port refuses 250000 8N1: Invalid baud rate"):
            await open_link(config, nursery)


async def test_a_refused_tcp_device_says_so():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = device_config(type="tcp", path=f"127.0.0.1:{port}")
    async with trio.open_nursery() as nursery:
        with pytest.raises(LinkError, match=f"connect to 127.0.0.1:{port} failed: .*[Rr]efused"):
            await open_link(config, nursery)


async def test_serial_link_reports_a_hang_up_as_end_of_file_not_a_spurious_empty_read(tmp_path):
    pty = PtyDevice(tmp_path / "ttyHUP")
    device_end = pty.plug()
    link = await open_link(device_config(type="serial", path=str(pty.path)), None)
    assert isinstance(link, SerialLink)
    pty.release_slave()
    await device_end.send_all(b"abc")
    assert await receive_exactly(link, 3) == b"abc"
    await pty.unplug()
    with trio.fail_after(10):
        assert await link.receive_some() == b""
    await link.aclose()


async def test_the_device_readers_receive_on_a_serial_link_retries_a_false_end_of_file(tmp_path, monkeypatch):
    """wire.reader takes the link's own read without trio-serial's wrapper: a spurious wake-up on an idle
    tty (read() gives b"") is read again, and a hang-up is still end-of-file."""
    pty = PtyDevice(tmp_path / "ttyFALSE")
    device_end = pty.plug()
    link = await open_link(device_config(type="serial", path=str(pty.path)), None)
    pty.release_slave()
    receive = wire.reader(link, 4096)
    assert receive.func == link.receive_unguarded
    real_wait = trio.lowlevel.wait_readable
    waits = []
    waiting_for_real = trio.Event()

    async def wake_once_for_nothing(fd):
        waits.append(fd)
        if len(waits) == 1:
            await trio.lowlevel.checkpoint()  # readable, says the first wake-up: the tty is idle
            return
        waiting_for_real.set()
        await real_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", wake_once_for_nothing)
    received = []

    async def read() -> None:
        received.append(await receive())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await waiting_for_real.wait()
            await device_end.send_all(b"late")
    assert received == [b"late"]
    assert waits == [link.fd, link.fd]
    monkeypatch.undo()
    await pty.unplug()
    with trio.fail_after(10):
        assert await receive() == b""
    await link.aclose()


async def test_a_serial_link_under_bulk_traffic_reads_every_byte_in_order(tmp_path):
    """A full read is followed by more reads at once (SerialLink._more): nothing lost or reordered."""
    pty = PtyDevice(tmp_path / "ttyBULK")
    device_end = pty.plug()
    link = await open_link(device_config(type="serial", path=str(pty.path)), None)
    pty.release_slave()
    sent = os.urandom(1 << 20)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device_end.send_all, sent)
        with trio.fail_after(30):
            while len(received) < len(sent):
                received += await link.receive_some(16384)
    assert received == sent
    await pty.unplug()
    await link.aclose()


async def test_trace_logs_every_byte_in_hex_with_device_direction_and_client(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="TRACE", log_file=str(log_file)))
    settings = settings_for({"name": "reg", "type": "simulator", "protocol": "custom"})
    async with running_proxy(settings) as running, await connect(running, "reg") as client:
        await wait_for(running.devices["reg"], lambda: running.devices["reg"].state == State.BUSY)
        await client.send_all(bytes.fromhex("01 05 00 13 3F 42 0F 00 A8"))
        assert await receive_exactly(client, 9) == bytes.fromhex("06 01 04 00 13 00 00 63 7A")
        client_name = f"127.0.0.1:{client.socket.getsockname()[1]}"
    text = log_file.read_text()
    assert f"reg: {client_name} -> device: 01 05 00 13 3f 42 0f 00 a8" in text
    assert f"reg: device -> {client_name}: 06" in text
    assert f"reg: {client_name} holds the device" in text


async def test_json_logs_are_one_object_a_line(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_level="INFO", log_file=str(log_file), log_json=True))
    settings = settings_for({"name": "reg", "type": "simulator", "protocol": "custom"})
    async with running_proxy(settings) as running, await connect(running, "reg"):
        await wait_for(running.devices["reg"], lambda: running.devices["reg"].state == State.BUSY)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    messages = [record["message"] for record in records]
    assert any("holds the device" in message for message in messages)
    assert {record["level"] for record in records} == {"INFO"}


def test_log_file_is_rotated_at_log_rotation(tmp_path):
    log_file = tmp_path / "proxy.log"
    log.setup(ProxyConfig(log_file=str(log_file), log_rotation="1 KB", log_retention=2))
    from loguru import logger

    for number in range(100):
        logger.info("line {} {}", number, "x" * 40)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3  # the current file and log_retention = 2 rotated ones
    assert all(os.path.getsize(tmp_path / name) < 2048 for name in files)


def test_hexdump_cuts_long_data():
    assert log.hexdump(b"\x01\x02") == "01 02"
    assert log.hexdump(bytes(300), limit=4) == "00 00 00 00 ... (300 bytes)"
