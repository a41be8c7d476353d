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
        taken = {row[0] for row in self._db.execute("SELECT direct_port FROM devices")}
        if port is None:
            port = next((p for p in range(low, high + 1) if p not in taken), None)
            if port is None:
                raise RegistryError(f"direct_ports {low}-{high} are all taken; {device_id} gets no port")
        elif port in taken:
            raise RegistryError(f"port {port} belongs to another device")
        self._db.execute(
            "INSERT INTO devices (id, name, note, direct_port, created) VALUES (?, ?, ?, ?, ?)",
            (device_id, name, note, port, _now()),
        )
        return self.get(device_id)

    def remove(self, device_id: str) -> bool:
        return self._db.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount > 0

    def connected(self, device_id: str, peer: str) -> None:
        now = _now()
        self._db.execute(
            "UPDATE devices SET last_connect = ?, last_seen = ?, last_peer = ? WHERE id = ?",
            (now, now, peer, device_id),
        )

    def disconnected(self, device_id: str) -> None:
        now = _now()
        self._db.execute("UPDATE devices SET last_disconnect = ?, last_seen = ? WHERE id = ?", (now, now, device_id))

    def add_traffic(self, updates: Iterable[tuple[str, int, int]]) -> None:
        """Adds (id, bytes to device, bytes from device) to the totals, in one transaction."""
        now = _now()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE devices SET bytes_to_device = bytes_to_device + ?, bytes_from_device = bytes_from_device + ?,"
                " last_seen = ? WHERE id = ?",
                [(to_device, from_device, now, device_id) for device_id, to_device, from_device in updates],
            )
