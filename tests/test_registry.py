"""The dial-in registry under faults: a bad file stops the start with a clear reason; trouble while running
costs one registration at most, and nothing that was to be written is lost."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from proxy.dialin import registry as registry_module
from proxy.dialin import server as server_module

from helpers import device_named, dialin_settings, logged, modem, online, receive_until_closed, running_proxy

PROXY = [sys.executable, "-m", "proxy"]


@pytest.fixture
def fast_registry(monkeypatch):
    """Locks are waited for 50 ms and updates flushed every 50 ms, so that failures show quickly."""
    monkeypatch.setattr(registry_module, "BUSY_TIMEOUT_MS", 50)
    monkeypatch.setattr(server_module, "FLUSH_INTERVAL", 0.05)


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
        # The disk fills up (as the proxy runs as root here, a real one cannot be arranged in a test).
        failing = [True]
        record, find_or_add = registry_module.Registry.record, registry_module.Registry.find_or_add

        def full(method):
            def refuse(self, *args):
                if failing[0]:
                    raise registry_module.RegistryError(f"registry {self.path}: database or disk is full")
                return method(self, *args)

            return refuse

        monkeypatch.setattr(registry_module.Registry, "record", full(record))
        monkeypatch.setattr(registry_module.Registry, "find_or_add", full(find_or_add))
        # Meanwhile a new id cannot be registered (that device alone is refused) ...
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
