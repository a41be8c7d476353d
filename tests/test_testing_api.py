"""proxy.testing: simulated devices started from a test, on real ptys and on TCP ports of 127.0.0.1."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from pathlib import Path

import pytest
import trio

from proxy.config import SIMULATED_PROTOCOLS
from proxy.simulators.script import ScriptError
from proxy.testing import Fault, Faults, simulated_device, simulated_device_sync

from helpers import BEEP, BEEP_ANSWER, WAIT_LIMIT, receive_exactly

ACK, NAK = b"\x06", b"\x15"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def open_pty_host(path: Path) -> trio.lowlevel.FdStream:
    """The host's side of a device's pty, as a POS driver opens it."""
    return trio.lowlevel.FdStream(os.open(path, os.O_RDWR | os.O_NOCTTY))


def read_exactly(fd: int, count: int) -> bytes:
    """Blocking reads on a host fd until `count` bytes came (WAIT_LIMIT at most for each read)."""
    data = b""
    while len(data) < count:
        readable, _, _ = select.select([fd], [], [], WAIT_LIMIT)
        assert readable, f"only {data!r} came"
        data += os.read(fd, count - len(data))
    return data


async def test_a_pty_device_answers_through_its_link_and_records_the_exchange():
    fds = open_fds()
    async with simulated_device("custom") as device:
        assert device.path is not None and device.path.is_symlink()
        assert os.readlink(device.path) == device.tty
        assert device.address is None
        async with open_pty_host(device.path) as host:
            await host.send_all(BEEP)
            assert await receive_exactly(host, 9) == BEEP_ANSWER
        [exchange] = device.exchanges
        assert (exchange.request, exchange.writes, exchange.answer) == (BEEP, (ACK, BEEP_ANSWER[1:]), BEEP_ANSWER)
        assert exchange.connection == 0 and not exchange.offline
        assert exchange.received_at >= device.started_at
        assert "host: 01 05 00 13 3f 42 0f 00 a8 -> device: 06 | 01 04 00 13 00 00 63 7a" in device.log()
        directory = device.path.parent
    assert not directory.exists()
    assert open_fds() == fds


async def test_a_tcp_device_gives_each_connection_a_device_and_numbers_it():
    fds = open_fds()
    async with simulated_device("custom", tcp=True) as device:
        assert device.path is None and device.address is not None
        assert device.address[0] == "127.0.0.1" and device.address[1] > 0
        for _ in range(2):
            async with await trio.open_tcp_stream(*device.address) as host:
                await host.send_all(BEEP)
                assert await receive_exactly(host, 9) == BEEP_ANSWER
        assert [(e.connection, e.answer) for e in device.exchanges] == [(1, BEEP_ANSWER), (2, BEEP_ANSWER)]
    assert open_fds() == fds


async def test_faults_given_at_the_start_and_changed_while_it_runs():
    async with simulated_device("custom", faults=Faults(nak_every=1)) as device, open_pty_host(device.path) as host:
        await host.send_all(BEEP)
        assert await receive_exactly(host, 1) == NAK
        device.set_faults(Faults())
        assert device.faults == Faults()
        await host.send_all(BEEP)
        assert await receive_exactly(host, 9) == BEEP_ANSWER
        device.set_faults(Faults(drop_every=1))
        await host.send_all(BEEP)
        assert await receive_exactly(host, 1) == ACK
        assert [e.writes for e in device.exchanges] == [(NAK,), (ACK, BEEP_ANSWER[1:]), (ACK,)]


async def test_a_changed_delay_applies_from_the_next_request():
    async with simulated_device("custom") as device, open_pty_host(device.path) as host:
        device.set_faults(Faults(delay=3600))
        await host.send_all(BEEP)
        assert await receive_exactly(host, 1) == ACK  # the answer waits an hour...
        assert device.exchanges[0].answered_at is None
        device.set_faults(Faults())  # ...and is never sent: the next bytes are the next beep's answer
        await host.send_all(BEEP)
        assert await receive_exactly(host, 9) == BEEP_ANSWER
        exchanges = await device.wait_for_exchanges(2)
        assert [e.answer for e in exchanges] == [BEEP_ANSWER, BEEP_ANSWER]


async def test_offline_requests_are_recorded_and_unanswered_until_it_is_online_again():
    async with simulated_device("custom") as device, open_pty_host(device.path) as host:
        device.go_offline()
        await host.send_all(BEEP)
        [exchange] = await device.wait_for_exchanges(1)
        assert (exchange.request, exchange.writes, exchange.offline) == (BEEP, (), True)
        assert "(offline)" in device.log()
        device.go_online()
        await host.send_all(BEEP)
        assert await receive_exactly(host, 9) == BEEP_ANSWER
        device.clear_exchanges()
        assert device.exchanges == []


@pytest.mark.parametrize("protocol", SIMULATED_PROTOCOLS)
async def test_every_protocol_starts_on_a_pty_and_on_tcp(protocol):
    async with simulated_device(protocol, pty=True) as on_pty, simulated_device(protocol, tcp=True) as on_tcp:
        assert on_pty.path is not None and on_tcp.address is not None


async def test_unknown_protocols_and_two_places_are_refused():
    with pytest.raises(ValueError, match="no simulated device for protocol 'nope'"):
        async with simulated_device("nope"):
            pass
    with pytest.raises(ValueError, match="not both"):
        async with simulated_device("custom", pty=True, tcp=True):
            pass


def test_the_sync_device_runs_in_a_thread_that_ends_with_the_block():
    fds, threads = open_fds(), threading.active_count()
    with simulated_device_sync("custom") as device:
        assert threading.active_count() == threads + 1
        fd = os.open(device.path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, BEEP)
            assert read_exactly(fd, 9) == BEEP_ANSWER
            [exchange] = device.wait_for_exchanges(1)
            assert exchange.answer == BEEP_ANSWER
            device.set_faults(Faults(nak_every=1))
            os.write(fd, BEEP)
            assert read_exactly(fd, 1) == NAK
            device.go_offline()
            os.write(fd, BEEP)
            assert device.wait_for_exchanges(3)[2].offline
            device.go_online()
            device.set_faults(Faults())
            os.write(fd, BEEP)
            assert read_exactly(fd, 9) == BEEP_ANSWER
            assert [e.answer for e in device.exchanges] == [BEEP_ANSWER, NAK, b"", BEEP_ANSWER]
            with pytest.raises(TimeoutError, match="5 exchanges awaited, 4 came"):
                device.wait_for_exchanges(5, timeout=0)
        finally:
            os.close(fd)
    assert threading.active_count() == threads
    assert open_fds() == fds


def test_the_sync_device_on_tcp():
    with simulated_device_sync("custom", tcp=True) as device:
        assert device.path is None and device.tty is None and device.protocol == "custom"
        with socket.create_connection(device.address, timeout=WAIT_LIMIT) as host:
            host.sendall(BEEP)
            data = b""
            while len(data) < 9:
                data += host.recv(9 - len(data))
        assert data == BEEP_ANSWER
        assert device.wait_for_exchanges(1)[0].connection == 1


def test_a_sync_device_that_cannot_start_raises_and_leaves_no_thread():
    threads = threading.active_count()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError), simulated_device_sync("custom", tcp=True, port=taken.getsockname()[1]):
            pass
    assert threading.active_count() == threads
    with pytest.raises(ValueError, match="no simulated device"), simulated_device_sync("nope"):
        pass


async def test_a_scripted_error_answers_the_nth_match_and_the_rest_go_through():
    script = [Fault("error", command=0x13, nth=2, code=3505)]
    async with simulated_device("custom", tcp=True, script=script) as device:
        host = await trio.open_tcp_stream(*device.address)
        async with host:
            answers = []
            for size in (9, 8, 9):
                await host.send_all(BEEP)
                answers.append(await receive_exactly(host, size))
        # The error answer: ACK, then a frame of length 3 with the code 3505 (0DB1h) after the command.
        assert answers == [BEEP_ANSWER, bytes.fromhex("06 01 03 00 13 b1 0d d4"), BEEP_ANSWER]
        assert [exchange.answer for exchange in device.exchanges] == answers


async def test_a_scripted_drop_on_a_pty_hangs_it_up_and_a_new_one_answers_behind_the_same_path():
    fds = open_fds()
    async with simulated_device("custom", script=[Fault("drop", command=0x13, nth=1, after=1)]) as device:
        async with open_pty_host(device.path) as host:
            await host.send_all(BEEP)
            received = b""
            with trio.fail_after(WAIT_LIMIT):
                while data := await host.receive_some():  # until the hang-up
                    received += data
            # After = 1 byte of the answer. A hang-up may still lose bytes in flight, as an unplugged
            # device's do: the proxy waits for the host to read them, which a host usually does.
            assert (ACK + BEEP_ANSWER[1:2]).startswith(received)
        with trio.fail_after(WAIT_LIMIT):
            await device.wait_for_drops(1)
        async with open_pty_host(device.path) as host:
            await host.send_all(BEEP)
            assert await receive_exactly(host, 9) == BEEP_ANSWER
        assert [exchange.connection for exchange in device.exchanges] == [0, 1]
    assert open_fds() == fds


def test_the_sync_device_takes_a_script_too():
    with simulated_device_sync("custom", tcp=True, script=[Fault("silence", command=0x13)]) as device:
        with socket.create_connection(device.address, timeout=WAIT_LIMIT) as host:
            host.sendall(BEEP)
            assert host.recv(16) == ACK
        device.wait_for_exchanges(1)


def test_a_host_that_resets_its_tcp_connection_ends_only_that_connection():
    with simulated_device_sync("custom", tcp=True) as device:
        reset = socket.create_connection(device.address, timeout=WAIT_LIMIT)
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.sendall(BEEP)
        device.wait_for_exchanges(1)
        reset.close()  # RST
        with socket.create_connection(device.address, timeout=WAIT_LIMIT) as host:
            host.sendall(BEEP)
            data = b""
            while len(data) < 9:
                data += host.recv(9 - len(data))
        assert data == BEEP_ANSWER


@pytest.mark.parametrize("sync", [False, True])
def test_python_api_faults_are_checked_against_the_protocol(sync):
    script = [Fault("error", code=70000)]
    with pytest.raises(ScriptError, match="out of the protocol's range"):
        if sync:
            with simulated_device_sync("custom", tcp=True, script=script):
                pass
        else:

            async def main():
                async with simulated_device("custom", tcp=True, script=script):
                    pass

            trio.run(main)


def test_the_sync_device_counts_and_waits_for_drops():
    with simulated_device_sync("custom", script=[Fault("drop", command=0x13, nth=1, after=5)]) as device:
        assert device.drops == 0
        with pytest.raises(TimeoutError, match="1 drops awaited, 0 came"):
            device.wait_for_drops(1, timeout=0.05)
        fd = os.open(device.path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, BEEP)
            got = b""
            while select.select([fd], [], [], WAIT_LIMIT)[0]:
                try:
                    chunk = os.read(fd, 100)
                except OSError:  # EIO: the hang-up
                    break
                if not chunk:
                    break
                got += chunk
        finally:
            os.close(fd)
        # What was written before the drop reaches the host: the ACK and the 5 bytes `after` allows.
        assert got == BEEP_ANSWER[:6]
        device.wait_for_drops(1)
        assert device.drops == 1
