"""Round trips, throughput and CPU cost through devproxy, socat and ser2net, measured side by side.

Two echo devices, each reached by several paths that stay up together for the whole run:
- tcp: an echo server (trio) in its own process. Paths: direct; socat (`TCP-LISTEN:...,fork,nodelay` to
  `TCP:...,nodelay`); devproxy (session sharing, raw protocol, a TCP device).
- pty: a helper process that echoes on the master side of `os.openpty()` pairs, one pair per path (a serial
  port has one opener). Paths: direct (this process opens the slave); socat (the same `TCP-LISTEN` to
  `FILE:/dev/pts/N,raw,echo=0`); devproxy (`type = "serial"` on the slave); ser2net with `chardelay: false`
  (its default waits a few character times before passing a read on: 47-71x socat's latency here),
  skipped when it is not installed.

Every path keeps one connection open. A round gives each path --blocks blocks of --round-trips sequential
32-byte round trips, the paths taking turns block by block with the order rotating, then --blocks blocks of
echoing --megabytes MB the same way: a busy moment of the machine hits every path alike. Each round prints
p50/p99 round trip, MB/s, and for each forwarder the CPU time its process spent per round trip and per MB
echoed (socat's forked child included), read from the kernel's CPU clock of the process: that depends far
less on what else runs than wall time does. Last come the medians over the rounds, with devproxy/socat
beside the targets: p50 at most 1.3x socat's, throughput at least socat's.

    make bench    or    .venv/bin/python bench/latency.py [--rounds N] [--blocks N] [--round-trips N]
                        [--megabytes N] [--quick] [--summary-json FILE]

socat is installed with apt-get when it is missing (Debian; needs root); ser2net is not.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
MESSAGE = 32
CHUNK = 65536
P50_TARGET = 1.3  # devproxy's p50 round trip at most this many times socat's
THROUGHPUT_TARGET = 1.0  # devproxy's MB/s at least this many times socat's
STALL_LIMIT = 60  # seconds: a block takes well under 1 s here, so a longer one is stuck

PR_SET_PDEATHSIG = 1  # prctl(2)

_libc = ctypes.CDLL(None, use_errno=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepts(port: int) -> bool:
    """Whether a connection to `port` on 127.0.0.1 succeeds (it is closed at once)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def listening(port: int) -> bool:
    """Whether a TCP socket listens on `port`, seen in /proc/net without connecting to it.

    A probe connection has side effects a benchmark must not inherit: socat forks a child for it that
    keeps a pty open for another 0.5 s (reading echoes meant for the next connection), and devproxy
    gives it the device, which then settles.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            _, local, _, state = line.split()[:4]
            if local.endswith(f":{port:04X}") and state == "0A":  # 0A: TCP_LISTEN
                return True
    return False


def wait_for_port(
    port: int, process: subprocess.Popen, limit: float = 20.0, ready: Callable[[int], bool] = accepts
) -> None:
    """Polls until `port` is `ready`: a benchmark may wait on the clock, tests may not."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode} before listening")
        if ready(port):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {limit} s")


def die_with_parent() -> None:
    """In a child before it runs its program: SIGTERM when this process dies, killed or crashed."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def background(*command: str, port: int) -> Iterator[subprocess.Popen]:
    """Runs `command` until the block ends, once it listens on `port` (no probe connects to it)."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
    )
    try:
        wait_for_port(port, process, ready=listening)
        yield process
    finally:
        process.terminate()
        process.wait(10)


class ProcessCpu:
    """CPU time (user and system, every thread) of a process and of the children it forked.

    Read from the process's CPU clock (clock_getcpuclockid), which counts nanoseconds: utime and stime
    in /proc/PID/stat hold the same time in 10 ms ticks, about what one block costs. Children are found
    through /proc (socat forks one per connection); one that exited between two readings takes its time
    with it, so read around blocks on connections that stay open.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def seconds(self) -> float:
        total = 0.0
        for pid in (self.pid, *self._children()):
            clock = ctypes.c_int()
            if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
                with contextlib.suppress(OSError):  # it exited meanwhile
                    total += time.clock_gettime(clock.value)
        return total

    def _children(self) -> list[int]:
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    # The name in parentheses may hold spaces: the parent's pid is the 2nd field after it.
                    fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
                    if int(fields[1]) == self.pid:
                        found.append(int(entry.name))
        return found


class Summary:
    """The figures of one bench for `--summary-json FILE`: one JSON object a line, appended to FILE.

    bench/summary.py runs every bench with the same FILE and prints the lines as one table. Without a
    FILE, add() does nothing.
    """

    def __init__(self, bench: str, path: Path | None) -> None:
        self.bench = bench
        self.path = path

    def add(self, figure: str, value: float, unit: str, target: str = "", met: bool | None = None) -> None:
        if self.path is None:
            return
        line = {"bench": self.bench, "figure": figure, "value": round(value, 3), "unit": unit}
        line |= {"target": target, "met": met}
        with self.path.open("a") as file:
            file.write(json.dumps(line, ensure_ascii=False) + "\n")


def add_summary_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary-json", type=Path, metavar="FILE", help="append each figure to FILE as a JSON line")


def rotated(items: Sequence, turn: int) -> list:
    """`items` starting at `turn` (modulo its length): each takes every place in the order in turn."""
    start = turn % len(items)
    return [*items[start:], *items[:start]]


def quantile(samples: list[float], percent: int) -> float:
    return statistics.quantiles(samples, n=100)[percent - 1]


def spread(values: list[float], unit: str = "", digits: int = 2) -> str:
    """The median of `values` and their range, as '1.45x (1.40-1.61)'."""
    low, middle, high = min(values), statistics.median(values), max(values)
    return f"{middle:.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"


def run_echo(port: int) -> None:
    """The TCP echo device: a trio server, as the baselines in STACK-NOTES.md were measured."""
    import trio

    async def echo(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(CHUNK):
                await stream.send_all(data)

    trio.run(trio.serve_tcp, echo, port)


def run_pty_echo(count: int) -> None:
    """The pty echo device: makes `count` pty pairs, prints each slave's path, echoes on the masters.

    The slaves stay open here too, so a master never reads a hang-up while a forwarder reopens its
    slave (socat and ser2net open it per connection). Reads never wait for writes: socat writes to its
    tty blocking, so an echo that stopped reading while its own write waited would deadlock with it
    under bulk load (the socat pty trap in STACK-NOTES.md).
    """
    pending: dict[int, bytearray] = {}
    with selectors.DefaultSelector() as selector:
        for _ in range(count):
            master, slave = os.openpty()  # neither is ever closed: the process ends with them
            tty.setraw(slave)
            os.set_blocking(master, False)
            pending[master] = bytearray()
            selector.register(master, selectors.EVENT_READ)
            print(os.ttyname(slave), flush=True)
        while True:
            for key, events in selector.select():
                out = pending[key.fd]
                if events & selectors.EVENT_READ:
                    out += os.read(key.fd, CHUNK)
                with contextlib.suppress(BlockingIOError):
                    del out[: os.write(key.fd, out)]
                selector.modify(key.fd, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def ensure_socat() -> str:
    found = shutil.which("socat")
    if found:
        return found
    print("socat is missing: installing it with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "socat"], check=True)
    return shutil.which("socat") or sys.exit("socat could not be installed")


class PtyEnd:
    """The slave side of a pty, opened here: the direct path to the pty echo device, used as a socket."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)

    def sendall(self, data: bytes) -> None:
        write_all(self.fd, data)

    def recv(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def close(self) -> None:
        os.close(self.fd)


def connect(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return client


def round_trips(connection: socket.socket | PtyEnd, count: int) -> list[float]:
    """`count` sequential round trips of 32 bytes, each in microseconds."""
    message = os.urandom(MESSAGE)
    samples = []
    for _ in range(count):
        started = time.perf_counter_ns()
        connection.sendall(message)
        received = 0
        while received < MESSAGE:
            received += len(connection.recv(MESSAGE - received))
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def echo_bulk(connection: socket.socket | PtyEnd, total: int) -> float:
    """Seconds to echo `total` bytes: one thread sends while this one receives it all back."""
    block = os.urandom(CHUNK)

    def send() -> None:
        sent = 0
        while sent < total:
            piece = block[: min(CHUNK, total - sent)]
            connection.sendall(piece)
            sent += len(piece)

    started = time.perf_counter()
    sender = threading.Thread(target=send, daemon=True)  # a stuck path must not keep the bench alive
    sender.start()
    received = 0
    while received < total:
        data = connection.recv(CHUNK * 4)
        if not data:
            raise SystemExit(f"connection closed after {received} of {total} bytes")
        received += len(data)
    sender.join()
    return time.perf_counter() - started


@dataclass
class Route:
    """One path to an echo device, its open connection, and what one round measured on it."""

    device: str
    name: str
    connection: socket.socket | PtyEnd
    cpu: ProcessCpu | None = None  # the forwarder's process; None for the direct path
    samples: list[float] = field(default_factory=list)
    trips_cpu: float = 0.0
    bulk_seconds: float = 0.0
    bulk_bytes: int = 0
    bulk_cpu: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.device} {self.name}"

    def start_round(self) -> None:
        self.samples = []
        self.trips_cpu = self.bulk_seconds = self.bulk_cpu = 0.0
        self.bulk_bytes = 0

    def timed(self, work: Callable[[], T]) -> tuple[T, float]:
        """What `work` returns, and the CPU seconds the forwarder spent meanwhile.

        Error handling: SystemExit when `work` takes longer than STALL_LIMIT (a stuck path, not a slow one).
        """

        def stalled(signum: int, frame: object) -> None:
            raise SystemExit(f"{self.label}: a block took more than {STALL_LIMIT} s; the path is stuck")

        signal.signal(signal.SIGALRM, stalled)
        before = self.cpu.seconds() if self.cpu else 0.0
        signal.alarm(STALL_LIMIT)
        try:
            result = work()
        finally:
            signal.alarm(0)
        return result, (self.cpu.seconds() - before if self.cpu else 0.0)

    def figures(self) -> dict[str, float]:
        figures = {
            "p50": quantile(self.samples, 50),
            "p99": quantile(self.samples, 99),
            "MB/s": self.bulk_bytes / 1e6 / self.bulk_seconds,
        }
        if self.cpu:
            figures["cpu_trip"] = self.trips_cpu / len(self.samples) * 1e6
            figures["cpu_mb"] = self.bulk_cpu / (self.bulk_bytes / 1e6) * 1e6
        return figures


def measure_round(routes: list[Route], blocks: int, trips: int, megabytes: float) -> dict[str, dict[str, float]]:
    """One round of rotating blocks over every route: its figures by route label."""
    for route in routes:
        route.start_round()
    for block in range(blocks):
        for route in rotated(routes, block):
            samples, cpu = route.timed(lambda route=route: round_trips(route.connection, trips))
            route.samples += samples
            route.trips_cpu += cpu
    total = int(megabytes * 1e6)
    for block in range(blocks):
        for route in rotated(routes, block):
            seconds, cpu = route.timed(lambda route=route: echo_bulk(route.connection, total))
            route.bulk_seconds += seconds
            route.bulk_bytes += total
            route.bulk_cpu += cpu
    return {route.label: route.figures() for route in routes}


def print_round(number: int, figures: dict[str, dict[str, float]]) -> None:
    print(f"round {number}:")
    for label, values in figures.items():
        line = f"  {label:14} p50 {values['p50']:7.1f} µs  p99 {values['p99']:7.1f} µs  {values['MB/s']:7.1f} MB/s"
        if "cpu_trip" in values:
            line += f"   CPU {values['cpu_trip']:6.1f} µs/round trip {values['cpu_mb']:7.0f} µs/MB"
        print(line, flush=True)


def report(rounds: list[dict[str, dict[str, float]]], summary: Summary) -> None:
    """Medians over the rounds, devproxy/socat ratios beside their targets, and the summary lines."""
    print(f"medians over {len(rounds)} rounds (range):")
    units = {"p50": "µs", "p99": "µs", "MB/s": "MB/s", "cpu_trip": "µs", "cpu_mb": "µs"}
    names = {
        "p50": "p50 round trip",
        "p99": "p99 round trip",
        "MB/s": "throughput",
        "cpu_trip": "CPU per round trip",
        "cpu_mb": "CPU per MB",
    }
    for label in rounds[0]:
        for key in rounds[0][label]:
            values = [figures[label][key] for figures in rounds]
            print(f"  {label:14} {names[key]:19} {spread(values, ' ' + units[key])}")
            summary.add(f"{label} {names[key]}", statistics.median(values), units[key])
    for device in dict.fromkeys(label.split()[0] for label in rounds[0]):
        proxy, socat = f"{device} devproxy", f"{device} socat"
        latency = [figures[proxy]["p50"] / figures[socat]["p50"] for figures in rounds]
        rate = [figures[proxy]["MB/s"] / figures[socat]["MB/s"] for figures in rounds]
        cpu = [figures[proxy]["cpu_trip"] / figures[socat]["cpu_trip"] for figures in rounds]
        latency_met = statistics.median(latency) <= P50_TARGET
        rate_met = statistics.median(rate) >= THROUGHPUT_TARGET
        print(
            f"{device}: devproxy/socat p50 {spread(latency, 'x')} (target <= {P50_TARGET}x: "
            f"{'met' if latency_met else 'not met'}), throughput {spread(rate, 'x')} (target >= "
            f"{THROUGHPUT_TARGET:g}x: {'met' if rate_met else 'not met'}), CPU per round trip {spread(cpu, 'x')}"
        )
        summary.add(
            f"{device} devproxy/socat p50", statistics.median(latency), "x", f"<= {P50_TARGET}x socat", latency_met
        )
        summary.add(
            f"{device} devproxy/socat throughput",
            statistics.median(rate),
            "x",
            f">= {THROUGHPUT_TARGET:g}x socat",
            rate_met,
        )
        summary.add(f"{device} devproxy/socat CPU per round trip", statistics.median(cpu), "x")
    if "pty ser2net" in rounds[0]:
        latency = [figures["pty ser2net"]["p50"] / figures["pty socat"]["p50"] for figures in rounds]
        rate = [figures["pty ser2net"]["MB/s"] / figures["pty socat"]["MB/s"] for figures in rounds]
        print(f"pty: ser2net (chardelay: false)/socat p50 {spread(latency, 'x')}, throughput {spread(rate, 'x')}")
        summary.add("pty ser2net/socat p50", statistics.median(latency), "x")
        summary.add("pty ser2net/socat throughput", statistics.median(rate), "x")


def proxy_settings(directory: Path, tcp: tuple[int, int], pty: tuple[int, str]) -> Path:
    """devproxy's settings: (listen port, echo port) for the TCP device, (listen port, slave) for the pty."""
    settings = directory / "settings.toml"
    settings.write_text(
        f'[proxy]\nlog_level = "WARNING"\nstatus = ""\n\n'
        f'[[device]]\nname = "tcp-echo"\ntype = "tcp"\npath = "127.0.0.1:{tcp[1]}"\n'
        f'listen = ["127.0.0.1:{tcp[0]}"]\n\n'
        f'[[device]]\nname = "pty-echo"\ntype = "serial"\npath = "{pty[1]}"\nlisten = ["127.0.0.1:{pty[0]}"]\n'
    )
    return settings


def ser2net_settings(directory: Path, port: int, slave: str) -> Path:
    settings = directory / "ser2net.yaml"
    settings.write_text(
        "%YAML 1.1\n---\nconnection: &pty\n"
        f"  accepter: tcp,127.0.0.1,{port}\n"
        f"  connector: serialdev,{slave},115200n81,local\n"
        "  options:\n    chardelay: false\n"
    )
    return settings


def open_routes(stack: contextlib.ExitStack, directory: Path) -> list[Route]:
    """Starts the devices and forwarders (each stopped by `stack`) and connects every route."""
    socat = ensure_socat()
    ser2net = shutil.which("ser2net")
    if ser2net is None:
        print("ser2net is not installed: its pty path is skipped (apt-get install ser2net)", flush=True)
    echo_port = free_port()
    stack.enter_context(background(sys.executable, __file__, "--echo", str(echo_port), port=echo_port))
    # One pty each for socat, devproxy, the direct path and ser2net: a serial port has one opener.
    count = 4 if ser2net else 3
    helper = stack.enter_context(
        subprocess.Popen(
            [sys.executable, __file__, "--pty-echo", str(count)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )
    )
    stack.callback(helper.terminate)
    slaves = [helper.stdout.readline().strip() for _ in range(count)]
    ports = {name: free_port() for name in ("tcp socat", "pty socat", "tcp devproxy", "pty devproxy", "ser2net")}
    # nodelay: else Nagle's algorithm holds the last segment of each bulk block for the peer's delayed ACK
    # (40 ms), which cut socat's MB/s by 2-4x in 2-4 MB blocks; devproxy sets TCP_NODELAY itself.
    listen = "TCP-LISTEN:{},fork,reuseaddr,nodelay,bind=127.0.0.1"
    tcp_socat = stack.enter_context(
        background(
            socat, listen.format(ports["tcp socat"]), f"TCP:127.0.0.1:{echo_port},nodelay", port=ports["tcp socat"]
        )
    )
    pty_socat = stack.enter_context(
        background(socat, listen.format(ports["pty socat"]), f"FILE:{slaves[0]},raw,echo=0", port=ports["pty socat"])
    )
    settings = proxy_settings(directory, (ports["tcp devproxy"], echo_port), (ports["pty devproxy"], slaves[1]))
    proxy = stack.enter_context(
        background(sys.executable, "-m", "proxy", "run", "-c", str(settings), port=ports["tcp devproxy"])
    )
    wait_for_port(ports["pty devproxy"], proxy, ready=listening)
    proxy_cpu = ProcessCpu(proxy.pid)
    routes = [
        Route("tcp", "direct", connect(echo_port)),
        Route("tcp", "socat", connect(ports["tcp socat"]), ProcessCpu(tcp_socat.pid)),
        Route("tcp", "devproxy", connect(ports["tcp devproxy"]), proxy_cpu),
        Route("pty", "direct", PtyEnd(slaves[2])),
        Route("pty", "socat", connect(ports["pty socat"]), ProcessCpu(pty_socat.pid)),
        Route("pty", "devproxy", connect(ports["pty devproxy"]), proxy_cpu),
    ]
    if ser2net:
        config = ser2net_settings(directory, ports["ser2net"], slaves[3])
        command = (ser2net, "-n", "-u", "-P", str(directory / "ser2net.pid"), "-c", str(config))
        daemon = stack.enter_context(background(*command, port=ports["ser2net"]))
        routes.append(Route("pty", "ser2net", connect(ports["ser2net"]), ProcessCpu(daemon.pid)))
    for route in routes:
        stack.callback(route.connection.close)
    return routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each over every path (default 5)")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per path in a round (default 10)")
    parser.add_argument("--round-trips", type=int, default=300, help="round trips per block (default 300)")
    parser.add_argument("--megabytes", type=float, default=4.0, help="MB echoed per block (default 4)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5 blocks of 200 round trips and 2 MB")
    add_summary_argument(parser)
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pty-echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        run_echo(args.echo)
        return
    if args.pty_echo:
        run_pty_echo(args.pty_echo)
        return
    if args.quick:
        args.rounds, args.blocks, args.round_trips, args.megabytes = 3, 5, 200, 2.0
    summary = Summary("latency", args.summary_json)
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        routes = open_routes(stack, Path(directory))
        # Warm-up, not counted: connections, caches and devproxy's first lease of each device.
        measure_round(routes, 1, 50, 0.5)
        print(
            f"{args.rounds} rounds; per round and path, {args.blocks} blocks of {args.round_trips} round trips of "
            f"{MESSAGE} bytes, then {args.blocks} blocks of {args.megabytes:g} MB echoed",
            flush=True,
        )
        rounds = []
        for number in range(1, args.rounds + 1):
            rounds.append(measure_round(routes, args.blocks, args.round_trips, args.megabytes))
            print_round(number, rounds[-1])
    report(rounds, summary)


if __name__ == "__main__":
    main()
