"""Hostile RFC 2217 clients and hostile uses of devproxy connect: garbage Telnet split anywhere, absurd
values, floods, clients that vanish or suspend mid-lease, a lost link, and virtual ports whose LINK is
in the way; the device keeps serving throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import termios
from functools import partial

import pytest
import serial
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import LIMIT, spawn, wait_for_line
from test_connect import open_program_side
from test_exchange_sharing import BEEP, EchoingRegister, exchange_settings
from test_line_control import ComPortClient, serial_device, termios_of

from proxy import connect as virtual_port
from proxy.config import Address
from proxy.connect import connect
from proxy.line_control import LOGGED_CHANGES
from proxy.rfc2217 import MAX_SUBNEGOTIATION, Command, Control, TelnetCodec
from proxy.simulators import serve_stream

from helpers import WAIT_LIMIT, logged, receive_exactly, reset_on_close, running_proxy, settings_for, wait_for
from helpers import connect as connect_plain

# The echoing register's answer to BEEP.
ECHOED_BEEP = bytes.fromhex("06 01 07 00 13 00 00 3f 42 0f 00 aa")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6), st.booleans())
def test_any_bytes_split_anywhere_decode_as_they_do_whole_in_bounded_memory(data, cuts, server):
    whole = TelnetCodec(server=server)
    expected = whole.feed(data)
    split = TelnetCodec(server=server)
    decoded, events, start = b"", [], 0
    for cut in [*sorted(c for c in cuts if c <= len(data)), len(data)]:
        part_data, part_events = split.feed(data[start:cut])
        decoded, events, start = decoded + part_data, events + part_events, cut
    assert (decoded, events) == expected
    assert split.data_to_send() == whole.data_to_send()


def test_a_subnegotiation_that_never_ends_is_kept_to_its_bound():
    codec = TelnetCodec(server=True)
    codec.feed(bytes([255, 250, 44, 1]))
    for _ in range(64):
        assert codec.feed(b"\x01" * 65536) == (b"", [])
    assert len(codec._sub) == MAX_SUBNEGOTIATION


async def test_absurd_values_are_answered_with_the_line_in_force_logged_once_and_the_device_serves_on(pty, log_lines):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty, baudrate=19200))) as running:
        client = await ComPortClient.open(running.addresses["port"][1])
        for rate in (1, 7, 2**32 - 1):
            assert (await client.ask(Command.SET_BAUDRATE, rate)).value == 19200
        assert (await client.ask(Command.SET_DATASIZE, 9)).value == 8
        assert (await client.ask(Command.SET_PARITY, 99)).value == 1
        assert (await client.ask(Command.SET_STOPSIZE, 9)).value == 1
        assert (await client.ask(Command.SET_CONTROL, 99)).value == Control.FLOW_NONE
        assert (await client.ask(Command.PURGE_DATA, 9)).value == 9
        assert pty.line_speed() == 19200
        await client.stream.send_all(b"ok")
        assert await receive_exactly(device_end, 2) == b"ok"
        unoffered = [line for line in log_lines if "not offered" in line]
        assert len(unoffered) == 1 and "SET_DATASIZE 9" in unoffered[0]
        await client.stream.aclose()
    await device_end.aclose()


async def test_a_flood_of_rate_changes_is_answered_without_flooding_the_log(pty, log_lines):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty, baudrate=19200))) as running:
        client = await ComPortClient.open(running.addresses["port"][1])
        rates = (9600, 4800, 1) * 1000
        await client.stream.send_all(b"".join(client.codec.message(Command.SET_BAUDRATE, rate) for rate in rates))
        await client.stream.send_all(b"ok")
        answers = []
        with trio.fail_after(WAIT_LIMIT):
            while len(answers) < len(rates):
                await client._read()
                answers += [message.value for message in client.messages]
                client.messages.clear()
        assert answers == [9600, 4800, 4800] * 1000
        assert await receive_exactly(device_end, 2) == b"ok"
        changes = [line for line in log_lines if "line now" in line or "no standard rate" in line]
        assert len(changes) == len(rates)
        assert sum(line.startswith("INFO") for line in changes) == LOGGED_CHANGES
        await client.stream.aclose()
    await device_end.aclose()


async def test_a_client_that_sets_an_odd_line_and_resets_its_connection_leaves_the_configured_line(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty, baudrate=19200))) as running:
        device = running.devices["port"]
        client = await ComPortClient.open(running.addresses["port"][1])
        await client.ask(Command.SET_BAUDRATE, 50)
        await client.ask(Command.SET_STOPSIZE, 2)
        await client.ask(Command.SET_CONTROL, Control.FLOW_HARDWARE)
        await client.ask(Command.SET_CONTROL, Control.BREAK_ON)
        assert pty.line_speed() == 50
        reset_on_close(client.stream)
        await client.stream.aclose()
        await wait_for(device, lambda: device.holder is None)
        assert pty.line_speed() == 19200
        assert not termios_of(pty)[2] & (termios.CSTOPB | termios.CRTSCTS)
        assert device.line.in_force == device.line.configured
    await device_end.aclose()


async def test_a_lost_link_ends_the_lease_and_the_log_names_the_configured_line_it_gets_back(pty, log_lines):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty, baudrate=19200))) as running:
        device = running.devices["port"]
        client = await ComPortClient.open(running.addresses["port"][1])
        await client.ask(Command.SET_BAUDRATE, 2400)
        await device_end.aclose()
        await pty.unplug()
        await wait_for(device, lambda: device.holder is None)
        assert any("line back to its configured 19200 8N1" in line for line in log_lines), log_lines
        device_end = pty.plug()
        await wait_for(device, lambda: device.link_up)
        assert pty.line_speed() == 19200
        await client.stream.aclose()
    await device_end.aclose()


async def test_a_suspended_client_does_not_hold_up_the_others_under_exchange_sharing(pty):
    device_end = pty.plug()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, device_end, EchoingRegister())
        keys = exchange_settings(pty.path, listen_rfc2217=["127.0.0.1:0"], acquire_timeout=WAIT_LIMIT * 2)
        async with running_proxy(settings_for(keys)) as running:
            device = running.devices["ecr"]
            suspended = await ComPortClient.open(running.addresses["ecr"][1])
            await suspended.stream.send_all(suspended.codec.message(Command.FLOWCONTROL_SUSPEND) + BEEP)
            await wait_for(device, lambda: device.counters.exchanges.get("ok", 0) == 1)
            other = await ComPortClient.open(running.addresses["ecr"][1])
            await other.stream.send_all(BEEP)
            assert await other.receive(len(ECHOED_BEEP)) == ECHOED_BEEP
            await suspended.stream.send_all(suspended.codec.message(Command.FLOWCONTROL_RESUME))
            assert await suspended.receive(len(ECHOED_BEEP)) == ECHOED_BEEP
            await suspended.stream.aclose()
            await other.stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.filterwarnings("ignore:set(Daemon|Name):DeprecationWarning")  # pyserial 3.5: its reader thread
async def test_pyserial_with_a_longer_timeout_waits_its_turn_and_the_line_is_untouched_meanwhile(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty, acquire_timeout=WAIT_LIMIT))) as running:
        device = running.devices["port"]
        holder = await connect_plain(running, "port")
        await wait_for(device, lambda: device.holder is not None)
        url = f"rfc2217://127.0.0.1:{running.addresses['port'][1].port}?timeout={WAIT_LIMIT}"
        async with trio.open_nursery() as nursery:

            async def leave_when_pyserial_waits() -> None:
                await wait_for(device, lambda: device.waiting == 1)
                assert pty.line_speed() == 115200
                await holder.aclose()

            nursery.start_soon(leave_when_pyserial_waits)
            port = await trio.to_thread.run_sync(partial(serial.serial_for_url, url, baudrate=4800, timeout=5))
        try:
            assert pty.line_speed() == 4800
        finally:
            await trio.to_thread.run_sync(port.close)
    await device_end.aclose()


async def test_connect_leaves_a_regular_file_at_link_alone_and_replaces_a_dangling_symlink(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(FileExistsError), trio.fail_after(WAIT_LIMIT):
        await connect(Address("127.0.0.1", 9), precious)
    assert precious.read_text() == "keep me"
    dangling = tmp_path / "ttyOLD"
    dangling.symlink_to(tmp_path / "gone")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(connect, Address("127.0.0.1", 9), dangling)
            assert os.readlink(dangling).startswith("/dev/pts/")
            scope.cancel()
    assert not dangling.is_symlink()


async def test_connect_that_ends_leaves_the_link_another_run_took_since(tmp_path, nursery):
    link = tmp_path / "ttyVIRTUAL"
    with trio.CancelScope() as first:
        async with trio.open_nursery() as first_nursery:
            await first_nursery.start(connect, Address("127.0.0.1", 9), link)
            await nursery.start(connect, Address("127.0.0.1", 9), link)  # a second run takes the name
            second = os.readlink(link)
            first.cancel()
    assert os.readlink(link) == second


async def test_what_the_program_writes_while_the_remote_is_down_is_dropped_and_counted(
    tmp_path, nursery, monkeypatch, log_lines
):
    monkeypatch.setattr(virtual_port, "RECONNECT_INTERVAL", 0.05)
    remote = trio.socket.socket()
    await remote.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    address = Address("127.0.0.1", remote.getsockname()[1])
    link = tmp_path / "ttyVIRTUAL"
    await nursery.start(connect, address, link)
    async with open_program_side(link) as program:
        await program.send_all(b"stale")
        await logged("cannot reach", log_lines, times=3)
        remote.listen()
        accepted, _ = await remote.accept()
        async with trio.SocketStream(accepted) as device:
            await logged("joined to", log_lines)
            assert any("dropped 5 bytes" in line for line in log_lines)
            await program.send_all(b"fresh")
            assert await receive_exactly(device, 5) == b"fresh"
    remote.close()


def test_devproxy_connect_exits_0_on_sigterm_and_removes_its_link(tmp_path):
    link = tmp_path / "ttyVIRTUAL"
    with spawn("connect", "127.0.0.1:9", "--pty", str(link), stdout=subprocess.PIPE) as process:
        wait_for_line(process.stdout, r"link .*ttyVIRTUAL")
        process.send_signal(signal.SIGTERM)
        assert process.wait(LIMIT) == 0
    assert not link.is_symlink()
