"""The registry of dial-in devices: SQLite, one row per device id, with its direct port for good.

All access goes through one worker thread at a time (trio.to_thread with a limiter of one), so the
event loop never waits on the disk and the connection is never used by two threads at once.

The journal is WAL in exclusive locking mode. Plain WAL maps a shared-memory file, and when that file
cannot be written the process dies of SIGBUS, which nothing can catch; in exclusive mode WAL keeps its
index in the heap and maps nothing. A rollback journal would let other programs read the file, but a
program that polls it starves the proxy's writes (measured: registrations slowed a hundredfold). So
the proxy holds the registry alone while it runs, and `devproxy devices` says so. Any statement can fail
(disk full, an I/O error): every sqlite3.Error becomes a RegistryError.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    direct_port INTEGER NOT NULL UNIQUE,
    created TEXT NOT NULL,
    last_seen TEXT,
    last_connect TEXT,
    last_disconnect TEXT,
    last_peer TEXT,
    bytes_to_device INTEGER NOT NULL DEFAULT 0,
    bytes_from_device INTEGER NOT NULL DEFAULT 0
)
"""


COLUMNS = (
    "id",
    "name",
    "note",
    "direct_port",
    "created",
    "last_seen",
    "last_connect",
    "last_disconnect",
    "last_peer",
    "bytes_to_device",
    "bytes_from_device",
)
# How long opening the registry waits for another program that holds it (the proxy holds it alone).
BUSY_TIMEOUT_MS = 5000


class RegistryError(Exception):
    """The registry cannot do what was asked; the message names the file and says why."""


def _sqlite_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Turns any sqlite3.Error of a registry method into a RegistryError naming the file."""

    @wraps(method)
    def wrapper(self: Registry, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise RegistryError(f"registry {self.path}: {exc}") from None

    return wrapper


@attrs.frozen
class Record:
    id: str
    name: str
    note: str
    direct_port: int
    created: str
    last_seen: str | None
    last_connect: str | None
    last_disconnect: str | None
    last_peer: str | None
    bytes_to_device: int
    bytes_from_device: int


@attrs.frozen
class Event:
    """A device connected (with its peer) or disconnected, at `at` (ISO 8601 UTC)."""

    device_id: str
    connected: bool
    peer: str = ""
    at: str = attrs.field(factory=lambda: _now())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Registry:
    """The device table; the blocking methods are for the CLI, the async ones for the running proxy."""

    def __init__(
        self, path: str | Path, direct_ports: tuple[int, int] | None, *, lock_wait: float = BUSY_TIMEOUT_MS / 1000
    ) -> None:
        """Opens (or creates) the registry and checks that it is one.

        Error handling: RegistryError naming the file and the reason when it is not a database, not a
        devproxy registry, damaged, or cannot be opened.
        """
        self.path = str(path)
        self.direct_ports = direct_ports
        self._lock_wait_ms = int(lock_wait * 1000)
        self._limiter = trio.CapacityLimiter(1)
        # What the proxy knows is registered, to write back if the file is deleted while it runs.
        self.known: dict[str, Record] = {}
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"registry {self.path}: cannot be opened: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout={self._lock_wait_ms}")
            # Exclusive before the first WAL access: no shared-memory file is ever made or mapped.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL syncs at checkpoints, not at each commit: a crash of the process loses
            # nothing, a crash of the machine at most the last moments; registering thousands stays fast.
            db.execute("PRAGMA synchronous=NORMAL")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise RegistryError(f"registry {self.path}: the file is damaged ({check})")
            db.execute(SCHEMA)
            columns = tuple(row[1] for row in db.execute("PRAGMA table_info(devices)"))
            if columns != COLUMNS:
                raise RegistryError(
                    f"registry {self.path}: not a devproxy registry (its devices table has {', '.join(columns)})"
                )
            db.execute("SELECT COUNT(*) FROM devices").fetchone()
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc):
                raise RegistryError(
                    f"registry {self.path}: in use by another program (a running devproxy holds it alone; "
                    "stop it to change the registry, or let devices register as they connect)"
                ) from None
            raise RegistryError(f"registry {self.path}: cannot be used ({exc})") from None
        except sqlite3.DatabaseError as exc:
            db.close()
            raise RegistryError(f"registry {self.path}: not a devproxy registry ({exc})") from None
        except RegistryError:
            db.close()
            raise
        self._identity = self._file_identity()
        return db

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def close(self) -> None:
        self._db.close()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Runs one of the blocking methods in the registry's worker thread."""
        return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)

    # -- blocking methods --------------------------------------------------------------------------

    @_sqlite_errors
    def get(self, device_id: str) -> Record | None:
        row = self._db.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return Record(*row) if row else None

    @_sqlite_errors
    def all(self) -> list[Record]:
        records = [Record(*row) for row in self._db.execute("SELECT * FROM devices ORDER BY direct_port")]
        self.known.update((record.id, record) for record in records)
        return records

    @_sqlite_errors
    def add(self, device_id: str, port: int | None = None, name: str = "", note: str = "") -> Record:
        """Registers `device_id` on `port`, or on the lowest free port of the range."""
        if self.get(device_id) is not None:
            raise RegistryError(f"{device_id} is already registered")
        if port is None and self.direct_ports is None:
            raise RegistryError(f"direct_ports = 'any': {device_id} needs its port given (--port)")
        if port is None:
            low, high = self.direct_ports
            # The lowest free port: the range's first, or the first after a taken one that is free.
            row = self._db.execute(
                "SELECT MIN(candidate) FROM (SELECT ? AS candidate UNION SELECT direct_port + 1 FROM devices) "
                "WHERE candidate BETWEEN ? AND ? AND candidate NOT IN (SELECT direct_port FROM devices)",
                (low, low, high),
            ).fetchone()
            if row[0] is None:
                raise RegistryError(f"direct_ports {low}-{high} are all taken; {device_id} gets no port")
            port = row[0]
        try:
            self._db.execute(
                "INSERT INTO devices (id, name, note, direct_port, created) VALUES (?, ?, ?, ?, ?)",
                (device_id, name, note, port, _now()),
            )
        except sqlite3.IntegrityError:
            raise RegistryError(f"port {port} belongs to another device") from None
        record = self.get(device_id)
        self.known[device_id] = record
        return record

    @_sqlite_errors
    def find_or_add(self, device_id: str, autoregister: bool, port: int | None = None) -> tuple[Record | None, bool]:
        """(the device's record, True if it was registered now, on `port` if given); (None, False) if
        unknown and not added."""
        record = self.get(device_id)
        if record is not None:
            self.known[device_id] = record
        if record is not None or not autoregister:
            return record, False
        return self.add(device_id, port), True

    @_sqlite_errors
    def remove(self, device_id: str) -> bool:
        self.known.pop(device_id, None)
        return self._db.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount > 0

    @_sqlite_errors
    def record(self, events: Iterable[Event], traffic: Iterable[tuple[str, int, int]]) -> None:
        """Writes connects, disconnects and (id, bytes to device, bytes from device) in one transaction."""
        now = _now()
        with self._db:
            self._db.execute("BEGIN")
            for event in events:
                if event.connected:
                    self._db.execute(
                        "UPDATE devices SET last_connect = ?, last_seen = ?, last_peer = ? WHERE id = ?",
                        (event.at, event.at, event.peer, event.device_id),
                    )
                else:
                    self._db.execute(
                        "UPDATE devices SET last_disconnect = ?, last_seen = ? WHERE id = ?",
                        (event.at, event.at, event.device_id),
                    )
            self._db.executemany(
                "UPDATE devices SET bytes_to_device = bytes_to_device + ?, bytes_from_device = bytes_from_device + ?,"
                " last_seen = ? WHERE id = ?",
                [(to_device, from_device, now, device_id) for device_id, to_device, from_device in traffic],
            )

    @_sqlite_errors
    def recreate_if_gone(self) -> int | None:
        """When the file was deleted or replaced while the proxy runs: a new registry at the path with
        every device this proxy knows; returns how many, or None when the file is still the one opened.

        Error handling: RegistryError when the new file cannot be made.
        """
        if self._file_identity() == self._identity:
            return None
        # The new file first: when it cannot be made, the old connection stays usable for reads.
        new = self._open()
        self._db.close()
        self._db = new
        known = list(self.known.values())
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                f"INSERT OR IGNORE INTO devices ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                [attrs.astuple(record) for record in known],
            )
        return len(known)
