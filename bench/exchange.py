"""Exchange sharing under load: 1, 10 and 100 clients of one simulated Custom register, side by side.

The register (`devproxy simulate custom --listen`: one simulated device per connection) and devproxy
(the register as a TCP device in exchange sharing) run in their own processes; this one plays the
clients. Every path stays connected for the whole run: one client straight to the register (direct),
and 1, 10 and 100 clients of devproxy. A round gives each path --blocks blocks of --exchanges beep
requests, the paths taking turns block by block with the order rotating; in a block each client of
the path sends its next request as soon as its answer came, until the block's count is reached. So a
busy moment of the machine hits every path alike.

Each round prints exchanges/s, p50/p99 exchange time, the rate as % of the direct one, and the CPU time
devproxy's process spent per exchange (read from its CPU clock, which depends far less on what else
runs than the rates do); last come the medians over the rounds beside the targets, for 100 clients:
devproxy's CPU at most 80 µs per exchange, the rate at least 65% of direct against a register that
answers at once (a stress of the proxy alone: a direct exchange takes about 0.3 ms here, this
client's own work included) and at least 90% against one that waits 1 ms before each answer (still
far quicker than a real register's 50 ms to 3 s). Figures for 1 and 10 clients have no target.

    make bench    or    .venv/bin/python bench/exchange.py [--rounds N] [--blocks N] [--exchanges N]
                        [--quick] [--summary-json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import (
    STALL_LIMIT,
    ProcessCpu,
    Summary,
    add_summary_argument,
    background,
    free_port,
    quantile,
    rotated,
    spread,
)

BEEP = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")
ANSWER = bytes.fromhex("06 01 04 00 13 00 00 63 7A")
CLIENTS = (1, 10, 100)
CPU_TARGET = 80.0  # µs of devproxy's CPU per exchange, with 100 clients
RATE_TARGETS = {0.0: 65.0, 0.001: 90.0}  # % of the direct rate with 100 clients, by register delay


@dataclass
class Clients:
    """The clients of one path, connected for the whole run, and what one round measured on them."""

    name: str
    streams: list[trio.SocketStream]
    cpu: ProcessCpu | None = None  # devproxy's process; None for the direct path
    samples: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def start_round(self) -> None:
        self.samples = []
        self.seconds = self.cpu_seconds = 0.0

    async def block(self, exchanges: int) -> None:
        """`exchanges` exchanges spread over this path's clients, each sending when its answer came."""
        remaining = exchanges

        async def client(stream: trio.SocketStream) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                await stream.send_all(BEEP)
                answer = b""
                while len(answer) < len(ANSWER):
                    answer += await stream.receive_some()
                if answer != ANSWER:
                    raise SystemExit(f"{self.name}: wrong answer {answer.hex(' ')}")
                self.samples.append(time.perf_counter() - started)

        cpu = self.cpu.seconds() if self.cpu else 0.0
        started = time.perf_counter()
        with trio.fail_after(STALL_LIMIT):  # a stuck path fails the bench instead of hanging it
            async with trio.open_nursery() as nursery:
                for stream in self.streams:
                    nursery.start_soon(client, stream)
        self.seconds += time.perf_counter() - started
        self.cpu_seconds += self.cpu.seconds() - cpu if self.cpu else 0.0

    def figures(self) -> dict[str, float]:
        figures = {
            "rate": len(self.samples) / self.seconds,
            "p50": quantile(self.samples, 50) * 1000,
            "p99": quantile(self.samples, 99) * 1000,
        }
        if self.cpu:
            figures["cpu"] = self.cpu_seconds / len(self.samples) * 1e6
        return figures


async def measure(
    register: int, proxy: int, cpu: ProcessCpu, rounds: int, blocks: int, exchanges: int
) -> list[dict[str, dict[str, float]]]:
    """Connects every path, then runs `rounds` rounds of rotating blocks: each round's figures by path."""
    paths = [Clients("direct", [await trio.open_tcp_stream("127.0.0.1", register)])]
    for clients in CLIENTS:
        streams = [await trio.open_tcp_stream("127.0.0.1", proxy) for _ in range(clients)]
        paths.append(Clients(f"devproxy, {clients} client{'s' if clients > 1 else ''}", streams, cpu))
    try:
        for path in paths:  # warm-up, not counted: every client's first exchanges
            await path.block(2 * len(path.streams))
        results = []
        for number in range(1, rounds + 1):
            for path in paths:
                path.start_round()
            for turn in range(blocks):
                for path in rotated(paths, turn):
                    await path.block(exchanges)
            results.append({path.name: path.figures() for path in paths})
            print_round(number, results[-1])
        return results
    finally:
        for path in paths:
            for stream in path.streams:
                await stream.aclose()


def print_round(number: int, figures: dict[str, dict[str, float]]) -> None:
    direct = figures["direct"]["rate"]
    print(f"  round {number}:")
    for name, values in figures.items():
        line = (
            f"    {name:21} {values['rate']:7.0f} exchanges/s  {values['rate'] / direct:5.0%} of direct   "
            f"p50 {values['p50']:6.2f} ms  p99 {values['p99']:6.2f} ms"
        )
        if "cpu" in values:
            line += f"   CPU {values['cpu']:6.1f} µs/exchange"
        print(line, flush=True)


def report(delay: float, rounds: list[dict[str, dict[str, float]]], summary: Summary) -> None:
    """Medians over the rounds beside the targets, and the summary lines."""
    register = f"register {'at once' if delay == 0 else f'{delay * 1000:g} ms'}"
    print(f"  medians over {len(rounds)} rounds (range):")
    direct = [figures["direct"]["rate"] for figures in rounds]
    print(f"    direct                {spread(direct, ' exchanges/s', 0)}")
    summary.add(f"{register}, direct rate", statistics.median(direct), "exchanges/s")
    for name in list(rounds[0])[1:]:
        share = [figures[name]["rate"] / figures["direct"]["rate"] * 100 for figures in rounds]
        cpu = [figures[name]["cpu"] for figures in rounds]
        p50 = [figures[name]["p50"] for figures in rounds]
        p99 = [figures[name]["p99"] for figures in rounds]
        if name.endswith(f" {CLIENTS[-1]} clients"):
            share_target, cpu_target = f">= {RATE_TARGETS[delay]:g}% of direct", f"<= {CPU_TARGET:g} µs"
            share_met = statistics.median(share) >= RATE_TARGETS[delay]
            cpu_met = statistics.median(cpu) <= CPU_TARGET
            verdict = (
                f"   targets: {share_target}: {'met' if share_met else 'not met'}, "
                f"CPU {cpu_target}: {'met' if cpu_met else 'not met'}"
            )
        else:
            share_target = cpu_target = verdict = ""
            share_met = cpu_met = None
        print(
            f"    {name:21} {spread(share, '%', 0)} of direct   CPU {spread(cpu, ' µs', 0)} per exchange   "
            f"p50 {statistics.median(p50):.2f} ms  p99 {statistics.median(p99):.2f} ms{verdict}"
        )
        summary.add(f"{register}, {name}: rate", statistics.median(share), "%", share_target, share_met)
        summary.add(f"{register}, {name}: CPU per exchange", statistics.median(cpu), "µs", cpu_target, cpu_met)
        summary.add(f"{register}, {name}: p50", statistics.median(p50), "ms")
        summary.add(f"{register}, {name}: p99", statistics.median(p99), "ms")


def run_with(delay: float, args: argparse.Namespace, summary: Summary) -> None:
    """The whole measurement against a register that waits `delay` seconds before each answer."""
    register_port, proxy_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as directory, ExitStack() as stack:
        settings = Path(directory) / "settings.toml"
        settings.write_text(
            f'[proxy]\nlog_level = "WARNING"\nstatus = ""\n\n[[device]]\nname = "ecr"\ntype = "tcp"\n'
            f'path = "127.0.0.1:{register_port}"\nprotocol = "custom"\nsharing = "exchange"\n'
            f'listen = ["127.0.0.1:{proxy_port}"]\nmax_clients = 200\nacquire_timeout = 60\n'
        )
        simulate = (
            *(sys.executable, "-m", "proxy", "simulate", "custom"),
            *("--listen", f"127.0.0.1:{register_port}", "--delay", str(delay)),
        )
        stack.enter_context(background(*simulate, port=register_port))
        proxy = stack.enter_context(
            background(sys.executable, "-m", "proxy", "run", "-c", str(settings), port=proxy_port)
        )
        print(f"register answering after {delay * 1000:g} ms:", flush=True)
        rounds = trio.run(
            measure, register_port, proxy_port, ProcessCpu(proxy.pid), args.rounds, args.blocks, args.exchanges
        )
    report(delay, rounds, summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each over every path (default 3)")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per path in a round (default 10)")
    parser.add_argument("--exchanges", type=int, default=300, help="exchanges per block (default 300)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 4 blocks of 200 exchanges")
    add_summary_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.blocks, args.exchanges = 3, 4, 200
    summary = Summary("exchange", args.summary_json)
    for delay in RATE_TARGETS:
        run_with(delay, args, summary)


if __name__ == "__main__":
    main()
