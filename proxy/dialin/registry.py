"""The registry of dial-in devices: SQLite, one row per device id, with its direct port for good.

All access goes through one worker thread at a time (trio.to_thread with a limiter of one), so the
event loop never waits on the disk and the connection is never used by two threads at once.

The journal is WAL in exclusive locking mode. Plain WAL maps a shared-memory file, and when that file
cannot be written the process dies of SIGBUS, which nothing can catch; in exclusive mode WAL keeps its
index in the heap and maps nothing. A rollback journal would let other programs read the file, but a
program that polls it starves the proxy's writes (measured: registrations slowed a hundredfold). So
the proxy holds the registry alone while it runs, and `devproxy devices` says so. Any statement can fail
(disk full, an I/O error): every sqlite3.Error becomes a RegistryError.

The proxy answers from memory: every record is loaded at open, and the free direct ports are kept in
FreePorts, so registering a device costs the same with ten thousand rows as with none (choosing the
lowest free port in SQL cost 243 µs a device below 1,000 rows and 1,976 µs from 3,000). A new device is
started at once and its row written afterwards, batched with the others of the moment (`write`, which
the dial-in server calls every FLUSH_INTERVAL). So that a crash in between cannot give its port to
another device at the next start (the clients of the lost device would reach a stranger there), ports
are reserved in the file, a few ahead, before they are handed out (table reserved_ports); a device's
row takes its reservation's place, and a clean stop frees the reservations never handed out. What a
crash leaves there is held back (`held`) until an operator gives it to its device with
`devproxy devices add ID --port PORT`. With direct_ports = "any" the system chooses each port as it is
bound, so none can be reserved ahead: there the row is written before the device starts.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from proxy.dialin.identify import is_device_id, shown

T = TypeVar("T")
# The highest TCP port: a larger number in a row written by hand would be bound modulo 65536.
MAX_PORT = 65535

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
# Ports handed out, or about to be, whose device's row is not written yet (see the module docstring).
RESERVATIONS = "CREATE TABLE IF NOT EXISTS reserved_ports (port INTEGER PRIMARY KEY)"

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
# A row already there stays as it is: recreate() may have written it from memory before write() does.
INSERT_ROW = f"INSERT OR IGNORE INTO devices ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# How long opening the registry waits for another program that holds it (the proxy holds it alone).
BUSY_TIMEOUT_MS = 5000
# Ports reserved in one write, ahead of the registrations that take them: a burst of new devices waits
# for the disk once per this many, and a crash holds back at most this many ports no device ever had.
RESERVE_AHEAD = 32


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

    @classmethod
    def new(cls, device_id: str, port: int, name: str = "", note: str = "") -> Record:
        """The record of a device registered now, never seen yet."""
        return cls(device_id, name, note, port, _now(), None, None, None, None, 0, 0)

    def unusable(self) -> str | None:
        """Why a row written by hand (or by a program other than devproxy) cannot be served: a direct
        port that is no TCP port (the system would bind another, or none), or an id no device could
        identify with; None for a good row."""
        if not isinstance(self.id, str) or not is_device_id(self.id):
            return f"{shown(str(self.id))} is no device id"
        if not isinstance(self.direct_port, int) or not 1 <= self.direct_port <= MAX_PORT:
            return f"{self.id}: direct port {self.direct_port} is not a TCP port"
        return None


@attrs.frozen
class Event:
    """A device connected (with its peer) or disconnected, at `at` (ISO 8601 UTC)."""

    device_id: str
    connected: bool
    peer: str = ""
    at: str = attrs.field(factory=lambda: _now())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class FreePorts:
    """Which ports are taken, and the lowest free one of the direct_ports range in O(log n).

    Ports from `_next` up are free unless `_taken` holds them (a port given explicitly); every free port
    below `_next` is on the heap `_freed`. A port on the heap that is taken explicitly stays there until
    it comes to the top and is skipped (lazy deletion), so no operation searches the heap, and `_next`
    only moves up: taking every port of the range once costs O(range) in all.
    """

    def __init__(self, direct_ports: tuple[int, int] | None, taken: Iterable[int]) -> None:
        """`direct_ports` None ("any"): the system chooses ports, and take() has none to give."""
        self._low, self._high = direct_ports or (1, 0)
        self._taken = set(taken)
        self._next = self._low
        self._freed: list[int] = []

    def take(self) -> int | None:
        """The lowest free port of the range, now taken; None when the range is full."""
        while self._freed:
            port = heapq.heappop(self._freed)
            if port not in self._taken:
                self._taken.add(port)
                return port
        while self._next <= self._high and self._next in self._taken:
            self._next += 1
        if self._next > self._high:
            return None
        port = self._next
        self._next += 1
        self._taken.add(port)
        return port

    def take_port(self, port: int) -> bool:
        """Takes `port` (inside the range or not); False when it is taken already."""
        if port in self._taken:
            return False
        self._taken.add(port)
        return True

    def give_back(self, port: int) -> None:
        """Frees `port`: the next take() gives it if it is the lowest free one."""
        if port in self._taken:
            self._taken.remove(port)
            if self._low <= port < self._next:
                heapq.heappush(self._freed, port)


class Registry:
    """The device table. In the proxy, the in-memory state and the async methods belong to the event
    loop, and the blocking methods that write run in the worker thread (run()) with what they are given;
    the CLI, which has no event loop, calls add() and remove(), which change both."""

    def __init__(
        self, path: str | Path, direct_ports: tuple[int, int] | None, *, lock_wait: float = BUSY_TIMEOUT_MS / 1000
    ) -> None:
        """Opens (or creates) the registry, checks that it is one, and loads it.

        Error handling: RegistryError naming the file and the reason when it is not a database, not a
        devproxy registry, damaged, or cannot be opened.
        """
        self.path = str(path)
        self.direct_ports = direct_ports
        self._lock_wait_ms = int(lock_wait * 1000)
        self._limiter = trio.CapacityLimiter(1)
        self._db = self._open()
        try:
            # Every registered device, written or not: what is written back if the file is deleted while
            # the proxy runs.
            self.known: dict[str, Record] = {record.id: record for record in self._load()}
            # Ports reserved by a run that stopped before writing their devices: given to no one.
            self.held: set[int] = {row[0] for row in self._db.execute("SELECT port FROM reserved_ports")}
        except sqlite3.Error as exc:
            self._db.close()
            raise RegistryError(f"registry {self.path}: cannot be read ({exc})") from None
        self._ports = FreePorts(direct_ports, itertools.chain(self.held, (r.direct_port for r in self.known.values())))
        # Ports reserved in the file and not handed out yet, lowest first.
        self._ready: collections.deque[int] = collections.deque()
        self._reserving = trio.Lock()
        # Registered in memory, rows not written yet, in order.
        self._unwritten: list[Record] = []

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
            db.execute(RESERVATIONS)
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

    def _load(self) -> list[Record]:
        return [Record(*row) for row in self._db.execute("SELECT * FROM devices ORDER BY direct_port")]

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

    # -- in memory, for the proxy ------------------------------------------------------------------

    async def register(self, device_id: str) -> Record:
        """Registers a new id on the lowest free port of the range; its row is written later (write(), with
        take_unwritten()).

        Returns at once while ports reserved ahead remain; otherwise after reserving RESERVE_AHEAD more,
        which registrations arriving meanwhile wait for. Error handling: RegistryError when the range
        is full or no port can be reserved (the file cannot be written); nothing is registered then.
        """
        if not self._ready:
            async with self._reserving:
                if not self._ready:
                    await self._reserve_ahead(device_id)
        record = Record.new(device_id, self._ready.popleft())
        self.known[device_id] = record
        self._unwritten.append(record)
        return record

    async def _reserve_ahead(self, device_id: str) -> None:
        ports = list(itertools.islice(iter(self._ports.take, None), RESERVE_AHEAD))
        if not ports:
            low, high = self.direct_ports
            raise RegistryError(f"direct_ports {low}-{high} are all taken; {device_id} gets no port")
        try:
            await self.run(self.reserve, ports)
        except RegistryError:
            for port in ports:
                self._ports.give_back(port)
            raise
        self._ready.extend(ports)

    async def register_bound(self, device_id: str, port: int) -> Record:
        """Registers a new id on `port`, which the system chose as the caller bound it (direct_ports =
        "any"), and returns once its row is written.

        Nothing can be reserved ahead when the system chooses, so the row itself must be written before
        the port is announced (see the module docstring). Error handling: RegistryError when the port
        is registered already or the row cannot be written; nothing is registered then.
        """
        if not self._ports.take_port(port):
            raise RegistryError(f"port {port} belongs to another device")
        record = Record.new(device_id, port)
        try:
            await self.run(self.write, [record], [], [])
        except RegistryError:
            self._ports.give_back(port)
            raise
        self.known[device_id] = record
        return record

    def take_unwritten(self) -> list[Record]:
        """The registrations whose rows are to be written now; put_back() those that could not be."""
        rows, self._unwritten = self._unwritten, []
        return rows

    def put_back(self, rows: list[Record]) -> None:
        self._unwritten[:0] = rows

    def reservations(self) -> list[int]:
        """Every port reserved in the file: held back from a crash, or reserved ahead by this run."""
        return [*self.held, *self._ready]

    def unused_reservations(self) -> list[int]:
        """The ports this run reserved and never handed out, for release() at a clean stop."""
        return list(self._ready)

    # -- blocking methods --------------------------------------------------------------------------

    @_sqlite_errors
    def all(self) -> list[Record]:
        """Every registered device as the file has it now (with its traffic), by direct port."""
        return self._load()

    @_sqlite_errors
    def add(self, device_id: str, port: int | None = None, name: str = "", note: str = "") -> Record:
        """Registers `device_id` on `port`, or on the lowest free port of the range, and writes its row
        now (the CLI, while the proxy does not run). A port held back from a crash may be given (--port)."""
        if device_id in self.known:
            raise RegistryError(f"{device_id} is already registered")
        if port is None and self.direct_ports is None:
            raise RegistryError(f"direct_ports = 'any': {device_id} needs its port given (--port)")
        if port is None:
            port = self._ports.take()
            if port is None:
                low, high = self.direct_ports
                raise RegistryError(f"direct_ports {low}-{high} are all taken; {device_id} gets no port")
        elif self.direct_ports is not None and not self.direct_ports[0] <= port <= self.direct_ports[1]:
            raise RegistryError(f"port {port} is outside direct_ports {self.direct_ports[0]}-{self.direct_ports[1]}")
        elif port not in self.held and not self._ports.take_port(port):
            raise RegistryError(f"port {port} belongs to another device")
        record = Record.new(device_id, port, name, note)
        try:
            self.write([record], [], [])
        except RegistryError:
            if port not in self.held:
                self._ports.give_back(port)
            raise
        self.held.discard(port)
        self.known[device_id] = record
        return record

    @_sqlite_errors
    def remove(self, device_id: str) -> bool:
        """Unregisters `device_id` (the CLI); its port is free for the next device. False if unknown."""
        record = self.known.get(device_id)
        if record is None:
            return False
        self._db.execute("DELETE FROM devices WHERE id = ?", (device_id,))
        del self.known[device_id]
        self._ports.give_back(record.direct_port)
        return True

    @_sqlite_errors
    def reserve(self, ports: list[int]) -> None:
        """Writes reservations of `ports` before they are handed out (see the module docstring)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO reserved_ports (port) VALUES (?)", [(p,) for p in ports])

    @_sqlite_errors
    def release(self, ports: list[int]) -> None:
        """Deletes the reservations of `ports`, which no device was given."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM reserved_ports WHERE port = ?", [(p,) for p in ports])

    @_sqlite_errors
    def write(self, rows: list[Record], events: Iterable[Event], traffic: Iterable[tuple[str, int, int]]) -> None:
        """Writes new devices' rows (each replacing its port's reservation), connects, disconnects and
        (id, bytes to device, bytes from device), in one transaction."""
        now = _now()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(INSERT_ROW, [attrs.astuple(record, recurse=False) for record in rows])
            self._db.executemany("DELETE FROM reserved_ports WHERE port = ?", [(r.direct_port,) for r in rows])
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

    def replaced(self) -> bool:
        """True when the file was deleted or replaced since it was opened."""
        return self._file_identity() != self._identity

    @_sqlite_errors
    def recreate(self, known: list[Record], reserved: list[int]) -> None:
        """A new registry at the path, after the file was deleted or replaced while the proxy ran, with
        `known` (every device the proxy knows) and the `reserved` ports.

        Error handling: RegistryError when the new file cannot be made; the old connection stays then.
        """
        new = self._open()
        self._db.close()
        self._db = new
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(INSERT_ROW, [attrs.astuple(record, recurse=False) for record in known])
            self._db.executemany("INSERT OR IGNORE INTO reserved_ports (port) VALUES (?)", [(p,) for p in reserved])
