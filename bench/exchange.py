"""Exchange sharing under load: N clients hammering one simulated Custom register through devproxy.

The simulated register runs in its own process (`devproxy simulate custom --listen`), devproxy in
another with the register as a TCP device in exchange sharing. For N = 1, 10 and 100 clients, each
client sends beep requests one after the other (waiting for each answer); the script prints
exchanges/s and p50/p99 exchange latency, then the same for one direct connection to the register,
and the ratio of the proxy's rate to the direct one. It runs twice: with a register that answers at
once (about 80 us, a stress of the proxy alone) and with one that takes 1 ms before each answer (still
far quicker than a real register's 50 ms to 3 s).

    .venv/bin/python bench/exchange.py [--exchanges N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import background, free_port

BEEP = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")
ANSWER = bytes.fromhex("06 01 04 00 13 00 00 63 7A")


async def client(port: int, count: int, samples: list[float]) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for _ in range(count):
            started = time.perf_counter()
            await stream.send_all(BEEP)
            answer = b""
            while len(answer) < len(ANSWER):
                answer += await stream.receive_some()
            if answer != ANSWER:
                raise SystemExit(f"wrong answer {answer.hex(' ')}")
            samples.append(time.perf_counter() - started)


async def hammer(port: int, clients: int, total: int) -> tuple[float, float, float]:
    """exchanges/s, p50 and p99 in ms, for `total` exchanges spread over `clients` clients."""
    samples: list[float] = []
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client, port, total // clients, samples)
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(samples, n=100)
    return len(samples) / elapsed, quantiles[49] * 1000, quantiles[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=3000, help="exchanges per run (default 3000)")
    args = parser.parse_args()
    for delay in (0.0, 0.001):
        print(f"register answering after {delay * 1000:g} ms:")
        run_with(delay, args.exchanges)
    print("target: with 100 clients at least 80% of the direct rate")


def run_with(delay: float, exchanges: int) -> None:
    register_port, proxy_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as directory:
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
        run = (sys.executable, "-m", "proxy", "run", "-c", str(settings))
        with background(*simulate, port=register_port):
            direct_rate, p50, p99 = trio.run(hammer, register_port, 1, exchanges)
            print(f"direct, 1 client     {direct_rate:8.0f} exchanges/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
            with background(*run, port=proxy_port):
                time.sleep(0.2)
                for clients in (1, 10, 100):
                    rate, p50, p99 = trio.run(hammer, proxy_port, clients, exchanges)
                    print(
                        f"devproxy, {clients:3} clients {rate:8.0f} exchanges/s   p50 {p50:6.2f} ms   "
                        f"p99 {p99:6.2f} ms   {rate / direct_rate:5.0%} of direct",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
