"""The registry of dial-in devices in PostgreSQL, shared by every instance that names the same database.

It keeps the interface of the SQLite Registry (proxy/dialin/registry.py) and adds what several instances
need: which instance holds each device (a claim), each instance's heartbeat, and a poll of what the
others registered and claimed.

All access goes through one worker thread at a time (trio.to_thread with a limiter of one) and one
connection, in autocommit mode: the event loop never waits on the network, and the connection is never
used by two threads at once. Other instances' changes are learnt by polling (poll(), every heartbeat),
not LISTEN/NOTIFY: a poll is needed anyway to find an instance that stopped heartbeating, and it keeps
the worker to one connection.

Direct ports are unique across instances because the table says so (UNIQUE), not because an instance
checked: a registration inserts its row on the lowest port it believes free, and when another instance
took that port a moment before, the insert fails and the next port is tried. The row is written before
the device starts, so there are no reservations ahead as with SQLite (`held` stays empty).

A claim is (holder, generation, claimed_at): a device identifying at an instance is claimed by it with
the next generation. A claim is live while its holder's heartbeat (table instances, the database's own
clock) is younger than claim_timeout. Claims made while the database cannot be reached wait in memory
and are written when it returns, each only if no claim made after the device identified is there.

While the database cannot be reached, the connection is tried again at most every RECONNECT_INTERVAL,
and never by a registration or a claim: those fail at once meanwhile (RegistryError), so no dial-in
connection waits for a connect timeout; the flush, the heartbeat and the CLI's calls try again.

Each heartbeat reads every row (a few milliseconds for ten thousand devices): that is how an instance
learns of devices the others registered and of claims that lapsed, with no trigger or NOTIFY to keep.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from proxy.dialin.registry import COLUMNS, Event, FreePorts, Record, RegistryError, _now

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

URL_SCHEMES = ("postgresql://", "postgres://")
# The schema this devproxy writes. A registry of a higher version was upgraded by a newer devproxy,
# whose rows this one could misread: it is refused.
SCHEMA_VERSION = 1
# Each version's statements, run in order from the registry's version to SCHEMA_VERSION, in one
# transaction under LOCK_KEY, so that instances starting together upgrade it once.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            note TEXT NOT NULL DEFAULT '',
            direct_port INTEGER NOT NULL UNIQUE,
            created TEXT NOT NULL,
            last_seen TEXT,
            last_connect TEXT,
            last_disconnect TEXT,
            last_peer TEXT,
            bytes_to_device BIGINT NOT NULL DEFAULT 0,
            bytes_from_device BIGINT NOT NULL DEFAULT 0,
            holder TEXT,
            generation BIGINT NOT NULL DEFAULT 0,
            claimed_at TIMESTAMPTZ
        )""",
        "CREATE TABLE instances (name TEXT PRIMARY KEY, advertise TEXT NOT NULL, heartbeat TIMESTAMPTZ NOT NULL)",
    ),
}
# pg_advisory_xact_lock key of schema changes ("devproxy" in ASCII).
LOCK_KEY = 0x646576_70726F7879
# Seconds a connection attempt may take, and how often a lost database is tried again.
CONNECT_TIMEOUT = 3
RECONNECT_INTERVAL = 1.0
# A connection whose peer vanished (a cut network, not a closed socket) is found dead after this many
# milliseconds of unacknowledged data, or by keepalives when idle, rather than hanging a query forever.
TCP_USER_TIMEOUT_MS = 10_000
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
# A statement that waits for a row lock longer than this (an operator's transaction left open in psql)
# fails, and one that runs longer than the next is cancelled: the one worker never waits for ever, so
# heartbeats and registrations go on, and the failed write is tried again.
SESSION_SETTINGS = {"lock_timeout": "2s", "statement_timeout": "10s"}

_SELECT_ROWS = f"SELECT {', '.join(COLUMNS)} FROM devices"
_INSERT_ROW = f"INSERT INTO devices ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
# Every device with its holder, whether the holder still heartbeats, and where it is reached.
_SELECT_CLAIMS = f"""
SELECT {", ".join("d." + c for c in COLUMNS)}, d.holder, d.generation,
       i.heartbeat > now() - make_interval(secs => %s), i.advertise
FROM devices d LEFT JOIN instances i ON i.name = d.holder
"""


def is_postgres(location: str) -> bool:
    """True when [dialin] registry names a PostgreSQL database rather than a SQLite file."""
    return location.startswith(URL_SCHEMES)


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs (without anything before its host when
    it cannot be taken apart)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@attrs.frozen
class Claim:
    """Who holds a device as the last poll saw it: the instance, its generation, and where it is reached."""

    holder: str
    generation: int
    live: bool
    advertise: str


@attrs.frozen
class Poll:
    """What a poll found: every device's record, and the claims of those that have one."""

    records: dict[str, Record]
    claims: dict[str, Claim]


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise RegistryError(
            "a PostgreSQL registry needs psycopg, which is not installed: pip install 'devproxy[postgresql]'"
        ) from None
    return psycopg


class PostgresRegistry:
    """The device table in PostgreSQL, as the proxy and the CLI use the SQLite Registry, plus claims.

    In the proxy, the in-memory state and the async methods belong to the event loop, and the blocking
    methods run in the worker thread (run()).
    """

    def __init__(
        self,
        url: str,
        direct_ports: tuple[int, int] | None,
        *,
        instance: str = "",
        advertise: str = "",
        claim_timeout: float = 30.0,
    ) -> None:
        """Connects, creates or upgrades the schema, and loads every device.

        Error handling: RegistryError naming the URL (without its password) and the reason when psycopg
        is missing, the database cannot be reached, or its schema is newer than this devproxy's.
        """
        self._psycopg = _psycopg()
        self.url = url
        self.path = redacted(url)
        self.direct_ports = direct_ports
        self.instance = instance
        self.advertise = advertise
        self.claim_timeout = claim_timeout
        self._limiter = trio.CapacityLimiter(1)
        self._db: psycopg.Connection | None = None
        self._last_attempt = float("-inf")
        # Why the database cannot be used, while it cannot.
        self.down: str | None = None
        self._connect()
        try:
            self._upgrade()
            self.known: dict[str, Record] = {record.id: record for record in self._load()}
        except self._psycopg.Error as exc:
            self.close()
            raise RegistryError(f"registry {self.path}: cannot be read ({_reason(exc)})") from None
        except RegistryError:
            self.close()
            raise
        # No reservations ahead in PostgreSQL (see the module docstring).
        self.held: set[int] = set()
        self._ports = FreePorts(direct_ports, (r.direct_port for r in self.known.values()))
        # The claims not written yet: id, and the monotonic time the device identified.
        self._unclaimed: dict[str, float] = {}

    # -- the connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        self._last_attempt = time.monotonic()
        self.close()
        try:
            self._db = self._psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                tcp_user_timeout=TCP_USER_TIMEOUT_MS,
                application_name=f"devproxy {self.instance}".strip()[:63],
                **KEEPALIVES,
            )
            for name, value in SESSION_SETTINGS.items():
                self._db.execute("SELECT set_config(%s, %s, false)", (name, value))
        except self._psycopg.Error as exc:
            # libpq quotes a URL it cannot parse, password and all.
            self.down = _reason(exc).replace(self.url, self.path)
            raise RegistryError(f"registry {self.path}: cannot be reached ({self.down})") from None
        self.down = None

    def _connection(self, *, reconnect: bool) -> psycopg.Connection:
        """The open connection; with `reconnect`, a new one when it was lost (at most every
        RECONNECT_INTERVAL). Error handling: RegistryError while the database cannot be reached."""
        if self._db is not None and not self._db.closed and not self._db.broken:
            return self._db
        if reconnect and time.monotonic() - self._last_attempt >= RECONNECT_INTERVAL:
            self._connect()
            return self._db
        raise RegistryError(f"registry {self.path}: cannot be reached ({self.down or 'connection lost'})")

    def _call(self, work: Callable[[psycopg.Connection], T], *, reconnect: bool = True) -> T:
        """`work` on the connection; any psycopg error becomes a RegistryError naming the URL."""
        db = self._connection(reconnect=reconnect)
        try:
            return work(db)
        except self._psycopg.errors.UniqueViolation:
            raise
        except self._psycopg.Error as exc:
            if db.broken or db.closed:
                self.down = _reason(exc)
                raise RegistryError(f"registry {self.path}: cannot be reached ({self.down})") from None
            raise RegistryError(f"registry {self.path}: {_reason(exc)}") from None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Runs one of the blocking methods in the registry's worker thread."""
        return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)

    def _upgrade(self) -> None:
        """Creates the schema or brings it to SCHEMA_VERSION; RegistryError for a newer one."""
        db = self._db
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] or 0
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"registry {self.path}: its schema is version {version}, newer than this devproxy's "
                    f"({SCHEMA_VERSION}); upgrade devproxy on this machine to the version the others run"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))

    def _load(self) -> list[Record]:
        rows = self._db.execute(f"{_SELECT_ROWS} ORDER BY direct_port").fetchall()
        return [Record(*row) for row in rows]

    # -- in memory, for the proxy ------------------------------------------------------------------

    async def register(self, device_id: str) -> Record:
        """Registers a new id on the lowest port free in the whole registry and returns once its row is
        written (then another instance's device cannot have that port).

        Error handling: RegistryError when the range is full or the database cannot be reached (at once,
        without trying it again: a new device waits for no timeout); nothing is registered then. An id
        that another instance registered a moment before gets that instance's record.
        """
        while True:
            port = self._ports.take()
            if port is None:
                low, high = self.direct_ports
                raise RegistryError(f"direct_ports {low}-{high} are all taken; {device_id} gets no port")
            record = await self._insert(Record.new(device_id, port))
            if record is not None:
                return record

    async def register_bound(self, device_id: str, port: int) -> Record:
        """Registers a new id on `port`, which the system chose as the caller bound it (direct_ports = "any").

        Error handling: RegistryError when the port is another device's (in this instance or another) or
        the database cannot be reached; nothing is registered then.
        """
        if not self._ports.take_port(port):
            raise RegistryError(f"port {port} belongs to another device")
        record = await self._insert(Record.new(device_id, port))
        if record is None:
            raise RegistryError(f"port {port} belongs to a device another instance registered")
        return record

    async def _insert(self, record: Record) -> Record | None:
        """The record as written (another instance's, when it registered the id first), or None when its
        port was taken by another instance (kept taken here)."""
        try:
            written = await self.run(self._insert_row, record)
        except RegistryError:
            self._ports.give_back(record.direct_port)
            raise
        if written is None:
            return None
        if written.direct_port != record.direct_port:
            self._ports.give_back(record.direct_port)
            self._ports.take_port(written.direct_port)
        self.known[written.id] = written
        return written

    def _insert_row(self, record: Record) -> Record | None:
        def insert(db: psycopg.Connection) -> Record | None:
            try:
                db.execute(_INSERT_ROW, attrs.astuple(record, recurse=False))
            except self._psycopg.errors.UniqueViolation:
                row = db.execute(f"{_SELECT_ROWS} WHERE id = %s", (record.id,)).fetchone()
                return Record(*row) if row is not None else None
            return record

        return self._call(insert, reconnect=False)

    def take_unwritten(self) -> list[Record]:
        """Nothing: a row is written as its device registers."""
        return []

    def put_back(self, rows: list[Record]) -> None:
        """Nothing to keep: take_unwritten() gives no rows."""

    def reservations(self) -> list[int]:
        return []

    def unused_reservations(self) -> list[int]:
        return []

    def replaced(self) -> bool:
        """A database is not a file that can be deleted under the proxy."""
        return False

    def release(self, ports: list[int]) -> None:
        """Nothing was reserved ahead."""

    def recreate(self, known: list[Record], reserved: list[int]) -> None:
        """Never needed: replaced() is never true."""

    def claiming(self, device_id: str) -> None:
        """A device identified at this instance now: its claim is written by the next claim() call."""
        self._unclaimed[device_id] = time.monotonic()

    # -- blocking methods --------------------------------------------------------------------------

    def all(self) -> list[Record]:
        """Every registered device as the database has it now, by direct port."""
        return self._call(lambda db: [Record(*row) for row in db.execute(f"{_SELECT_ROWS} ORDER BY direct_port")])

    def add(self, device_id: str, port: int | None = None, name: str = "", note: str = "") -> Record:
        """Registers `device_id` on `port`, or on the lowest free port of the range (the CLI; it may run
        beside the instances)."""
        if port is None and self.direct_ports is None:
            raise RegistryError(f"direct_ports = 'any': {device_id} needs its port given (--port)")
        if (
            port is not None
            and self.direct_ports is not None
            and not self.direct_ports[0] <= port <= self.direct_ports[1]
        ):
            raise RegistryError(f"port {port} is outside direct_ports {self.direct_ports[0]}-{self.direct_ports[1]}")
        while True:
            chosen = port if port is not None else self._ports.take()
            if chosen is None:
                low, high = self.direct_ports
                raise RegistryError(f"direct_ports {low}-{high} are all taken; {device_id} gets no port")
            record = Record.new(device_id, chosen, name, note)
            try:
                self._call(lambda db, record=record: db.execute(_INSERT_ROW, attrs.astuple(record, recurse=False)))
            except self._psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name == "devices_pkey":
                    raise RegistryError(f"{device_id} is already registered") from None
                if port is not None:
                    raise RegistryError(f"port {port} belongs to another device") from None
                continue
            self.known[device_id] = record
            return record

    def remove(self, device_id: str) -> bool:
        """Unregisters `device_id` (the CLI). False if unknown. Running instances keep its direct port
        open until they restart."""
        removed = self._call(lambda db: db.execute("DELETE FROM devices WHERE id = %s", (device_id,)).rowcount)
        record = self.known.pop(device_id, None)
        if record is not None:
            self._ports.give_back(record.direct_port)
        return bool(removed)

    def write(self, rows: list[Record], events: Iterable[Event], traffic: Iterable[tuple[str, int, int]]) -> None:
        """Writes connects, disconnects and (id, bytes to device, bytes from device), in one transaction.
        `rows` is always empty (see take_unwritten())."""
        now = _now()
        connects = [(e.at, e.at, e.peer, e.device_id) for e in events if e.connected]
        disconnects = [(e.at, e.at, e.device_id) for e in events if not e.connected]
        updates = [(to_device, from_device, now, device_id) for device_id, to_device, from_device in traffic]

        def write(db: psycopg.Connection) -> None:
            with db.transaction(), db.cursor() as cursor:
                cursor.executemany(
                    "UPDATE devices SET last_connect = %s, last_seen = %s, last_peer = %s WHERE id = %s", connects
                )
                cursor.executemany("UPDATE devices SET last_disconnect = %s, last_seen = %s WHERE id = %s", disconnects)
                cursor.executemany(
                    "UPDATE devices SET bytes_to_device = bytes_to_device + %s,"
                    " bytes_from_device = bytes_from_device + %s, last_seen = %s WHERE id = %s",
                    updates,
                )

        self._call(write)

    async def claim_pending(self) -> dict[str, int]:
        """Writes the claims of the devices that identified here since the last call: {id: generation}.

        A claim is written only if the device's current claim is this instance's, or older than the
        moment the device identified here (measured on the database's clock): a claim that waited for a
        lost database must not take a device from the instance it dialled in to since. A device whose
        claim is not written (absent from the answer) is held elsewhere; poll() says so.
        Error handling: RegistryError when the database cannot be reached (at once, without trying it
        again); the claims are kept for the next call.
        """
        pending, self._unclaimed = self._unclaimed, {}
        if not pending:
            return {}
        try:
            won = await self.run(self._write_claims, pending)
        except RegistryError:
            # Newer identifications of the same ids, made meanwhile, stay as they are.
            self._unclaimed = {**pending, **self._unclaimed}
            raise
        return won

    def _write_claims(self, pending: dict[str, float]) -> dict[str, int]:
        now = time.monotonic()
        ages = [(self.instance, now - at, device_id, self.instance, now - at) for device_id, at in pending.items()]

        def claim(db: psycopg.Connection) -> dict[str, int]:
            won = {}
            with db.transaction(), db.cursor() as cursor:
                for values in ages:
                    cursor.execute(
                        "UPDATE devices SET holder = %s, generation = generation + 1,"
                        " claimed_at = now() - make_interval(secs => %s)"
                        " WHERE id = %s AND (holder IS NULL OR holder = %s OR claimed_at IS NULL"
                        " OR claimed_at <= now() - make_interval(secs => %s)) RETURNING id, generation",
                        values,
                    )
                    row = cursor.fetchone()
                    if row is not None:
                        won[row[0]] = row[1]
            return won

        return self._call(claim, reconnect=False)

    async def heartbeat(self) -> Poll:
        """Says this instance lives (with its advertise address), writes pending claims, and reads every
        device with its claim.

        Error handling: RegistryError when the database cannot be reached; tried again at the next call.
        """
        await self.run(self._beat)
        await self.claim_pending()
        return await self.run(self._poll)

    def _beat(self) -> None:
        def beat(db: psycopg.Connection) -> None:
            db.execute(
                "INSERT INTO instances (name, advertise, heartbeat) VALUES (%s, %s, now())"
                " ON CONFLICT (name) DO UPDATE SET advertise = excluded.advertise, heartbeat = now()",
                (self.instance, self.advertise),
            )

        self._call(beat)

    def _poll(self) -> Poll:
        rows = self._call(lambda db: db.execute(_SELECT_CLAIMS, (self.claim_timeout,)).fetchall(), reconnect=False)
        records, claims = {}, {}
        width = len(COLUMNS)
        for row in rows:
            record = Record(*row[:width])
            records[record.id] = record
            holder, generation, live, advertise = row[width:]
            if holder is not None:
                claims[record.id] = Claim(holder, generation, bool(live), advertise or "")
        return Poll(records, claims)

    def drop_claims(self) -> None:
        """Gives up every claim of this instance: at its start (it holds no link yet) and its clean stop."""
        self._call(lambda db: db.execute("UPDATE devices SET holder = NULL WHERE holder = %s", (self.instance,)))

    def holders(self) -> dict[str, str]:
        """{id: holder instance} of the devices whose holder heartbeats, for `devices list`."""
        rows = self._call(
            lambda db: db.execute(_SELECT_CLAIMS + " WHERE d.holder IS NOT NULL", (self.claim_timeout,)).fetchall()
        )
        width = len(COLUMNS)
        return {row[0]: row[width] for row in rows if row[width + 2]}

    def adopt(self, record: Record) -> None:
        """A device another instance registered: known here, its port taken."""
        self.known[record.id] = record
        self._ports.take_port(record.direct_port)

    def copy(self, records: list[Record]) -> tuple[list[Record], list[str]]:
        """Inserts `records` (`devices migrate`): (those copied, a line for each skipped and why), one
        transaction per record so that one clash does not undo the rest."""
        copied, skipped = [], []
        for record in records:
            try:
                self._call(lambda db, record=record: db.execute(_INSERT_ROW, attrs.astuple(record, recurse=False)))
            except self._psycopg.errors.UniqueViolation as exc:
                why = "already registered" if exc.diag.constraint_name == "devices_pkey" else "its port is another's"
                skipped.append(f"{record.id}: {why} in {self.path}")
                continue
            self.adopt(record)
            copied.append(record)
        return copied, skipped


def _reason(exc: Exception) -> str:
    """The first line of a psycopg error: libpq's messages run on with hints."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
