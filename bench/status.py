"""The status server at scale: server time and size of the device list page and of /metrics for 5,000
devices.

It builds 5,000 dial-in devices in this process (real Device objects with fake states, counters, errors,
peers and events: nothing connects), asks the status server's router for each page the way a request
does, and prints the median server time of each page over several runs, and its size, beside the targets:

    GET / (the first page of 5,000 devices)              < 100 ms, < 200 KB
    GET /metrics (5,000 dial-in devices)                 < 200 ms, < 1 MB

The list page is also timed searched, filtered, sorted by a counter and at its last page. /metrics is
timed for three fleets: as one has them (83% online, with traffic, 2% with a refusal), every device
online with traffic, and every counter of every device moved (exchanges, discarded bytes, a client
each: the worst case, since a dial-in device leaves out only its zeros); each plain and gzipped, as
Prometheus asks for it.

    .venv/bin/python bench/status.py [--devices N] [--runs N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import UTC, datetime

import trio

from proxy.config import DialinConfig, parse
from proxy.counters import ExchangeResult
from proxy.device import Device, State
from proxy.events import Kind
from proxy.status.server import StatusServer

PAGES = [
    ("GET / (first page)", "/"),
    ("GET /?q=METER-12", "/?q=METER-12"),
    ("GET /?state=offline&sort=last_error", "/?state=offline&sort=last_error"),
    ("GET /?sort=bytes_from_device&desc=1", "/?sort=bytes_from_device&desc=1"),
    ("GET /?page=50 (last page)", "/?page=50"),
]
PAGE_MS, PAGE_KB = 100, 200
METRICS_MS, METRICS_KB = 200, 1024
# How the fake devices are spread over the states (weights).
STATES = {State.IDLE: 70, State.BUSY: 10, State.SETTLING: 1, State.OFFLINE: 17, State.CONNECTING: 2}
ERRORS = ("disconnected (end of file)", "disconnected (read failed: Connection reset by peer)", "silent for 3600 s")


FLEETS = ("as a fleet has them", "all online with traffic", "every counter moved")


def fake_devices(count: int, fleet: str, seed: int = 1) -> dict[str, tuple[Device, list]]:
    """`count` dial-in devices as app.Running lists them, in states and with counters as `fleet` says."""
    rng = random.Random(seed)
    dialin: DialinConfig = parse({"dialin": {"direct_ports": "20000-29999"}}).dialin
    devices = {}
    now = datetime.now(UTC)
    for number in range(count):
        device_id = f"METER-{number:05d}"
        name = f"Meter {number}" if number % 3 == 0 else device_id
        config = dialin.device_config(device_id, name, 20000 + number)
        device = Device(config, dialin)
        device.state = rng.choices(list(STATES), weights=list(STATES.values()))[0]
        if fleet != FLEETS[0]:
            device.state = State.IDLE
        moved = fleet == FLEETS[2]
        device.peer = f"10.{number // 65536 % 256}.{number // 256 % 256}.{number % 256}:{rng.randint(1024, 65535)}"
        counters = device.counters
        if moved or device.state != State.OFFLINE:
            counters.bytes_to_device = rng.randint(1, 10**6)
            counters.bytes_from_device = rng.randint(1, 10**7)
            counters.last_connect = now
            device.events.record(Kind.LINK_OPEN, f"from {device.peer}")
        if moved:
            counters.exchanges[ExchangeResult.OK] = rng.randint(1, 1000)
            counters.discarded_bytes = rng.randint(1, 100)
            device.clients = 1
        if device.state == State.OFFLINE:
            device.last_error = (time.time() - rng.randint(0, 86400), rng.choice(ERRORS))
        if number % 50 == 0:
            device.count_refusal("busy")
        devices[name] = (device, list(config.listen))
    return devices


def measure(server: StatusServer, target: str, runs: int, headers: dict[str, str] | None = None) -> tuple[float, int]:
    """Median milliseconds of server time, and the body's size in bytes."""
    times, size = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        response = server.route("GET", target, headers or {}, b"")
        times.append((time.perf_counter() - started) * 1000)
        assert response.status == 200, response.body[:200]
        size = len(response.body)
    return statistics.median(times), size


def report(label: str, ms: float, size: int, ms_limit: float, kb_limit: float) -> None:
    kb = size / 1024
    met = "met" if ms < ms_limit and kb < kb_limit else "NOT MET"
    print(f"{label:<44} {ms:7.1f} ms {kb:8.1f} KB   (target < {ms_limit} ms, < {kb_limit} KB: {met})")


async def main(count: int, runs: int) -> None:
    for fleet in FLEETS:
        devices = fake_devices(count, fleet)
        server = StatusServer(lambda devices=devices: devices, "")
        print(f"{count:,} dial-in devices, {fleet}:")
        if fleet == FLEETS[0]:
            for label, target in PAGES:
                report(label, *measure(server, target, runs), PAGE_MS, PAGE_KB)
        report("GET /metrics", *measure(server, "/metrics", runs), METRICS_MS, METRICS_KB)
        gzipped = measure(server, "/metrics", runs, {"accept-encoding": "gzip"})
        report("GET /metrics, Accept-Encoding: gzip", *gzipped, METRICS_MS, METRICS_KB)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=9)
    arguments = parser.parse_args()
    trio.run(main, arguments.devices, arguments.runs)
