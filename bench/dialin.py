"""Dial-in at scale: how fast devproxy attaches a burst of GPRS devices, and what each one costs it.

devproxy runs in its own process with a [dialin] table and a fresh registry; this script is the other
side. A batch of simulated devices connects at once to the dial-in port; each says its id, then answers
every request like a meter. The batch is done when the proxy's log says every device of it is attached
and the batch's last direct port, found by connecting to it, answers a request through its device (a
fresh registry hands the ports of the range out in order: the last one is the last registration's).
The registry file is never read: the proxy holds it alone while it runs.

Each round starts a fresh proxy for a batch of 1,000, then another for a batch of 9,000, whose RSS per
device it reads once the batch is attached (against its RSS before; each device costs the proxy two
descriptors, its connection and its direct port, and this process one). It prints each round, then the
medians, each beside its target:

    1,000 devices attached, direct ports listening   < 1 s
    9,000 devices attached, direct ports listening   < 10 s
    proxy RSS per device (9,000 attached)            < 20 KiB

    .venv/bin/python bench/dialin.py [--rounds N] [--summary-json FILE]

With --postgres URL --instances N, several instances share a PostgreSQL registry instead (see
bench/dialin_cluster.py): registrations per second, and a forwarding instance's p50 exchange latency
against the holding instance's.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import Summary, add_summary_argument, free_port, wait_for_port

DIRECT_PORTS = (20000, 29999)
SMALL_BATCH = 1000
LARGE_BATCH = 9000
# Descriptors beside the devices: the proxy's listeners, registry, log and pipes; this process's own.
HEADROOM = 60
# How often the log and the last direct port are looked at while a batch attaches: a figure is late by
# at most about this much.
POLL = 0.005
# Before RSS is read, what follows the burst (the registry's write, log buffers) is done.
SETTLE = 1.0


@attrs.frozen
class Target:
    """A figure of the bench and its target: below `limit`, in `unit`."""

    figure: str
    limit: float
    unit: str

    def met(self, value: float) -> bool:
        return value < self.limit

    def text(self) -> str:
        return f"< {self.limit:g} {self.unit}"


SMALL = Target("1,000 devices attached, direct ports listening", 1.0, "s")
LARGE = Target("9,000 devices attached, direct ports listening", 10.0, "s")
RSS = Target("proxy RSS per device (9,000 attached)", 20.0, "KiB")


def raise_open_files() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS")


def busy_direct_ports(count: int) -> list[int]:
    """The ports of the first `count` of DIRECT_PORTS that another program holds: no device gets them."""
    busy = []
    for port in range(DIRECT_PORTS[0], DIRECT_PORTS[0] + count):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


async def device(port: int, number: int) -> None:
    """One simulated device: connects, says its id, answers each request with ANS: and the request."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"DEV%05d\n" % number)
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some():
                await stream.send_all(b"ANS:" + data)


class Attached:
    """Counts the devices attached so far in the proxy's log, reading only what was added since the
    last look."""

    def __init__(self, log: BinaryIO) -> None:
        self._log = log
        self._tail = b""
        self.count = 0

    def update(self) -> int:
        text = self._tail + self._log.read()
        complete, _, self._tail = text.rpartition(b"\n")
        # A device whose direct port another program holds is refused (and counted): it is done too.
        self.count += complete.count(b" is DEV") + complete.count(b"has no direct port")
        return self.count


async def answers(port: int) -> None:
    """Returns once `port` accepts and a request through it is answered by the device behind it (a client
    that comes before its device waits for it: session sharing's acquire_timeout)."""
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(POLL)
            continue
        async with stream:
            await stream.send_all(b"probe")
            answer = b""
            while len(answer) < len(b"ANS:probe") and (data := await stream.receive_some()):
                answer += data
        if answer == b"ANS:probe":
            return
        await trio.sleep(POLL)


async def attach_batch(
    dialin_port: int, log: Path, count: int, *, task_status: trio.TaskStatus[float] = trio.TASK_STATUS_IGNORED
) -> None:
    """Connects `count` devices at once; task_status gets the seconds from the first connect until all are
    attached and the last direct port answers. The devices stay connected until cancelled."""
    with log.open("rb") as file:
        attached = Attached(file)

        async def all_attached() -> None:
            while attached.update() < count:  # noqa: ASYNC110 - another process writes the log
                await trio.sleep(POLL)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for number in range(count):
                nursery.start_soon(device, dialin_port, number)
            async with trio.open_nursery() as watchers:
                watchers.start_soon(all_attached)
                watchers.start_soon(answers, DIRECT_PORTS[0] + count - 1)
            task_status.started(time.perf_counter() - started)


async def measure(pid: int, dialin_port: int, log: Path, count: int) -> tuple[float, float]:
    """(seconds until a batch of `count` is attached and listening, the proxy's KiB of RSS per device)."""
    baseline = rss_kib(pid)
    async with trio.open_nursery() as nursery:
        elapsed = await nursery.start(attach_batch, dialin_port, log, count)
        await trio.sleep(SETTLE)
        per_device = (rss_kib(pid) - baseline) / count
        nursery.cancel_scope.cancel()
    return elapsed, per_device


@contextlib.contextmanager
def running_proxy(count: int) -> Iterator[tuple[int, int, Path]]:
    """A devproxy process with a fresh registry for `count` devices: (its pid, dial-in port, its log)."""
    dialin_port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        settings = Path(directory) / "settings.toml"
        settings.write_text(
            f'[proxy]\nlog_level = "INFO"\nstatus = ""\n\n[dialin]\nlisten = ["127.0.0.1:{dialin_port}"]\n'
            f'registry = "{Path(directory) / "registry.sqlite3"}"\n'
            f'direct_ports = "{DIRECT_PORTS[0]}-{DIRECT_PORTS[1]}"\nping_after = 0\nmax_devices = {count + 10}\n'
        )
        log = Path(directory) / "proxy.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(settings)], preexec_fn=raise_open_files, stderr=stderr
            )
        try:
            wait_for_port(dialin_port, process)
            # The probe's connection, which never identified, is gone by the time the batch begins.
            time.sleep(0.5)
            yield process.pid, dialin_port, log
        finally:
            process.terminate()
            process.wait(60)


def report(summary: Summary, target: Target, values: list[float]) -> None:
    value = statistics.median(values)
    rounds = f" (rounds: {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
    verdict = "met" if target.met(value) else "NOT MET"
    print(f"{target.figure:47} {value:6.2f} {target.unit:3}  target {target.text():8}  {verdict}{rounds}", flush=True)
    summary.add(target.figure, value, target.unit, target.text(), target.met(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both batches (default 3); medians count")
    parser.add_argument("--postgres", metavar="URL", help="several instances on this PostgreSQL registry instead")
    parser.add_argument("--instances", type=int, default=2, help="with --postgres: how many (default 2)")
    add_summary_argument(parser)
    args = parser.parse_args()
    if args.postgres:
        import dialin_cluster

        dialin_cluster.main(args.postgres, args.instances, args.summary_json)
        return
    hard = raise_open_files()
    needed = 2 * LARGE_BATCH + HEADROOM
    if hard < needed:
        raise SystemExit(f"the open-file limit is {hard}; a batch of {LARGE_BATCH} needs {needed}")
    busy = busy_direct_ports(LARGE_BATCH)
    if busy:
        print(f"{len(busy)} direct port(s) held by other programs ({busy[0]}, ...): their devices count as done")
    figures: dict[Target, list[float]] = {SMALL: [], LARGE: [], RSS: []}
    for turn in range(1, args.rounds + 1):
        with running_proxy(SMALL_BATCH) as (pid, dialin_port, log):
            figures[SMALL].append(trio.run(measure, pid, dialin_port, log, SMALL_BATCH)[0])
        with running_proxy(LARGE_BATCH) as (pid, dialin_port, log):
            elapsed, per_device = trio.run(measure, pid, dialin_port, log, LARGE_BATCH)
        figures[LARGE].append(elapsed)
        figures[RSS].append(per_device)
        print(
            f"round {turn}: 1,000 in {figures[SMALL][-1]:.2f} s; 9,000 in {elapsed:.2f} s, "
            f"{per_device:.1f} KiB RSS per device",
            flush=True,
        )
    summary = Summary("dialin", args.summary_json)
    for target, values in figures.items():
        report(summary, target, values)


if __name__ == "__main__":
    main()
