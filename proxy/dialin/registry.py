"""The registry of dial-in devices: SQLite (WAL), one row per device id, with its direct port for good.

All access goes through one worker thread at a time (trio.to_thread with a limiter of one), so the
event loop never waits on the disk and the connection is never used by two threads at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
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


class RegistryError(Exception):
    """A registration cannot be made; the message says why (a full port range, a taken port...)."""


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

    def __init__(self, path: str | Path, direct_ports: tuple[int, int]) -> None:
        self.path = str(path)
        self.direct_ports = direct_ports
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL syncs at checkpoints, not at each commit: a crash of the process loses
            # nothing, a crash of the machine at most the last moments; registering thousands stays fast.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute(SCHEMA)
        except sqlite3.Error as exc:
            raise RegistryError(f"registry {self.path}: {exc}") from None
        self._limiter = trio.CapacityLimiter(1)

    def close(self) -> None:
        self._db.close()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Runs one of the blocking methods in the registry's worker thread."""
        return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)

    # -- blocking methods --------------------------------------------------------------------------

    def get(self, device_id: str) -> Record | None:
        row = self._db.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return Record(*row) if row else None

    def all(self) -> list[Record]:
        return [Record(*row) for row in self._db.execute("SELECT * FROM devices ORDER BY direct_port")]

    def add(self, device_id: str, port: int | None = None, name: str = "", note: str = "") -> Record:
        """Registers `device_id` on `port`, or on the lowest free port of the range."""
        if self.get(device_id) is not None:
            raise RegistryError(f"{device_id} is already registered")
        low, high = self.direct_ports
        if port is None:
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
        return self.get(device_id)

    def find_or_add(self, device_id: str, autoregister: bool) -> tuple[Record | None, bool]:
        """(the device's record, True if it was registered now); (None, False) if unknown and not added."""
        record = self.get(device_id)
        if record is not None or not autoregister:
            return record, False
        return self.add(device_id), True

    def remove(self, device_id: str) -> bool:
        return self._db.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount > 0

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
