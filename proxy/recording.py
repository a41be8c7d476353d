"""Recording a device's exchanges (`record = "FILE"`): JSON lines, rotated by size, written off the loop.

The byte path only hands a finished exchange to Recorder.record(), which appends it to a bounded queue
and returns: it never waits, whatever the disk does. The recorder's own task (run(), started by the
sharing mode) formats the queued records and writes them in a worker thread. When the queue is full
(the disk is slower than the traffic), a record is dropped and counted, with one WARNING per burst.

One line per exchange (docs in the README, "Recording and replay"):

    {"v": 1, "device": "ecr", "client": "127.0.0.1:40112", "at": "2025-03-14T09:26:53.588Z",
     "request": "0105...", "answer": "0601...", "first_byte": 0.012, "complete": 0.031, "result": "ok"}

`at` is the wall-clock time the request began to leave, `first_byte` and `complete` the seconds from
then to the first byte of the answer and to its end (null when none came). Bytes are lowercase hex.
With `record_redact`, matching bytes are masked before the record is queued, and `redacted` counts them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio
from loguru import logger

FORMAT_VERSION = 1
# Records waiting for the writer. Each is small (a request and its answer), so this bounds the memory a
# slow disk can cost at a few MB, and is seconds of the busiest device's traffic.
QUEUE_LIMIT = 4096
# Every matched byte becomes this one ('*'): lengths, and so frame layouts, stay as they were.
MASK = 0x2A
# A record_redact entry that starts with this is a literal byte sequence in hex, not a regex.
HEX_PREFIX = "hex:"


class RedactError(ValueError):
    """A record_redact entry is neither a regular expression nor hex bytes."""


def compile_redaction(pattern: str) -> re.Pattern[bytes]:
    """One record_redact entry -> a bytes regex; RedactError says what is wrong.

    `"hex:3b 45"` is the literal bytes 3B 45. Anything else is a regular expression over the bytes, its
    text read as Latin-1 (so `\\x1c` escapes and ASCII text both mean what they say): `"\\d{13,19}"`
    finds a card number written in ASCII digits.
    """
    if pattern.startswith(HEX_PREFIX):
        try:
            literal = bytes.fromhex(pattern[len(HEX_PREFIX) :])
        except ValueError:
            raise RedactError(f"{pattern!r} is not hex bytes after 'hex:' (e.g. \"hex:3b 45\")") from None
        if not literal:
            raise RedactError(f"{pattern!r} has no bytes after 'hex:'")
        return re.compile(re.escape(literal))
    try:
        compiled = re.compile(pattern.encode("latin-1"), re.DOTALL)
    except (re.error, UnicodeEncodeError) as exc:
        raise RedactError(f"{pattern!r} is not a regular expression over bytes: {exc}") from None
    if compiled.search(b"") is not None:
        raise RedactError(f"{pattern!r} matches nothing at all (the empty string): it would mask nothing")
    return compiled


def redact(data: bytes, patterns: tuple[re.Pattern[bytes], ...]) -> tuple[bytes, int]:
    """`data` with every match masked (only its groups, when the pattern has groups); and how many bytes."""
    if not patterns or not data:
        return data, 0
    masked = bytearray(data)
    hidden = bytearray(len(data))  # 1 where a byte is masked; patterns may overlap
    for pattern in patterns:
        for match in pattern.finditer(data):
            spans = [match.span(group) for group in range(1, len(match.groups()) + 1)] or [match.span()]
            for start, end in spans:
                if start >= 0:
                    masked[start:end] = bytes([MASK]) * (end - start)
                    hidden[start:end] = b"\x01" * (end - start)
    return bytes(masked), sum(hidden)


class Take:
    """One exchange while it is recorded: the client's request and the answer's bytes as they pass."""

    __slots__ = ("answer", "at", "client", "first_byte", "last_byte", "request", "started")

    def __init__(self, client: str, request: bytes, now: float) -> None:
        self.client = client
        self.request = bytearray(request)
        self.answer = bytearray()
        self.at = time.time()
        self.started = now
        self.first_byte: float | None = None
        self.last_byte: float | None = None

    def answered(self, data: bytes, now: float) -> None:
        if not data:
            return
        if self.first_byte is None:
            self.first_byte = now
        self.last_byte = now
        self.answer += data


@attrs.define(frozen=True)
class RecordSettings:
    """Where and how a device records (the [[device]] keys record, record_max_bytes, record_keep,
    record_redact)."""

    path: Path
    max_bytes: int
    keep: int
    redact: tuple[re.Pattern[bytes], ...] = ()


class Recorder:
    """A device's recording: a bounded queue the byte path fills and a task that writes it to disk."""

    def __init__(self, device: str, settings: RecordSettings, queue_limit: int = QUEUE_LIMIT) -> None:
        self.device = device
        self.settings = settings
        self.queue_limit = queue_limit
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = trio.Event()
        self._file: Any = None
        self._size = 0
        # Records dropped since the last warning, and in all.
        self._dropped_burst = 0
        self.dropped = 0
        self.written = 0
        self._write_failed = False

    # -- the byte path's side: never waits ---------------------------------------------------------

    def take(self, client: str, request: bytes, now: float) -> Take:
        return Take(client, request, now)

    def finish(self, take: Take, now: float, result: str) -> None:
        """The exchange ended (`result`): its record joins the queue, or is dropped when the queue is full."""
        del now  # the answer is complete at its last byte; what came after it is the proxy's own time
        request, masked_request = redact(bytes(take.request), self.settings.redact)
        answer, masked_answer = redact(bytes(take.answer), self.settings.redact)
        record: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "device": self.device,
            "client": take.client,
            "at": datetime.fromtimestamp(take.at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request": request.hex(),
            "answer": answer.hex(),
            "first_byte": None if take.first_byte is None else round(take.first_byte - take.started, 6),
            "complete": None if take.last_byte is None else round(take.last_byte - take.started, 6),
            "result": result,
        }
        if masked_request or masked_answer:
            record["redacted"] = masked_request + masked_answer
        self.record(record)

    def record(self, record: dict[str, Any]) -> None:
        """Queues one record for the writer; when the queue is full it is dropped and counted."""
        if len(self._queue) >= self.queue_limit:
            self.dropped += 1
            self._dropped_burst += 1
            if self._dropped_burst == 1:
                logger.warning(
                    "{}: recording to {} falls behind ({} records queued); exchanges are dropped from the "
                    "recording until it catches up (the device is not slowed)",
                    self.device,
                    self.settings.path,
                    len(self._queue),
                    device=self.device,
                    event="record_dropped",
                )
            return
        self._queue.append(record)
        self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the writer --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Writes queued records until cancelled; then writes what is still queued and closes the file.

        Error handling: a write that fails (disk full, a directory removed) is logged once at ERROR and
        its records are dropped and counted; the device goes on unaffected, and writing is tried again
        with the next records.
        """
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self._write_queued()
        finally:
            with trio.CancelScope(shield=True):
                await self._write_queued()
                if self._file is not None:
                    await trio.to_thread.run_sync(self._file.close)
                    self._file = None

    async def _write_queued(self) -> None:
        while self._queue:
            # Taken off the queue only once written (or given up): a cancellation on the way leaves them
            # for run()'s last write.
            batch = list(self._queue)
            if self._dropped_burst:
                logger.warning(
                    "{}: recording caught up; {} exchanges were left out of {}",
                    self.device,
                    self._dropped_burst,
                    self.settings.path,
                    device=self.device,
                    event="record_dropped",
                )
                self._dropped_burst = 0
            lines = [json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n" for record in batch]
            try:
                await trio.to_thread.run_sync(self._write_lines, lines)
            except OSError as exc:
                self._forget(len(batch))
                self.dropped += len(batch)
                if not self._write_failed:
                    logger.error(
                        "{}: cannot write the recording {}: {}; its exchanges are dropped until it can",
                        self.device,
                        self.settings.path,
                        exc.strerror or exc,
                        device=self.device,
                        event="error",
                    )
                self._write_failed = True
                self._close_quietly()
            else:
                self._forget(len(batch))
                self._write_failed = False
                self.written += len(batch)

    def _forget(self, count: int) -> None:
        for _ in range(count):
            self._queue.popleft()

    # -- in the worker thread --------------------------------------------------------------------

    def _write_lines(self, lines: list[str]) -> None:
        for line in lines:
            data = line.encode("utf-8")
            if self._file is None:
                self._open()
            if self._size and self._size + len(data) > self.settings.max_bytes:
                self._rotate()
            self._file.write(data)
            self._size += len(data)
        self._file.flush()

    def _open(self) -> None:
        path = self.settings.path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 (kept open between batches, closed by run())
        self._size = self._file.tell()

    def _rotate(self) -> None:
        """FILE -> FILE.1 -> ... -> FILE.<keep>; the oldest beyond `keep` is removed."""
        path, keep = self.settings.path, self.settings.keep
        self._file.close()
        self._file = None
        if keep == 0:
            path.unlink(missing_ok=True)
        else:
            Path(f"{path}.{keep}").unlink(missing_ok=True)
            for number in range(keep - 1, 0, -1):
                older = Path(f"{path}.{number}")
                if older.exists():
                    os.replace(older, f"{path}.{number + 1}")
            os.replace(path, f"{path}.1")
        self._open()

    def _close_quietly(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


# -- reading a recording back -------------------------------------------------------------------------


class RecordingError(Exception):
    """A recording cannot be replayed; the message is one line naming the file, the line and why."""


@attrs.define(frozen=True)
class Recorded:
    """One recorded exchange, as replay needs it."""

    request: bytes
    answer: bytes
    first_byte: float | None
    complete: float | None


def load_recording(path: str | Path) -> list[Recorded]:
    """Reads a recording; RecordingError (one line) when it cannot be read or holds no exchange.

    Blank lines are skipped; an exchange with no request (nothing to match) is skipped too.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read the recording: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RecordingError(f"{path}: is not a recording (not UTF-8 text)") from None
    records: list[Recorded] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(_parse_line(line))
        except ValueError as exc:
            raise RecordingError(f"{path} line {number}: {exc}") from None
    records = [record for record in records if record.request]
    if not records:
        raise RecordingError(f"{path}: holds no exchange to replay")
    return records


def _parse_line(line: str) -> Recorded:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    fields = {}
    for key in ("request", "answer"):
        value = record.get(key)
        if not isinstance(value, str):
            raise ValueError(f"{key!r} is missing or not a hex string")
        try:
            fields[key] = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{key!r} is not hex bytes: {value[:40]!r}") from None
    for key in ("first_byte", "complete"):
        value = record.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0
        ):
            raise ValueError(f"{key!r} is {value!r}, not a number of seconds >= 0 or null")
        fields[key] = None if value is None else float(value)
    return Recorded(**fields)


def recorder_for(config: Any) -> Recorder | None:
    """The recorder a [[device]] table asks for (its `record` keys), or None when it records nothing."""
    if not config.record:
        return None
    settings = RecordSettings(
        Path(config.record),
        config.record_max_bytes,
        config.record_keep,
        tuple(compile_redaction(pattern) for pattern in config.record_redact),
    )
    return Recorder(config.name, settings)


async def run_beside(recorder: Recorder | None, task: Any) -> None:
    """Runs `task()` (a sharing mode's own task), with the recorder's writer beside it when there is one."""
    if recorder is None:
        await task()
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recorder.run)
        await task()
