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
import stat
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio
from loguru import logger

FORMAT_VERSION = 1
# Records waiting for the writer, and their bytes: together they bound the memory a slow disk can cost.
QUEUE_LIMIT = 4096
QUEUE_BYTES = 16 << 20
# Bytes of a request and of an answer kept in a record by default (a device's max_message when set):
# past it the record is cut short and says `"truncated": true`.
RECORD_LIMIT = 65536
# Every matched byte becomes this one ('*'): lengths, and so frame layouts, stay as they were.
MASK = 0x2A
# A record_redact entry that starts with this is a literal byte sequence in hex, not a regex.
HEX_PREFIX = "hex:"
# The largest recording replay reads.
LOAD_LIMIT = 256 << 20


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

    __slots__ = ("answer", "at", "client", "first_byte", "last_byte", "limit", "request", "started", "truncated")

    def __init__(self, client: str, request: bytes, now: float, limit: int = RECORD_LIMIT) -> None:
        self.client = client
        self.limit = limit
        self.truncated = len(request) > limit
        self.request = bytearray(request[:limit])
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
        self._keep(self.answer, data)

    def requested(self, data: bytes) -> None:
        """More bytes of the request (a raw session's request arrives in pieces)."""
        self._keep(self.request, data)

    def _keep(self, kept: bytearray, data: bytes) -> None:
        room = self.limit - len(kept)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        kept += data


@attrs.define(frozen=True)
class RecordSettings:
    """Where and how a device records (the [[device]] keys record, record_max_bytes, record_keep,
    record_redact)."""

    path: Path
    max_bytes: int
    keep: int
    redact: tuple[re.Pattern[bytes], ...] = ()
    # The bytes of a request and of an answer kept per record.
    max_record: int = RECORD_LIMIT


class Recorder:
    """A device's recording: a bounded queue the byte path fills and a task that writes it to disk."""

    def __init__(
        self, device: str, settings: RecordSettings, queue_limit: int = QUEUE_LIMIT, queue_bytes: int = QUEUE_BYTES
    ) -> None:
        self.device = device
        self.settings = settings
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        # Records as the byte path leaves them (bytes, not yet redacted or hex), each with its size.
        self._queue: deque[tuple[dict[str, Any], int]] = deque()
        self._queued_bytes = 0
        self._wake = trio.Event()
        self._file: Any = None
        self._size = 0
        # Records dropped since the last warning, and in all.
        self._dropped_burst = 0
        self.dropped = 0
        self.written = 0
        self._write_failed = False
        self._lost_in_failure = 0

    # -- the byte path's side: never waits ---------------------------------------------------------

    def take(self, client: str, request: bytes, now: float) -> Take:
        return Take(client, request, now, self.settings.max_record)

    def finish(self, take: Take, now: float, result: str) -> None:
        """The exchange ended (`result`): its record joins the queue, or is dropped when the queue is full.

        Only the raw bytes and times are queued: redaction, hex and JSON are the writer thread's work.
        """
        del now  # the answer is complete at its last byte; what came after it is the proxy's own time
        record: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "device": self.device,
            "client": take.client,
            "at": take.at,
            "request": bytes(take.request),
            "answer": bytes(take.answer),
            "first_byte": None if take.first_byte is None else round(take.first_byte - take.started, 6),
            "complete": None if take.last_byte is None else round(take.last_byte - take.started, 6),
            "result": result,
        }
        if take.truncated:
            record["truncated"] = True
        self.record(record)

    def record(self, record: dict[str, Any]) -> None:
        """Queues one record for the writer; when the queue is full it is dropped and counted.

        `request` and `answer` are bytes (redacted and hexed by the writer) or already hex strings.
        """
        size = 256 + sum(len(record.get(key) or b"") for key in ("request", "answer"))
        if len(self._queue) >= self.queue_limit or (self._queue and self._queued_bytes + size > self.queue_bytes):
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
        self._queue.append((record, size))
        self._queued_bytes += size
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
            batch = [record for record, _ in self._queue]
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
            try:
                await trio.to_thread.run_sync(self._write_records, batch)
            except OSError as exc:
                self._forget(len(batch))
                self.dropped += len(batch)
                self._lost_in_failure += len(batch)
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
                if self._write_failed:
                    logger.warning(
                        "{}: recording to {} resumed; {} exchanges were lost while it could not be written",
                        self.device,
                        self.settings.path,
                        self._lost_in_failure,
                        device=self.device,
                        event="record_dropped",
                    )
                self._write_failed = False
                self._lost_in_failure = 0
                self.written += len(batch)

    def _forget(self, count: int) -> None:
        for _ in range(count):
            _, size = self._queue.popleft()
            self._queued_bytes -= size

    # -- in the worker thread --------------------------------------------------------------------

    def _format(self, record: dict[str, Any]) -> str:
        """One queued record -> its JSON line: redacted, bytes as hex, `at` as UTC text."""
        record = dict(record)
        masked = 0
        for key in ("request", "answer"):
            value = record[key]
            if isinstance(value, bytes | bytearray):
                value, count = redact(bytes(value), self.settings.redact)
                masked += count
                record[key] = value.hex()
        if masked:
            record["redacted"] = masked
        if isinstance(record.get("at"), float):
            at = datetime.fromtimestamp(record["at"], UTC)
            record["at"] = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"

    def _write_records(self, records: list[dict[str, Any]]) -> None:
        self._write_lines([self._format(record) for record in records])

    def _write_lines(self, lines: list[str]) -> None:
        for line in lines:
            data = line.encode("utf-8")
            if self._file is None:
                self._open()
            if self._size and self._size + len(data) > self.settings.max_bytes:
                self._rotate()
            try:
                self._file.write(data)
                self._file.flush()
            except OSError:
                self._tear_back()
                raise
            self._size += len(data)

    def _tear_back(self) -> None:
        """A write failed part way: the file is cut back to its last complete line, so no torn line is
        left for replay to refuse."""
        file, self._file = self._file, None
        if file is None:
            return
        with contextlib.suppress(OSError, ValueError):
            file.close()  # its buffer may fail to flush again; what reached the file is cut below
        with contextlib.suppress(OSError):
            os.truncate(self.settings.path, self._size)

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
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(descriptor, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise RecordingError(f"{path}: is not a recording (not a regular file)")
            if info.st_size > LOAD_LIMIT:
                raise RecordingError(
                    f"{path}: is too large to replay ({info.st_size} bytes; at most {LOAD_LIMIT >> 20} MiB)"
                )
            data = file.read(LOAD_LIMIT + 1)
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read the recording: {exc.strerror or exc}") from None
    if len(data) > LOAD_LIMIT:
        raise RecordingError(f"{path}: is too large to replay (more than {LOAD_LIMIT >> 20} MiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordingError(f"{path}: is not a recording (not UTF-8 text)") from None
    records: list[Recorded] = []
    # Only "\n" ends a line: str.splitlines() would also split at U+2028, \x1c and others inside a value.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(_parse_line(line))
        except ValueError as exc:
            raise RecordingError(f"{path} line {number}: {exc}") from None
        except RecursionError:
            raise RecordingError(f"{path} line {number}: not a recorded exchange (nested too deeply)") from None
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
        getattr(config, "max_message", RECORD_LIMIT),
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
