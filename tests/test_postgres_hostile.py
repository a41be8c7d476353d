"""A hostile operator and network against several instances on one PostgreSQL registry: malformed URLs,
rows written by hand, rows locked by a forgotten transaction, instances that point their clients at
each other, floods at an instance that does not hold the meter, and direct ports that speak RFC 2217.

Against a real server, a fresh schema per test (the fixtures of test_postgres_registry).
"""

from __future__ import annotations

import subprocess

import psycopg
import pytest
import test_postgres_registry
import trio
from test_dialin import free_ports
from test_postgres_registry import PROXY, asks, direct_client, instance, meter_held_at, until
from test_tls import Pki

from proxy.config import ConfigError, parse
from proxy.dialin.postgres import PostgresRegistry
from proxy.dialin.registry import RegistryError

from helpers import (
    WAIT_LIMIT,
    device_named,
    logged,
    meter,
    modem,
    online,
    receive_exactly,
    receive_until_closed,
    running_proxy,
)

# The fresh schema per test, and the URL that names it.
schema, pg_url = test_postgres_registry.schema, test_postgres_registry.pg_url


def insert_rows(url: str, *rows: tuple[str, int | None]) -> None:
    """Rows written by hand, as an operator in psql would."""
    with psycopg.connect(url, autocommit=True) as db:
        for device_id, port in rows:
            db.execute("INSERT INTO devices (id, direct_port, created) VALUES (%s, %s, 'by hand')", (device_id, port))


def test_a_registry_url_that_cannot_be_taken_apart_is_a_config_error_without_its_password():
    with pytest.raises(ConfigError) as error:
        parse({"dialin": {"registry": "postgresql://devproxy:secret@[::1/devproxy"}})
    message = str(error.value)
    assert "[dialin]: registry 'postgresql://***@[::1/devproxy' is not a postgresql:// URL" in message
    assert "secret" not in message


def test_libpq_quoting_a_url_it_cannot_parse_never_shows_the_password():
    with pytest.raises(RegistryError) as error:
        PostgresRegistry("postgresql://devproxy:secret@[::1/devproxy", (7500, 7999))
    assert "secret" not in str(error.value)
    assert "postgresql://***@[::1/devproxy" in str(error.value)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/nosuchdb", 'database "nosuchdb" does not exist'),
        ("/test?user=nosuchrole", 'role "nosuchrole" does not exist'),
    ],
)
def test_check_and_run_name_a_wrong_database_or_user(tmp_path, schema, path, expected):
    config = tmp_path / "settings.toml"
    config.write_text(
        f'[proxy]\nstatus = ""\n[dialin]\nlisten = ["127.0.0.1:0"]\nregistry = "postgresql://127.0.0.1:5432{path}"\n'
    )
    checked = subprocess.run([*PROXY, "check", "-c", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and expected in checked.stdout
    ran = subprocess.run([*PROXY, "run", "-c", str(config)], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 2 and expected in ran.stderr and "Traceback" not in ran.stderr


async def test_rows_written_by_hand_with_impossible_ports_or_ids_are_logged_and_skipped(pg_url, log_lines):
    ports = free_ports(4)
    PostgresRegistry(pg_url, ports).close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("ALTER TABLE devices ALTER COLUMN direct_port DROP NOT NULL")
    insert_rows(pg_url, ("PZERO", 0), ("PBIG", 70000), ("PNULL", None), ("a b", ports[0]), ("X" * 5000, ports[0] + 1))
    async with running_proxy(instance(pg_url, "a", "127.0.0.2", ports)) as a, trio.open_nursery() as nursery:
        # Port 70000 would have been bound as 70000 - 65536, port 0 wherever the system chose.
        assert a.devices == {}
        for problem in ("PZERO: direct port 0", "PBIG: direct port 70000", "PNULL: direct port None", "'a b' is no"):
            assert any(problem in line and "skipped" in line for line in log_lines), problem
        assert not any("X" * 100 in line for line in log_lines)
        # Rows written while it runs are skipped the same way, and good ones still start.
        insert_rows(pg_url, ("LATE0", -1), ("GOOD", ports[0] + 2))
        await logged("LATE0: direct port -1 is not a TCP port; skipped", log_lines)
        await device_named(a, "GOOD")
        link = await modem(a, b"METER1\n")
        nursery.start_soon(meter, link)
        at_a = await device_named(a, "METER1")
        await online(at_a)
        assert await asks(at_a, b"still serving") == b"ANS:still serving"
        await link.aclose()
        nursery.cancel_scope.cancel()


async def test_a_transaction_left_open_on_the_rows_stalls_neither_heartbeats_nor_new_meters(pg_url, log_lines):
    ports = free_ports(4)
    async with running_proxy(instance(pg_url, "a", "127.0.0.2", ports)) as a, trio.open_nursery() as nursery:
        first = await modem(a, b"METER1\n")
        nursery.start_soon(meter, first)
        at_a = await device_named(a, "METER1")
        await online(at_a)
        with psycopg.connect(pg_url) as forgotten:
            forgotten.execute("UPDATE devices SET note = 'being edited'")  # and never committed
            assert await asks(at_a, b"traffic") == b"ANS:traffic"
            await logged("canceling statement due to lock timeout", log_lines)
            await a.cluster.polled.wait()
            second = await modem(a, b"METER2\n")
            nursery.start_soon(meter, second)
            await online(await device_named(a, "METER2"))
            forgotten.rollback()
        await logged("dialin: the registry is written again", log_lines)
        await first.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_a_holder_advertising_this_instances_own_address_gets_no_forwarded_loop(pg_url, log_lines):
    ports = free_ports(4)
    async with running_proxy(instance(pg_url, "b", "127.0.0.3", ports)) as b:
        insert_rows(pg_url, ("M1", ports[0]))
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute("UPDATE devices SET holder = 'ghost', claimed_at = now() WHERE id = 'M1'")
            db.execute("INSERT INTO instances VALUES ('ghost', '127.0.0.3', now() + interval '1 hour')")
        at_b = await device_named(b, "M1")
        await logged("instance ghost advertises 127.0.0.3, as this instance b does", log_lines)
        assert b.cluster.elsewhere(at_b) is None
        async with await direct_client(at_b) as client:
            await client.send_all(b"hello")
            assert await receive_until_closed(client) == b""
        assert not any("forwarded to instance" in line for line in log_lines)


async def test_a_forwarding_loop_through_another_spelling_of_this_address_is_bounded_by_max_clients(pg_url, log_lines):
    ports = free_ports(4)
    async with running_proxy(instance(pg_url, "b", "127.0.0.3", ports, max_clients=4)) as b:
        insert_rows(pg_url, ("M1", ports[0]))
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute("UPDATE devices SET holder = 'ghost', claimed_at = now() WHERE id = 'M1'")
            # 127.3 is 127.0.0.3 to the resolver: B itself, which B cannot tell from the text.
            db.execute("INSERT INTO instances VALUES ('ghost', '127.3', now() + interval '1 hour')")
        at_b = await device_named(b, "M1")
        await until(b, lambda: b.cluster.elsewhere(at_b) is not None)
        async with await direct_client(at_b) as client:
            await client.send_all(b"hello")
            with trio.fail_after(WAIT_LIMIT):
                assert await receive_until_closed(client) == b""
        assert sum("forwarded to instance ghost" in line for line in log_lines) == 4
        assert any("max_clients = 4 reached" in line for line in log_lines)
        await online_clients_gone(at_b)


async def online_clients_gone(device) -> None:
    with trio.fail_after(WAIT_LIMIT):
        while device.clients:
            await device.changed()


async def test_a_flood_at_the_instance_that_does_not_hold_the_meter_is_held_to_max_clients(pg_url, log_lines):
    ports = free_ports(4)
    async with (
        running_proxy(instance(pg_url, "a", "127.0.0.2", ports, max_clients=3, acquire_timeout=30)) as a,
        running_proxy(instance(pg_url, "b", "127.0.0.3", ports, max_clients=2)) as b,
        trio.open_nursery() as nursery,
    ):
        link, at_a, at_b = await meter_held_at(a, b, nursery)
        carried = [await direct_client(at_b) for _ in range(2)]
        with trio.fail_after(WAIT_LIMIT):
            while at_a.clients < 2:
                await at_a.changed()
        assert at_b.clients == 2
        for _ in range(3):
            async with await direct_client(at_b) as refused:
                assert await receive_until_closed(refused) == b""
        assert sum("refused: max_clients = 2 reached" in line for line in log_lines) == 3
        for client in carried:
            await client.aclose()
        await online_clients_gone(at_b)
        await link.aclose()
        nursery.cancel_scope.cancel()


async def test_a_client_at_an_rfc2217_direct_port_of_another_instance_is_forwarded(pg_url):
    ports = free_ports(4)
    async with (
        running_proxy(instance(pg_url, "a", "127.0.0.2", ports, direct_rfc2217=True)) as a,
        running_proxy(instance(pg_url, "b", "127.0.0.3", ports, direct_rfc2217=True)) as b,
        trio.open_nursery() as nursery,
    ):
        link, _, at_b = await meter_held_at(a, b, nursery)
        held = b.cluster.elsewhere(at_b)
        assert (held.instance, held.address.host, held.address.port) == ("a", "127.0.0.2", ports[0])
        await link.aclose()
        nursery.cancel_scope.cancel()


async def test_a_tls_client_at_another_instance_is_carried_before_its_handshake_to_the_holder(pg_url, tmp_path):
    ports = free_ports(4)
    pki = Pki(tmp_path)
    pki.server_cert, pki.server_key = pki.files(pki.ca.issue_cert("meters.example"), "instances")
    keys = {**pki.server_keys(), "direct_tls": True, "direct_tls_client_ca": pki.ca_file}
    keys["listen_tls"] = ["127.0.0.1:0"]
    async with (
        running_proxy(instance(pg_url, "a", "127.0.0.2", ports, **keys)) as a,
        running_proxy(instance(pg_url, "b", "127.0.0.3", ports, **keys)) as b,
        trio.open_nursery() as nursery,
    ):
        link, _, _ = await meter_held_at(a, b, nursery)
        context = pki.client_context(pki.ca.issue_cert("metering.example"))
        client = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.3", ports[0]), context, server_hostname="meters.example"
        )
        async with client:
            await client.send_all(b"over tls")
            assert await receive_exactly(client, 12) == b"ANS:over tls"
        await link.aclose()
        nursery.cancel_scope.cancel()
