"""Every benchmark in one run, then one table of their figures beside their targets: what `make bench` runs.

Runs one after the other (so no two load the machine at once): latency.py, exchange.py, dialin.py and
startup.py, each with `--summary-json` into one file; then framers.py and soak.py --quick, which print
their own figures and add none to the table. Each script's output passes through as it comes. At the end
comes one table (bench, figure, value, target, met), each script's wall time, and the scripts that
failed. The exit status is 1 when a script failed; a target not met is a figure, not a failure.

    make bench    or    .venv/bin/python bench/summary.py [--quick]

--quick gives latency, exchange and startup their --quick, and dialin one round: about half the time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# (script, its arguments, its arguments with --quick, whether it writes --summary-json)
SCRIPTS = (
    ("latency.py", [], ["--quick"], True),
    ("exchange.py", [], ["--quick"], True),
    ("dialin.py", [], ["--rounds", "1"], True),
    ("startup.py", [], ["--quick"], True),
    ("framers.py", [], [], False),
    ("soak.py", ["--quick"], ["--quick"], False),
)
MET = {True: "yes", False: "NO", None: ""}


def run(script: str, arguments: list[str]) -> tuple[int, float]:
    """Runs one bench script with this Python, its output passing through: its exit status and seconds."""
    command = [sys.executable, str(BENCH / script), *arguments]
    print(f"\n=== {' '.join([script, *arguments])}", flush=True)
    started = time.perf_counter()
    status = subprocess.run(command).returncode
    return status, time.perf_counter() - started


def shown(value: float) -> str:
    """`value` with about three significant digits: 3,736 or 68.1 or 1.46."""
    return f"{value:,.{0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2}f}"


def table(figures: list[dict]) -> None:
    """Prints the figures as one aligned table."""
    rows = [("bench", "figure", "value", "target", "met")]
    for line in figures:
        value = f"{shown(line['value'])} {line['unit']}"
        rows.append((line["bench"], line["figure"], value, line["target"], MET[line["met"]]))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for row in rows:
        print(f"{row[0]:{widths[0]}}  {row[1]:{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:{widths[3]}}  {row[4]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the scripts' quick runs")
    args = parser.parse_args()
    failed = []
    timings = []
    with tempfile.TemporaryDirectory() as directory:
        summary = Path(directory) / "summary.jsonl"
        summary.touch()
        for script, full, quick, writes in SCRIPTS:
            arguments = [*(quick if args.quick else full), *(["--summary-json", str(summary)] if writes else [])]
            status, seconds = run(script, arguments)
            timings.append(f"{script} {seconds:.0f} s")
            if status != 0:
                failed.append(f"{script} (exit status {status})")
        figures = [json.loads(line) for line in summary.read_text().splitlines()]
    print("\n=== summary")
    table(figures)
    unmet = [f"  {line['bench']}: {line['figure']}" for line in figures if line["met"] is False]
    met = sum(line["met"] is True for line in figures)
    print(f"\ntargets: {met} met, {len(unmet)} not met{':' if unmet else ''}", *unmet, sep="\n")
    print(f"wall time: {', '.join(timings)}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
