"""Round-trip latency and bulk throughput: direct, through socat, and through devproxy.

A TCP echo device runs in its own process; socat and devproxy each forward a port to it. The client
here measures 10,000 sequential round trips of 32 bytes and the time to echo 100 MB, on each path, and
prints p50/p99 latency, MB/s, and devproxy's ratios to socat.

    make bench            or            .venv/bin/python bench/latency.py [--round-trips N] [--megabytes N]

socat is installed with apt-get when it is missing (Debian; needs root).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = 32
CHUNK = 65536


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, limit: float = 20.0) -> None:
    """Polls until `port` accepts: a benchmark may wait on the clock, tests may not."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {limit} s")


@contextlib.contextmanager
def background(*command: str, port: int) -> Iterator[None]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield
    finally:
        process.terminate()
        process.wait(10)


def run_echo(port: int) -> None:
    """The echo device: a trio server, as the baselines in STACK-NOTES.md were measured."""
    import trio

    async def echo(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(CHUNK):
                await stream.send_all(data)

    trio.run(trio.serve_tcp, echo, port)


def ensure_socat() -> str:
    found = shutil.which("socat")
    if found:
        return found
    print("socat is missing: installing it with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "socat"], check=True)
    return shutil.which("socat") or sys.exit("socat could not be installed")


def measure_latency(port: int, round_trips: int) -> tuple[float, float]:
    """p50 and p99 of `round_trips` sequential 32-byte round trips, in microseconds."""
    message = os.urandom(MESSAGE)
    samples = []
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        for _ in range(round_trips):
            started = time.perf_counter_ns()
            client.sendall(message)
            received = 0
            while received < MESSAGE:
                received += len(client.recv(MESSAGE - received))
            samples.append((time.perf_counter_ns() - started) / 1000)
    quantiles = statistics.quantiles(samples, n=100)
    return quantiles[49], quantiles[98]


def measure_throughput(port: int, megabytes: int) -> float:
    """MB/s of echoing `megabytes` MB: one thread sends while this one receives it all back."""
    total = megabytes * 1_000_000
    block = os.urandom(CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as client:

        def send() -> None:
            sent = 0
            while sent < total:
                piece = block[: min(CHUNK, total - sent)]
                client.sendall(piece)
                sent += len(piece)

        started = time.perf_counter()
        sender = threading.Thread(target=send)
        sender.start()
        received = 0
        while received < total:
            data = client.recv(CHUNK * 4)
            if not data:
                raise SystemExit(f"connection closed after {received} of {total} bytes")
            received += len(data)
        sender.join()
        return megabytes / (time.perf_counter() - started)


def proxy_settings(directory: Path, listen: int, device: int) -> Path:
    settings = directory / "settings.toml"
    settings.write_text(
        f'[proxy]\nlog_level = "WARNING"\nstatus = ""\n\n'
        f'[[device]]\nname = "echo"\ntype = "tcp"\npath = "127.0.0.1:{device}"\n'
        f'listen = ["127.0.0.1:{listen}"]\n'
    )
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=10_000)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        run_echo(args.echo)
        return
    socat = ensure_socat()
    echo_port, socat_port, proxy_port = free_port(), free_port(), free_port()
    results = {}
    with (
        tempfile.TemporaryDirectory() as directory,
        background(sys.executable, __file__, "--echo", str(echo_port), port=echo_port),
    ):
        paths = {
            "direct": contextlib.nullcontext(echo_port),
            "socat": background(
                socat,
                f"TCP-LISTEN:{socat_port},fork,reuseaddr,bind=127.0.0.1",
                f"TCP:127.0.0.1:{echo_port}",
                port=socat_port,
            ),
            "devproxy": background(
                sys.executable,
                "-m",
                "proxy",
                "run",
                "-c",
                str(proxy_settings(Path(directory), proxy_port, echo_port)),
                port=proxy_port,
            ),
        }
        ports = {"direct": echo_port, "socat": socat_port, "devproxy": proxy_port}
        for name, context in paths.items():
            with context:
                # The readiness probe itself held the device for a moment: let its lease end first.
                time.sleep(0.2)
                p50, p99 = measure_latency(ports[name], args.round_trips)
                rate = measure_throughput(ports[name], args.megabytes)
                results[name] = (p50, p99, rate)
                print(f"{name:9} p50 {p50:7.1f} us   p99 {p99:7.1f} us   {rate:7.1f} MB/s", flush=True)
    socat_p50, _, socat_rate = results["socat"]
    proxy_p50, _, proxy_rate = results["devproxy"]
    print(
        f"devproxy/socat: p50 latency {proxy_p50 / socat_p50:.2f}x (target <= 1.5x), "
        f"throughput {proxy_rate / socat_rate:.2f}x (target >= 0.5x)"
    )


if __name__ == "__main__":
    main()
