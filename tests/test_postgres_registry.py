"""Several instances on one PostgreSQL registry: registration, claims, forwarding, and a database that
goes away and comes back.

Against a real server: DEVPROXY_TEST_POSTGRES (default postgresql://127.0.0.1:5432/test), a fresh schema
per test. The tests skip, saying why, when no server answers, unless DEVPROXY_REQUIRE_POSTGRES=1 (CI).
Each instance binds its own loopback address (127.0.0.2, 127.0.0.3), with the same direct ports.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator

import psycopg
import pytest
import trio
from test_dialin import free_ports

from proxy.app import Running
from proxy.config import ConfigError, Settings, parse
from proxy.device import Device
from proxy.dialin.postgres import SCHEMA_VERSION, PostgresRegistry
from proxy.dialin.registry import Registry, RegistryError
from proxy.status import device_page
from proxy.status.snapshot import Entry, device_snapshot

from helpers import WAIT_LIMIT, device_named, logged, meter, modem, online, receive_exactly, running_proxy, wait_for

POSTGRES = os.environ.get("DEVPROXY_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
PROXY = [sys.executable, "-m", "proxy"]
# Short, so that an instance's claims expire within the test; heartbeats come every third of it.
CLAIM_TIMEOUT = 0.6


def with_options(url: str, schema: str, netloc: str | None = None) -> str:
    """`url` with its search_path set to `schema` (and another host:port when given)."""
    parts = urllib.parse.urlsplit(url)
    query = [*urllib.parse.parse_qsl(parts.query), ("options", f"-csearch_path={schema}")]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query), netloc=netloc or parts.netloc))


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema, dropped after the test; skips (or fails under DEVPROXY_REQUIRE_POSTGRES=1) when no
    server answers."""
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"no PostgreSQL answers at {POSTGRES} (DEVPROXY_TEST_POSTGRES): {str(exc).strip()}"
        if os.environ.get("DEVPROXY_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}; DEVPROXY_REQUIRE_POSTGRES=1 requires one")
        pytest.skip(reason)
    name = f"devproxy_test_{secrets.token_hex(6)}"
    admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        admin.execute(f"DROP SCHEMA {name} CASCADE")
        admin.close()


@pytest.fixture
def pg_url(schema: str) -> str:
    return with_options(POSTGRES, schema)


def instance(url: str, name: str, host: str, ports: tuple[int, int], **keys: object) -> Settings:
    table = {
        "listen": [f"{host}:0"],
        "registry": url,
        "instance": name,
        "direct_ports": f"{ports[0]}-{ports[1]}",
        "claim_timeout": CLAIM_TIMEOUT,
        "acquire_timeout": 0.5,
        "identify_timeout": 5,
        "ping_after": 0,
        **keys,
    }
    return parse({"proxy": {"status": ""}, "dialin": table})


async def direct_client(device: Device) -> trio.SocketStream:
    address = device.config.listen[0]
    return await trio.open_tcp_stream(address.host, address.port)


async def meter_held_at(
    holder: Running, other: Running, nursery: trio.Nursery
) -> tuple[trio.SocketStream, Device, Device]:
    """METER1 dials in at `holder` and answers there, and `other` knows it is held there (it forwards
    the meter's clients): the meter's link, and its device at each instance."""
    link = await modem(holder, b"METER1\n")
    nursery.start_soon(meter, link)
    at_holder = await device_named(holder, "METER1")
    await online(at_holder)
    at_other = await device_named(other, "METER1")
    await until(other, lambda: other.cluster.elsewhere(at_other) is not None)
    return link, at_holder, at_other


async def asks(device: Device, request: bytes) -> bytes:
    """What a client at `device`'s direct port gets back for `request` from a meter()."""
    async with await direct_client(device) as client:
        await client.send_all(request)
        return await receive_exactly(client, len(request) + 4)


async def refused(device: Device) -> bytes:
    """What a client at the direct port of an offline device receives before it is closed."""
    async with await direct_client(device) as client:
        with trio.fail_after(WAIT_LIMIT):
            return await client.receive_some()


async def until(running: Running, condition) -> None:
    """Waits until `condition()` holds, checking it after each heartbeat of `running`'s instance."""
    with trio.fail_after(WAIT_LIMIT):
        while not condition():
            await running.cluster.polled.wait()


class Relay:
    """A TCP relay to PostgreSQL that the test cuts (every connection closed, new ones too) and restores:
    the database goes away for the instance that uses it, and comes back."""

    def __init__(self) -> None:
        self.open = True
        self._scopes: set[trio.CancelScope] = set()
        parts = urllib.parse.urlsplit(POSTGRES)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)

    async def serve(self, *, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._relay, listeners)

    def url(self, schema: str, port: int) -> str:
        parts = urllib.parse.urlsplit(POSTGRES)
        user = f"{parts.username}@" if parts.username else ""
        return with_options(POSTGRES, schema, netloc=f"{user}127.0.0.1:{port}")

    async def _relay(self, stream: trio.SocketStream) -> None:
        async with stream:
            if not self.open:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with await trio.open_tcp_stream(*self._target) as upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._copy, stream, upstream, scope)
                        nursery.start_soon(self._copy, upstream, stream, scope)
                finally:
                    self._scopes.discard(scope)

    @staticmethod
    async def _copy(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some():
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        scope.cancel()

    def cut(self) -> None:
        self.open = False
        for scope in self._scopes:
            scope.cancel()

    def restore(self) -> None:
        self.open = True


def cli(settings_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PROXY, "devices", "-c", str(settings_path), *args], capture_output=True, text=True, timeout=30
    )


def settings_file(tmp_path, registry: str) -> object:
    path = tmp_path / "settings.toml"
    path.write_text(
        f'[proxy]\nstatus = ""\n\n[dialin]\nlisten = ["127.0.0.1:0"]\nregistry = "{registry}"\n'
        'direct_ports = "7500-7999"\nping_after = 0\ninstance = "cli"\n'
    )
    return path


def test_the_devices_commands_work_on_postgresql_and_list_shows_the_holder(pg_url, tmp_path):
    config = settings_file(tmp_path, pg_url)
    assert cli(config, "add", "METER1").stdout == "added METER1 with direct port 7500\n"
    assert cli(config, "add", "METER2", "--port", "7777", "--name", "north").returncode == 0
    taken = cli(config, "add", "METER3", "--port", "7777")
    assert taken.returncode == 1 and "port 7777 belongs to another device" in taken.stderr
    again = cli(config, "add", "METER1")
    assert again.returncode == 1 and "METER1 is already registered" in again.stderr
    registry = PostgresRegistry(pg_url, (7500, 7999), instance="north-1", advertise="10.0.0.1")
    registry._beat()
    registry.claiming("METER2")
    trio.run(registry.claim_pending)
    registry.close()
    listing = cli(config, "list")
    assert listing.returncode == 0, listing.stderr
    header, first, second = listing.stdout.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "STATE", "HOLDER"]
    assert first.split()[:4] == ["METER1", "-", "offline", "-"]
    assert second.split()[:5] == ["METER2", "north", "offline", "north-1", "7777"]
    assert cli(config, "remove", "METER1").stdout == "removed METER1\n"
    assert cli(config, "remove", "METER1").returncode == 1
    assert "METER1" not in cli(config, "list").stdout


def test_migrate_copies_a_sqlite_registry_and_names_what_it_skips(pg_url, tmp_path):
    sqlite_path = tmp_path / "reg.sqlite3"
    source = Registry(sqlite_path, (7500, 7999))
    source.add("OLD1", name="first")
    source.add("OLD2", port=7600)
    source.close()
    config = settings_file(tmp_path, str(sqlite_path))
    other = PostgresRegistry(pg_url, (7500, 7999))
    other.add("ELSE", port=7600)
    other.close()
    result = cli(config, "migrate", "--to", pg_url)
    assert result.returncode == 1
    assert "skipped OLD2: its port is another's" in result.stdout
    assert "1 copied" in result.stdout and "1 skipped" in result.stdout
    copied = PostgresRegistry(pg_url, (7500, 7999))
    assert {(r.id, r.name, r.direct_port) for r in copied.all()} == {("OLD1", "first", 7500), ("ELSE", "", 7600)}
    copied.close()


def test_a_registry_of_a_newer_schema_is_refused_with_a_clear_message(pg_url, tmp_path):
    PostgresRegistry(pg_url, (7500, 7999)).close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(RegistryError, match=f"schema is version {SCHEMA_VERSION + 1}, newer than this devproxy's"):
        PostgresRegistry(pg_url, (7500, 7999))
    listing = cli(settings_file(tmp_path, pg_url), "list")
    assert listing.returncode == 1 and "newer than this devproxy's" in listing.stderr


def test_without_psycopg_a_postgresql_registry_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(RegistryError, match=r"pip install 'devproxy\[postgresql\]'"):
        PostgresRegistry("postgresql://127.0.0.1/test", (7500, 7999))


def test_the_instance_keys_are_checked_naming_the_key_and_value():
    with pytest.raises(ConfigError) as error:
        parse(
            {"dialin": {"instance": "a b", "advertise": "10.0.0.1:7500", "claim_timeout": 0, "max_pending_writes": 0}}
        )
    message = str(error.value)
    assert "[dialin]: instance 'a b' is not an instance name" in message
    assert "[dialin]: advertise '10.0.0.1:7500' is not a host name or IP address" in message
    assert "[dialin]: claim_timeout 0 must be > 0 seconds" in message
    assert "[dialin]: max_pending_writes 0 is not >= 1" in message


async def test_two_instances_registering_the_same_and_new_ids_at_once_never_share_a_port(pg_url):
    first = PostgresRegistry(pg_url, (20000, 22999), instance="a")
    second = PostgresRegistry(pg_url, (20000, 22999), instance="b")
    shared = [f"S{n}" for n in range(250)]
    async with trio.open_nursery() as nursery:
        for registry, own in ((first, "A"), (second, "B")):
            ids = [f"{own}{n}" for n in range(750)] + shared

            async def register_all(registry=registry, ids=ids) -> None:
                for device_id in ids:
                    await registry.register(device_id)

            nursery.start_soon(register_all)
    rows = await first.run(first.all)
    assert len(rows) == 1750
    assert len({row.direct_port for row in rows}) == 1750
    for registry in (first, second):
        assert {r.id: r.direct_port for r in rows if r.id in registry.known} == {
            i: r.direct_port for i, r in registry.known.items()
        }
        registry.close()


async def test_a_meter_at_one_instance_answers_a_client_at_another_and_moving_closes_the_stale_link(pg_url):
    ports = free_ports(4)
    async with (
        running_proxy(instance(pg_url, "a", "127.0.0.2", ports)) as a,
        running_proxy(instance(pg_url, "b", "127.0.0.3", ports)) as b,
        trio.open_nursery() as nursery,
    ):
        # B starts the device A registered, and forwards its clients to A.
        first, at_a, at_b = await meter_held_at(a, b, nursery)
        assert at_b.config.listen[0].port == at_a.config.listen[0].port
        assert await asks(at_b, b"read energy") == b"ANS:read energy"

        second = await modem(b, b"METER1\n")
        nursery.start_soon(meter, second)
        await online(at_b)
        await wait_for(at_a, lambda: not at_a.link_up)
        with trio.fail_after(WAIT_LIMIT):
            assert await first.receive_some() == b""
        await until(a, lambda: a.cluster.elsewhere(at_a) is not None)
        assert await asks(at_a, b"read power") == b"ANS:read power"
        assert await asks(at_b, b"read time") == b"ANS:read time"
        await first.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_an_instance_that_loses_the_database_keeps_its_meters_and_the_others_take_them_over(schema, log_lines):
    ports = free_ports(4)
    relay = Relay()
    async with trio.open_nursery() as outer:
        relay_port = await outer.start(relay.serve)
        through_relay = relay.url(schema, relay_port)
        async with (
            running_proxy(instance(through_relay, "a", "127.0.0.2", ports)) as a,
            running_proxy(instance(with_options(POSTGRES, schema), "b", "127.0.0.3", ports)) as b,
            trio.open_nursery() as nursery,
        ):
            first, at_a, at_b = await meter_held_at(a, b, nursery)

            relay.cut()
            await logged("dialin: instance a: registry", log_lines)
            # A keeps serving its meter; a new id is refused with the reason; B sees A's claim expire.
            assert await asks(at_a, b"while cut") == b"ANS:while cut"
            stranger = await modem(a, b"NEWID\n")
            await logged("dialin: NEWID", log_lines)
            assert any(
                "NEWID" in line and "not registered" in line and "cannot be reached" in line for line in log_lines
            )
            await stranger.aclose()
            await until(b, lambda: b.cluster.elsewhere(at_b) is None)
            assert await refused(at_b) == b""

            # The meter redials at B, which serves it; A keeps its stale link until it can hear of it.
            second = await modem(b, b"METER1\n")
            nursery.start_soon(meter, second)
            await online(at_b)
            assert await asks(at_b, b"at b") == b"ANS:at b"
            assert at_a.link_up
            await logged("dialin: cannot write the registry", log_lines)

            relay.restore()
            await logged("dialin: instance a: the registry can be reached again", log_lines)
            await wait_for(at_a, lambda: not at_a.link_up)
            await logged("dialin: the registry is written again", log_lines)
            await until(a, lambda: a.cluster.elsewhere(at_a) is not None)
            assert await asks(at_a, b"via a") == b"ANS:via a"
            await first.aclose()
            await second.aclose()
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    with psycopg.connect(with_options(POSTGRES, schema)) as db:
        written = db.execute("SELECT bytes_to_device FROM devices WHERE id = 'METER1'").fetchone()[0]
    assert written >= len(b"while cut")


async def test_a_terminated_backend_is_replaced_while_meters_and_clients_keep_working(pg_url):
    ports = free_ports(4)
    async with (
        running_proxy(instance(pg_url, "a", "127.0.0.2", ports)) as a,
        running_proxy(instance(pg_url, "b", "127.0.0.3", ports)) as b,
        trio.open_nursery() as nursery,
    ):
        link, _, at_b = await meter_held_at(a, b, nursery)
        with psycopg.connect(POSTGRES, autocommit=True) as db:
            killed = db.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'devproxy a'"
            ).fetchone()[0]
        assert killed == 1
        assert await asks(at_b, b"after kill") == b"ANS:after kill"
        # The second heartbeat to succeed after the kill began after it: A has a working connection again.
        for _ in range(2):
            await a.cluster.polled.wait()
        second = await modem(a, b"METER2\n")
        nursery.start_soon(meter, second)
        await online(await device_named(a, "METER2"))
        at_b2 = await device_named(b, "METER2")
        await until(b, lambda: b.cluster.elsewhere(at_b2) is not None)
        assert await asks(at_b2, b"two") == b"ANS:two"
        await link.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_three_instances_a_stopped_holder_gives_its_meter_up_and_the_others_follow_it(pg_url):
    ports = free_ports(4)
    async with (
        running_proxy(instance(pg_url, "b", "127.0.0.3", ports)) as b,
        running_proxy(instance(pg_url, "c", "127.0.0.4", ports)) as c,
        trio.open_nursery() as nursery,
    ):
        async with running_proxy(instance(pg_url, "a", "127.0.0.2", ports)) as a:
            first = await modem(a, b"METER1\n")
            nursery.start_soon(meter, first)
            await online(await device_named(a, "METER1"))
            at_c = await device_named(c, "METER1")
            await until(c, lambda: c.cluster.elsewhere(at_c) is not None)
            assert device_snapshot(at_c, [])["path"].startswith("held by instance a (127.0.0.2:")
            # Its page at C links to A's page of it, at the status port and scheme all instances share.
            page = device_page.render(Entry("METER1", at_c, []), origin=("https", 8600))
            assert 'href="https://127.0.0.2:8600/devices/METER1"' in page
            assert await asks(at_c, b"via c") == b"ANS:via c"
        # A stopped: its meter's link closed and its claim given up; the meter redials at B.
        with trio.fail_after(WAIT_LIMIT):
            assert await first.receive_some() == b""
        second = await modem(b, b"METER1\n")
        nursery.start_soon(meter, second)
        await online(await device_named(b, "METER1"))
        await until(c, lambda: (held := c.cluster.elsewhere(at_c)) is not None and held.instance == "b")
        assert await asks(at_c, b"via c again") == b"ANS:via c again"
        await first.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()
