"""Each framer's speed on valid frames beside its worst-case inputs, in MB/s.

Run: .venv/bin/python bench/framers.py [--megabytes N]

Worst cases are the inputs that made scanners quadratic (every byte a frame start, plausible lengths
that never complete, escapes that keep a candidate going), compared with valid frames fed the same way:
in the proxy's 64 KiB reads and in 7-byte pieces. Last, valid frames fed a byte at a time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.protocols import atol2, atol3, coges, custom, dle, iec61107, shtrih
from proxy.protocols import energomera_ce as ce

READ_SIZE = 65536

FRAMERS: dict[str, tuple[Callable, bytes, list[bytes]]] = {
    "custom": (
        lambda: custom.Framer(from_device=True),
        custom.build_frame(0x13, bytes(range(40))),
        [b"\x01", b"\x01\xff\x0f", b"\x01\x05\x00"],
    ),
    "shtrih": (shtrih.Framer, shtrih.build_frame(0x10, bytes(range(40))), [b"\x02", b"\x02\xff"]),
    "atol2": (atol2.Framer, atol2.build_frame(bytes(range(40))), [b"\x02", b"\x02\x10\x03", b"\x02\x10"]),
    "atol3": (atol3.Framer, atol3.build_packet(1, bytes(range(40))), [b"\xfe", b"\xfe\x7f\x7f\x01\xfd\xed"]),
    "dle": (dle.Framer, dle.build_frame(1, 1, ord("A"), bytes(range(40))), [b"\x10\x02", b"\x10\x02\x10\x10"]),
    "coges": (coges.Framer, coges.build_frame("0000320064" * 4), [b"<", b"<0"]),
    "energomera-ce": (ce.Framer, ce.build(ce.Packet(1, 2, 3, True, 5, 0x0120, bytes(15))), [b"\xc0", b"\xc0\x01"]),
    "iec61107": (
        lambda: iec61107.Framer(from_host=False),
        iec61107.data_block("VOLTA(230.12)\r\nCURRE(1.250)\r\n"),
        [b"/", b"\x01", b"\x02a"],
    ),
}


def rate(factory: Callable, data: bytes, piece: int) -> float:
    """MB/s feeding `data` in pieces of `piece` bytes (0: in one piece), then a flush."""
    framer = factory()
    started = time.perf_counter()
    if piece:
        for start in range(0, len(data), piece):
            framer.feed(data[start : start + piece])
    else:
        framer.feed(data)
    framer.flush()
    return len(data) / (time.perf_counter() - started) / 1e6


def worst_rate(factory: Callable, patterns: list[bytes], size: int, piece: int) -> tuple[float, str]:
    """The slowest of the hostile patterns at this piece size, and which one it was."""
    results = []
    for pattern in patterns:
        data = (pattern * (size // len(pattern) + 1))[:size]
        results.append((rate(factory, data, piece), pattern.hex(" ")))
    return min(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=2.0, help="bytes per measurement (default 2 MB)")
    size = int(parser.parse_args().megabytes * 1e6)
    print("MB/s of valid frames and of the worst hostile input, fed as the proxy reads (64 KiB) and in 7-byte pieces")
    heading = ("framer", "valid", "worst", "ratio", "valid/7", "worst/7", "ratio")
    print("{:<15} {:>7} {:>7} {:>6} {:>8} {:>8} {:>6}  worst input".format(*heading))
    for name, (factory, frame, patterns) in FRAMERS.items():
        valid_data = frame * (size // len(frame))
        row = []
        for piece in (READ_SIZE, 7):
            valid = rate(factory, valid_data, piece)
            worst, pattern = worst_rate(factory, patterns, size, piece)
            row += [valid, worst, valid / worst]
        print("{:<15} {:>7.1f} {:>7.1f} {:>5.1f}x {:>8.1f} {:>8.1f} {:>5.1f}x  {}".format(name, *row, pattern))
    print("\nA valid frame fed a byte at a time (a slow serial line), MB/s:")
    for name, (factory, frame, _) in FRAMERS.items():
        print(f"  {name:<15} {rate(factory, frame * (size // len(frame) // 16), 1):>6.2f}")


if __name__ == "__main__":
    main()
