"""devproxy connect: a local pty joined to a device port, plain and with RFC 2217, through to a device pty."""

from __future__ import annotations

import os
import signal
import subprocess
import termios
import tty
from functools import partial
from pathlib import Path

import trio
from test_cli import LIMIT, spawn, wait_for_line

from proxy.connect import connect

from helpers import PtyDevice, logged, receive_exactly, running_proxy, settings_for, wait_for

EVERY_BYTE = bytes(range(256))


def open_program_side(link: Path) -> trio.lowlevel.FdStream:
    """What a POS program does: opens the virtual port and makes it raw."""
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    return trio.lowlevel.FdStream(fd)


def serial_device(pty: PtyDevice) -> dict:
    return {"name": "port", "type": "serial", "path": str(pty.path), "listen_rfc2217": ["127.0.0.1:0"]}


async def test_connect_joins_a_local_pty_to_a_plain_device_port(pty, tmp_path, nursery):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty))) as running:
        link = tmp_path / "ttyVIRTUAL"
        await nursery.start(connect, running.addresses["port"][0], link)
        device = running.devices["port"]
        async with open_program_side(link) as program:
            await program.send_all(EVERY_BYTE)
            assert await receive_exactly(device_end, 256) == EVERY_BYTE
            await device_end.send_all(EVERY_BYTE)
            assert await receive_exactly(program, 256) == EVERY_BYTE
        assert device.holder is not None  # the virtual port keeps its connection while the program is away
    await device_end.aclose()


async def test_connect_with_rfc2217_sends_the_programs_baud_rate_to_the_device_pty(pty, tmp_path, nursery, log_lines):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty))) as running:
        link = tmp_path / "ttyVIRTUAL"
        await nursery.start(partial(connect, running.addresses["port"][1], link, rfc2217=True))
        async with open_program_side(link) as program:
            attributes = termios.tcgetattr(program.fileno())
            attributes[4] = attributes[5] = termios.B9600
            termios.tcsetattr(program.fileno(), termios.TCSANOW, attributes)
            await logged("line now 9600", log_lines)
            assert pty.line_speed() == 9600
            await program.send_all(EVERY_BYTE)
            assert await receive_exactly(device_end, 256) == EVERY_BYTE
            await device_end.send_all(EVERY_BYTE)
            assert await receive_exactly(program, 256) == EVERY_BYTE
    await device_end.aclose()


async def test_connect_reconnects_when_the_connection_drops_and_says_so(pty, tmp_path, nursery, log_lines):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty))) as running:
        device = running.devices["port"]
        link = tmp_path / "ttyVIRTUAL"
        await nursery.start(connect, running.addresses["port"][0], link)
        await wait_for(device, lambda: device.holder is not None)
        first = device.holder
        device.sharing.disconnect_holder()
        await logged("connection to", log_lines)
        await wait_for(device, lambda: device.holder not in (None, first))
        async with open_program_side(link) as program:
            await program.send_all(b"again")
            assert await receive_exactly(device_end, 5) == b"again"
    await device_end.aclose()


def test_devproxy_connect_exits_130_on_ctrl_c_and_removes_its_link(tmp_path):
    link = tmp_path / "ttyVIRTUAL"
    with spawn("connect", "127.0.0.1:9", "--pty", str(link), stdout=subprocess.PIPE) as process:
        wait_for_line(process.stdout, r"link .*ttyVIRTUAL")
        assert link.is_symlink()
        process.send_signal(signal.SIGINT)
        assert process.wait(LIMIT) == 130
    assert not link.exists() and not link.is_symlink()
