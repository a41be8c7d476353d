"""Start-up time: `devproxy --help`, and `devproxy run` until its first port accepts, beside socat.

Wall times, each the median of several runs of the installed `devproxy` script (beside the Python
running this bench, so run it with the venv's):
- `devproxy --help`, to its exit (--help-runs, at least 10; target under 100 ms), beside `python -c pass`,
  the interpreter's own share;
- `devproxy run` with one TCP device, from the spawn to the first connection its listening port
  accepts (--run-runs, at least 5; target under 250 ms), beside socat forwarding a port the same way.
  The port is tried every 1 ms, so the figure is at most 1 ms late; each run is stopped with SIGTERM
  once its port answered.

    make bench    or    .venv/bin/python bench/startup.py [--help-runs N] [--run-runs N] [--quick]
                        [--summary-json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import Summary, accepts, add_summary_argument, ensure_socat, free_port

DEVPROXY = Path(sys.executable).with_name("devproxy")
HELP_TARGET = 100.0  # ms
RUN_TARGET = 250.0  # ms
POLL = 0.001  # seconds between connection attempts
LIMIT = 20.0  # seconds: a program whose port is still closed then has failed to start


def wall_ms(command: list[str]) -> float:
    """Milliseconds from spawning `command` to its exit (status 0 required)."""
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - started) * 1000


def first_open_port_ms(command: list[str], port: int) -> float:
    """Milliseconds from spawning `command` to the first connection accepted on `port`; then stops it."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not accepts(port):
            if process.poll() is not None:
                raise SystemExit(f"{command[0]} exited with {process.returncode} before listening on {port}")
            if time.perf_counter() - started > LIMIT:
                raise SystemExit(f"{command[0]} did not listen on {port} within {LIMIT:g} s")
            time.sleep(POLL)
        return (time.perf_counter() - started) * 1000
    finally:
        process.terminate()
        process.wait(10)


def proxy_run_ms(directory: Path) -> float:
    """One `devproxy run` to its device's listening port (the device itself is absent: no error)."""
    port = free_port()
    settings = directory / "settings.toml"
    settings.write_text(
        f'[proxy]\nlog_level = "WARNING"\nstatus = ""\n\n[[device]]\nname = "echo"\ntype = "tcp"\n'
        f'path = "127.0.0.1:{free_port()}"\nlisten = ["127.0.0.1:{port}"]\n'
    )
    return first_open_port_ms([str(DEVPROXY), "run", "-c", str(settings)], port)


def socat_ms(socat: str) -> float:
    port = free_port()
    return first_open_port_ms(
        [socat, f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1", f"TCP:127.0.0.1:{free_port()}"], port
    )


def figure(summary: Summary, name: str, samples: list[float], target: float | None = None) -> None:
    """Prints the median of `samples` (and their range) and adds it to the summary."""
    median = statistics.median(samples)
    met = None if target is None else median < target
    verdict = "" if target is None else f"   target < {target:g} ms: {'met' if met else 'not met'}"
    print(f"{name:34} {median:6.1f} ms ({min(samples):.1f}-{max(samples):.1f}, {len(samples)} runs){verdict}")
    summary.add(name, median, "ms", "" if target is None else f"< {target:g} ms", met)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--help-runs", type=int, default=20, help="runs of `devproxy --help` (default 20)")
    parser.add_argument("--run-runs", type=int, default=10, help="runs of `devproxy run` and socat (default 10)")
    parser.add_argument("--quick", action="store_true", help="10 and 5 runs")
    add_summary_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.help_runs, args.run_runs = 10, 5
    if not DEVPROXY.exists():
        raise SystemExit(f"{DEVPROXY} is missing: run this with the venv's Python after `make install`")
    summary = Summary("startup", args.summary_json)
    socat = ensure_socat()
    help_, python, run, forward = [], [], [], []
    for _ in range(args.help_runs):  # taking turns, so a busy moment does not favour either
        help_.append(wall_ms([str(DEVPROXY), "--help"]))
        python.append(wall_ms([sys.executable, "-c", "pass"]))
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(args.run_runs):
            run.append(proxy_run_ms(Path(directory)))
            forward.append(socat_ms(socat))
    figure(summary, "devproxy --help", help_, HELP_TARGET)
    figure(summary, "python -c pass", python)
    figure(summary, "devproxy run to its first open port", run, RUN_TARGET)
    figure(summary, "socat to its first open port", forward)


if __name__ == "__main__":
    main()
