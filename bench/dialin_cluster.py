"""Dial-in across several instances on one PostgreSQL registry (bench/dialin.py --postgres URL --instances N).

N devproxy processes share a fresh schema of the database at URL; instance i listens on 127.0.0.(2+i),
with the same dial-in and direct port numbers. A batch of simulated devices dials in, spread over the
instances in turn, each a new id: the registrations per second count from the first connect until every
instance's log says each of its devices is attached. Then one device, held by the first instance, is
asked through its direct port at that instance (holding) and at the second one (forwarding: the
client's bytes are carried to the holder), in blocks that alternate, and the p50 round trips are
compared. When socat is installed, a socat forwarder to the holder's direct port takes its turn too:
what one more process on the path costs on this machine when the hop itself does almost nothing
(on 2 vCPUs, mostly the extra wake-ups and context switches).

    registrations per second (N instances)              > 200 /s
    p50 exchange through a forwarding instance / holding   < 1.5 x

    .venv/bin/python bench/dialin.py --postgres postgresql://127.0.0.1/test --instances 2
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import trio
from dialin import DIRECT_PORTS, Attached, Target, raise_open_files, report
from latency import Summary, background, die_with_parent, free_port, rotated, wait_for_port

BATCH = 1000
BLOCKS = 6
TRIPS = 300
MESSAGE = 32
POLL = 0.005
CLAIM_TIMEOUT = 3.0


def host(index: int) -> str:
    return f"127.0.0.{2 + index}"


@contextlib.contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """`url` with its search_path on a new schema, dropped afterwards."""
    import psycopg

    name = f"devproxy_bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
        try:
            parts = urllib.parse.urlsplit(url)
            query = [*urllib.parse.parse_qsl(parts.query), ("options", f"-csearch_path={name}")]
            yield urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        finally:
            admin.execute(f"DROP SCHEMA {name} CASCADE")


@contextlib.contextmanager
def instances(url: str, count: int) -> Iterator[tuple[int, list[Path]]]:
    """`count` devproxy processes on the registry at `url`: (their dial-in port, their logs)."""
    dialin_port = free_port()
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as running:
        logs = []
        for index in range(count):
            settings = Path(directory) / f"settings{index}.toml"
            settings.write_text(
                f'[proxy]\nlog_level = "INFO"\nstatus = ""\n\n[dialin]\n'
                f'listen = ["{host(index)}:{dialin_port}"]\nregistry = "{url}"\ninstance = "i{index}"\n'
                f'direct_ports = "{DIRECT_PORTS[0]}-{DIRECT_PORTS[1]}"\nping_after = 0\n'
                f"claim_timeout = {CLAIM_TIMEOUT}\nmax_devices = {BATCH + 10}\n"
            )
            log = Path(directory) / f"proxy{index}.log"
            logs.append(log)
            with log.open("w") as stderr:
                process = subprocess.Popen(
                    [sys.executable, "-m", "proxy", "run", "-c", str(settings)],
                    stderr=stderr,
                    preexec_fn=lambda: (raise_open_files(), die_with_parent()),
                )
            running.callback(process.wait, 30)
            running.callback(process.terminate)
            wait_for_port(dialin_port, process, ready=lambda port, index=index: _accepts(host(index), port))
        time.sleep(0.5)
        yield dialin_port, logs


def _accepts(address: str, port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
        return True
    return False


async def meter(address: str, port: int, number: int) -> None:
    stream = await trio.open_tcp_stream(address, port)
    async with stream:
        await stream.send_all(b"DEV%05d\n" % number)
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some():
                await stream.send_all(b"ANS:" + data)


async def round_trips(address: str, port: int, count: int) -> list[float]:
    """`count` round trips of MESSAGE bytes through a direct port, each in microseconds."""
    message = os.urandom(MESSAGE)
    samples = []
    async with await trio.open_tcp_stream(address, port) as client:
        for _ in range(count):
            started = time.perf_counter_ns()
            await client.send_all(message)
            received = 0
            while received < MESSAGE + 4:
                received += len(await client.receive_some(MESSAGE + 4 - received))
            samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


async def measure(url: str, dialin_port: int, logs: list[Path], count: int) -> tuple[float, dict[str, float]]:
    """(registrations per second, p50 µs of each path: holding, forwarding and, with socat, socat)."""
    import psycopg

    files = [log.open("rb") for log in logs]
    try:
        attached = [Attached(file) for file in files]
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for number in range(BATCH):
                nursery.start_soon(meter, host(number % count), dialin_port, number)
            while sum(watch.update() for watch in attached) < BATCH:  # noqa: ASYNC110 - other processes write the logs
                await trio.sleep(POLL)
            rate = BATCH / (time.perf_counter() - started)
            with psycopg.connect(url) as db:
                port = db.execute("SELECT direct_port FROM devices WHERE id = 'DEV00000'").fetchone()[0]
            # The forwarding instance knows the holder after its next heartbeat.
            await trio.sleep(CLAIM_TIMEOUT / 3 + 0.5)
            paths = {"holding": (host(0), port), "forwarding": (host(1), port)}
            with socat_hop(host(0), port) as socat:
                if socat is not None:
                    paths["socat"] = socat
                samples: dict[str, list[float]] = {name: [] for name in paths}
                for turn in range(BLOCKS):
                    for name in rotated(list(paths), turn):
                        samples[name] += await round_trips(*paths[name], TRIPS)
            nursery.cancel_scope.cancel()
    finally:
        for file in files:
            file.close()
    return rate, {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def socat_hop(address: str, port: int) -> Iterator[tuple[str, int] | None]:
    """A socat forwarder to `address`:`port` on 127.0.0.1 (its address, or None without socat): what one
    more process on the path costs on this machine when the hop itself costs almost nothing."""
    if shutil.which("socat") is None:
        yield None
        return
    listen = free_port()
    command = ("socat", f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,nodelay", f"TCP:{address}:{port},nodelay")
    with background(*command, port=listen):
        yield "127.0.0.1", listen


def main(url: str, count: int, summary_json: Path | None) -> None:
    if count < 2:
        raise SystemExit("--instances needs at least 2: one holds the meter, another forwards to it")
    with fresh_schema(url) as schema_url, instances(schema_url, count) as (dialin_port, logs):
        rate, p50 = trio.run(measure, schema_url, dialin_port, logs, count)
    ratio = p50["forwarding"] / p50["holding"]
    print(f"{BATCH} registrations over {count} instances: {rate:.0f} per second")
    print(f"p50 exchange: holding {p50['holding']:.0f} µs, forwarding {p50['forwarding']:.0f} µs")
    if "socat" in p50:
        print(
            f"p50 exchange through socat to the holder {p50['socat']:.0f} µs ({p50['socat'] / p50['holding']:.2f} x"
            " holding): the floor of a forwarding hop on this machine"
        )
    summary = Summary("dialin-postgres", summary_json)
    summary.add(f"registrations per second ({count} instances)", rate, "/s", "> 200", rate > 200)
    report(summary, Target("p50 exchange, forwarding / holding instance", 1.5, "x"), [ratio])
