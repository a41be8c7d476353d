"""The dial-in registry: ports chosen in memory, rows written after the device serves; under faults, a
bad file stops the start with a clear reason, trouble while running costs a registration at most, nothing
that was to be written is lost, and a crash never gives one port to two devices."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
import trio
from test_dialin import free_ports

from proxy.dialin import registry as registry_module
from proxy.dialin import server as server_module
from proxy.dialin.registry import RESERVE_AHEAD, FreePorts, Registry, RegistryError

from helpers import (
    device_named,
    dialin_settings,
    logged,
    meter,
    modem,
    online,
    receive_exactly,
    receive_until_closed,
    running_proxy,
)

PROXY = [sys.executable, "-m", "proxy"]


@pytest.fixture
def fast_registry(monkeypatch):
    """Locks are waited for 50 ms and updates flushed every 50 ms, so that failures show quickly."""
    monkeypatch.setattr(registry_module, "BUSY_TIMEOUT_MS", 50)
    monkeypatch.setattr(server_module, "FLUSH_INTERVAL", 0.05)


def fill_disk(monkeypatch, failing: list[bool]) -> None:
    """Every write to the registry fails while failing[0] (as the proxy runs as root here, a real full disk
    cannot be arranged in a test)."""
    write = registry_module.Registry.write

    def refuse(self, *args):
        if failing[0]:
            raise registry_module.RegistryError(f"registry {self.path}: database or disk is full")
        return write(self, *args)

    monkeypatch.setattr(registry_module.Registry, "write", refuse)


def run_with_registry(tmp_path, contents: bytes | None = None, prepare=None) -> subprocess.CompletedProcess:
    registry = tmp_path / "registry.sqlite3"
    if contents is not None:
        registry.write_bytes(contents)
    if prepare is not None:
        prepare(registry)
    settings = tmp_path / "settings.toml"
    settings.write_text(
        f'[proxy]\nstatus = ""\n[dialin]\nlisten = ["127.0.0.1:0"]\nregistry = "{registry}"\ndirect_ports = "any"\n'
    )
    return subprocess.run([*PROXY, "run", "-c", str(settings)], capture_output=True, text=True, timeout=30)


def test_a_file_that_is_no_database_stops_the_start_with_exit_2_naming_it(tmp_path):
    result = run_with_registry(tmp_path, b"this is not a database at all" * 100)
    assert result.returncode == 2
    assert "registry.sqlite3: not a devproxy registry (file is not a database)" in result.stderr
    assert "Traceback" not in result.stderr


def test_another_programs_database_stops_the_start_with_exit_2_naming_it(tmp_path):
    def foreign(path):
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE devices (serial TEXT, owner TEXT)")

    result = run_with_registry(tmp_path, prepare=foreign)
    assert result.returncode == 2
    assert "not a devproxy registry (its devices table has serial, owner)" in result.stderr


async def test_a_registry_that_cannot_be_written_keeps_its_updates_until_it_can(
    tmp_path, fast_registry, monkeypatch, log_lines
):
    settings = dialin_settings(tmp_path)
    async with running_proxy(settings) as running:
        known = await modem(running, b"KNOWN\n")
        await online(await device_named(running, "KNOWN"))
        await known.aclose()
        failing = [True]
        fill_disk(monkeypatch, failing)
        # Meanwhile a new id cannot be registered (with direct_ports = "any" its row is its reservation,
        # written before its port is announced, so that device alone is refused) ...
        async with await modem(running, b"NEWCOMER\n") as newcomer:
            assert await receive_until_closed(newcomer) == b""
        # ... a known device still connects, and its connect waits in memory.
        again = await modem(running, b"KNOWN\n")
        device = await device_named(running, "KNOWN")
        await online(device)
        await logged("cannot write the registry", log_lines)
        failing[0] = False
        await logged("the registry is written again", log_lines)
        await again.aclose()
    with sqlite3.connect(settings.dialin.registry) as db:
        rows = db.execute("SELECT id, last_connect FROM devices").fetchall()
    assert [row[0] for row in rows] == ["KNOWN"] and rows[0][1] is not None
    assert sum("cannot write the registry" in line for line in log_lines) == 1
    assert any("NEWCOMER" in line and "not registered" in line for line in log_lines)


def test_the_cli_says_when_a_running_proxy_holds_the_registry(tmp_path):
    path = tmp_path / "registry.sqlite3"
    holder = registry_module.Registry(path, (7500, 7599))
    holder.add("HELD")
    try:
        settings = tmp_path / "settings.toml"
        settings.write_text(f'[dialin]\nlisten = ["127.0.0.1:0"]\nregistry = "{path}"\n')
        result = subprocess.run(
            [*PROXY, "devices", "-c", str(settings), "list"], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 1
        assert "in use by another program (a running devproxy holds it alone" in result.stderr
    finally:
        holder.close()


async def test_a_registry_deleted_while_running_is_made_again_with_every_known_device(
    tmp_path, fast_registry, log_lines
):
    settings = dialin_settings(tmp_path)
    async with running_proxy(settings) as running:
        for identity in (b"FIRST\n", b"SECOND\n"):
            link = await modem(running, identity)
            await online(await device_named(running, identity.strip().decode()))
            await link.aclose()
        (tmp_path / "registry.sqlite3").unlink()
        await logged("was deleted or replaced", log_lines)
        ports = {device.config.path: device.config.listen[0].port for device in running.devices.values()}
    with sqlite3.connect(settings.dialin.registry) as db:
        rows = dict(db.execute("SELECT id, direct_port FROM devices").fetchall())
    assert rows == ports


def test_free_ports_give_the_lowest_free_port_of_the_range_until_it_is_full():
    ports = FreePorts((7500, 7504), taken=[7501, 9000])
    assert [ports.take(), ports.take()] == [7500, 7502]
    assert ports.take_port(7503) and not ports.take_port(7503)
    assert [ports.take(), ports.take()] == [7504, None]


def test_a_freed_port_is_given_again_when_it_is_the_lowest_free_one():
    ports = FreePorts((7500, 7599), taken=[])
    assert [ports.take() for _ in range(4)] == [7500, 7501, 7502, 7503]
    ports.give_back(7502)
    ports.give_back(7500)
    assert [ports.take(), ports.take(), ports.take()] == [7500, 7502, 7504]
    # Freed, then given explicitly: it is skipped when it comes up, not searched for.
    ports.give_back(7501)
    assert ports.take_port(7501)
    assert ports.take() == 7505


def test_with_direct_ports_any_only_explicit_ports_are_taken():
    ports = FreePorts(None, taken=[40000])
    assert ports.take() is None
    assert ports.take_port(40001) and not ports.take_port(40000)


async def test_registrations_take_the_lowest_free_ports_and_a_restart_reloads_the_taken_ones(tmp_path):
    path = tmp_path / "registry.sqlite3"
    registry = Registry(path, (7500, 7599))
    registry.add("FIXED", 7501)
    assert [(await registry.register(name)).direct_port for name in ("A", "B")] == [7500, 7502]
    # Registered in memory at once; the rows come with the next write, as the dial-in server's flush does.
    assert [record.id for record in registry.all()] == ["FIXED"]
    await registry.run(registry.write, registry.take_unwritten(), [], [])
    await registry.run(registry.release, registry.unused_reservations())
    registry.close()
    again = Registry(path, (7500, 7599))
    try:
        assert {record.id: record.direct_port for record in again.known.values()} == {
            "A": 7500,
            "FIXED": 7501,
            "B": 7502,
        }
        assert not again.held
        assert (await again.register("C")).direct_port == 7503
    finally:
        again.close()


async def test_a_port_freed_by_removal_goes_to_the_next_device_after_a_restart(tmp_path):
    path = tmp_path / "registry.sqlite3"
    cli = Registry(path, (7500, 7502))
    for name in ("A", "B", "C"):
        cli.add(name)
    with pytest.raises(RegistryError, match="direct_ports 7500-7502 are all taken; D gets no port"):
        cli.add("D")
    assert cli.remove("B")
    cli.close()
    registry = Registry(path, (7500, 7502))
    try:
        assert (await registry.register("D")).direct_port == 7501
        with pytest.raises(RegistryError, match="direct_ports 7500-7502 are all taken; E gets no port"):
            await registry.register("E")
    finally:
        registry.close()


async def test_a_crash_before_the_rows_are_written_holds_their_ports_back_at_the_next_start(tmp_path):
    path = tmp_path / "registry.sqlite3"
    registry = Registry(path, (7500, 7599))
    lost = await registry.register("LOST")
    registry.close()  # the process dies: its row and the release of the ports reserved ahead never come
    again = Registry(path, (7500, 7599))
    try:
        assert "LOST" not in again.known
        assert again.held == set(range(7500, 7500 + RESERVE_AHEAD))
        # A client that knew LOST on its port must not reach another device there.
        assert (await again.register("NEWCOMER")).direct_port == 7500 + RESERVE_AHEAD
        # An operator gives the port back to its device.
        assert again.add("LOST", lost.direct_port).direct_port == lost.direct_port
        assert lost.direct_port not in again.held
    finally:
        again.close()


async def test_a_proxy_started_after_a_crash_says_which_ports_it_holds_back_and_gives_none_of_them(tmp_path, log_lines):
    low, high = free_ports(RESERVE_AHEAD + 1)
    settings = dialin_settings(tmp_path, direct_ports=f"{low}-{high}")
    crashed = Registry(settings.dialin.registry, (low, high))
    await crashed.register("LOST")
    crashed.close()  # the process dies before the row is written
    async with running_proxy(settings) as running:
        link = await modem(running, b"NEWCOMER\n")
        device = await device_named(running, "NEWCOMER")
        await online(device)
        assert device.config.listen[0].port == high
        await link.aclose()
    assert any(f"direct ports {low}, {low + 1}," in line and "held back" in line for line in log_lines)


async def test_when_no_port_can_be_reserved_the_registration_fails_and_gives_its_ports_back(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "registry.sqlite3", (7500, 7599))
    reserve = Registry.reserve

    def full(self, ports):
        raise RegistryError(f"registry {self.path}: database or disk is full")

    monkeypatch.setattr(Registry, "reserve", full)
    try:
        with pytest.raises(RegistryError, match="disk is full"):
            await registry.register("EARLY")
        assert "EARLY" not in registry.known
        monkeypatch.setattr(Registry, "reserve", reserve)
        assert (await registry.register("LATER")).direct_port == 7500
    finally:
        registry.close()


async def test_a_device_registered_while_the_registry_cannot_be_written_serves_and_its_row_follows(
    tmp_path, fast_registry, monkeypatch, log_lines
):
    low, high = free_ports(3)
    settings = dialin_settings(tmp_path, direct_ports=f"{low}-{high}")
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        # The first registration reserves ports ahead, while the disk still takes writes.
        first = await modem(running, b"FIRST\n")
        await online(await device_named(running, "FIRST"))
        failing = [True]
        fill_disk(monkeypatch, failing)
        link = await modem(running, b"LATER\n")
        nursery.start_soon(meter, link)
        device = await device_named(running, "LATER")
        await online(device)
        await logged("cannot write the registry", log_lines)
        # Its direct port listens and its meter answers, though its row cannot be written.
        assert device.config.listen[0].port == low + 1
        async with await trio.open_tcp_stream("127.0.0.1", low + 1) as client:
            await client.send_all(b"read")
            assert await receive_exactly(client, 8) == b"ANS:read"
        failing[0] = False
        await logged("the registry is written again", log_lines)
        for stream in (first, link):
            await stream.aclose()
    with sqlite3.connect(settings.dialin.registry) as db:
        rows = dict(db.execute("SELECT id, direct_port FROM devices").fetchall())
        # A clean stop frees the ports reserved ahead and never handed out.
        reserved = db.execute("SELECT COUNT(*) FROM reserved_ports").fetchone()[0]
    assert rows == {"FIRST": low, "LATER": low + 1} and reserved == 0
