"""Dial-in at scale: thousands of simulated GPRS devices connected to one devproxy process.

devproxy runs in its own process with a [dialin] table; this script is the other side: it opens 1,000
device connections, then 3,000 in all, then as many as the open-file limits allow (each device costs
the proxy two descriptors, its connection and its direct port, and this process one), each sending
its id and then answering like a meter. At each step it prints the time to register the new devices,
the proxy's RSS per device, and the round-trip latency of one exchange on one device's direct port,
against the same with one device connected.

    .venv/bin/python bench/dialin.py [--max N]
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import free_port, wait_for_port

DIRECT_PORTS = (20000, 29999)
HEADROOM = 60
PROFILER: list[str] = []  # descriptors the proxy needs beside its devices (listeners, registry, pipes)


def raise_open_files() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS")


async def device(port: int, number: int, ready: trio.Event, counter: list[int], total: int) -> None:
    """One simulated device: connects, says its id, answers each request with ANS: and the request."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"DEV%05d\n" % number)
        counter[0] += 1
        if counter[0] == total:
            ready.set()
        try:
            while data := await stream.receive_some():
                await stream.send_all(b"ANS:" + data)
        except trio.BrokenResourceError:
            pass


class Attached:
    """Counts the devices attached so far in the proxy's log, reading only what was added since the
    last look (the registry is the proxy's alone while it runs, so it cannot be read)."""

    def __init__(self, log: Path) -> None:
        self._file = log.open("rb")
        self._tail = b""
        self.count = 0

    def update(self) -> int:
        text = self._tail + self._file.read()
        complete, _, self._tail = text.rpartition(b"\n")
        # A device whose direct port another program holds is refused (and counted): it is done too.
        self.count += complete.count(b" is DEV") + complete.count(b"has no direct port")
        return self.count


def direct_port(log: Path, device_id: str) -> int:
    return int(re.search(rf"registered {device_id} with direct port (\d+)", log.read_text()).group(1))


async def round_trips(port: int, count: int = 300) -> float:
    """p50 in microseconds of `count` exchanges of 16 bytes on a direct port."""
    samples = []
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for _ in range(count):
            started = time.perf_counter()
            await stream.send_all(b"0123456789abcdef")
            answer = b""
            while len(answer) < 20:
                answer += await stream.receive_some()
            samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


async def run(proxy: subprocess.Popen, dialin_port: int, log: Path, steps: list[int]) -> None:
    baseline = rss_kib(proxy.pid)
    attached = Attached(log)
    connected = 0
    single_latency = None
    async with trio.open_nursery() as nursery:
        for target in steps:
            ready, counter = trio.Event(), [0]
            started = time.perf_counter()
            for number in range(connected, target):
                nursery.start_soon(device, dialin_port, number, ready, counter, target - connected)
            await ready.wait()
            while attached.update() < target:  # noqa: ASYNC110 - another process writes it
                await trio.sleep(0.02)
            elapsed = time.perf_counter() - started
            added = target - connected
            connected = target
            if single_latency is None:
                single_latency = await round_trips(direct_port(log, "DEV00000"))
            await trio.sleep(1.0)  # let allocations settle before reading RSS
            per_device = (rss_kib(proxy.pid) - baseline) * 1024 / connected
            latency = await round_trips(direct_port(log, "DEV00000"))
            print(
                f"{connected:6} devices: {added} registered in {elapsed:6.2f} s ({added / elapsed:7.0f}/s), "
                f"RSS {per_device / 1024:5.1f} KiB/device, exchange p50 {latency:6.0f} us "
                f"({latency / single_latency:4.2f}x of one device: {single_latency:.0f} us)",
                flush=True,
            )
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, help="the last step (default: as many as the limits allow)")
    args = parser.parse_args()
    hard = raise_open_files()
    most = min((hard - HEADROOM) // 2, DIRECT_PORTS[1] - DIRECT_PORTS[0] + 1, hard - HEADROOM)
    last = min(args.max or most, most)
    steps = [step for step in (1000, 3000) if step < last] + [last]
    dialin_port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        database = Path(directory) / "registry.sqlite3"
        settings = Path(directory) / "settings.toml"
        settings.write_text(
            f'[proxy]\nlog_level = "INFO"\nstatus = ""\n\n[dialin]\nlisten = ["127.0.0.1:{dialin_port}"]\n'
            f'registry = "{database}"\ndirect_ports = "{DIRECT_PORTS[0]}-{DIRECT_PORTS[1]}"\nping_after = 0\n'
            f"max_devices = {last + 10}\n"
        )
        log_path = Path(directory) / "proxy.log"
        log = log_path.open("w")
        proxy = subprocess.Popen(
            [*PROFILER, sys.executable, "-m", "proxy", "run", "-c", str(settings)],
            preexec_fn=raise_open_files,
            stderr=log,
        )
        try:
            wait_for_port(dialin_port, proxy)
            time.sleep(0.5)  # the probe's connection, which never identified, is gone
            print(f"open-file limit {hard}: steps {steps}", flush=True)
            trio.run(run, proxy, dialin_port, log_path, steps)
        finally:
            proxy.terminate()
            proxy.wait(30)
    print("targets: >= 9000 devices, < 20 KiB RSS per idle device, 1000 registrations < 2 s, exchange < 2x")


if __name__ == "__main__":
    main()
