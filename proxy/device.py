"""Device: the one owner of a link to a device, its FIFO lock, its leases, its state and counters."""

from __future__ import annotations

import bisect
import enum
import math
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import attrs
import trio
from loguru import logger

from proxy import log, wire
from proxy.config import DeviceConfig, DialinConfig
from proxy.links import LinkError, discard_input, open_link

READ_SIZE = 65536
# What a newly connected dial-in device may send before the first client takes it, kept for that client.
HELD_LIMIT = 65536
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

Sink = Callable[[bytes], Awaitable[None]]


class State(enum.StrEnum):
    OFFLINE = "offline"
    CONNECTING = "connecting"
    IDLE = "idle"
    BUSY = "busy"


class Refused(Exception):
    """A client did not get the device; `reason` is "busy" or "offline"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class LinkLost(Exception):
    """The link to the device broke while a lease was using it."""


# Upper bounds, in seconds, of the buckets of the wait and exchange histograms (the last is +Inf).
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, math.inf)


@attrs.define
class Histogram:
    """Observed durations, counted into BUCKETS (not cumulative), with their sum."""

    counts: list[int] = attrs.field(factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


@attrs.define
class Counters:
    """What a device has done since the proxy started."""

    bytes_to_device: int = 0
    bytes_from_device: int = 0
    unsolicited_bytes: int = 0
    leases_granted: int = 0
    refused: Counter[str] = attrs.field(factory=Counter)
    # Exchange sharing: exchanges by result ("ok", "timeout", "refused", "link lost"), and how long.
    exchanges: Counter[str] = attrs.field(factory=Counter)
    exchange_seconds: Histogram = attrs.field(factory=Histogram)
    # How long clients waited for the device, granted or not.
    lock_wait_seconds: Histogram = attrs.field(factory=Histogram)
    link_opens: int = 0
    link_losses: int = 0
    last_connect: datetime | None = None
    last_disconnect: datetime | None = None


@attrs.define(eq=False)
class Handover:
    """A dial-in connection on its way from the dial-in server to its device."""

    link: trio.abc.Stream
    first: bytes
    on_done: Callable[[], None]


class Lease:
    """One client's turn at the device: it may send, and it alone receives what the device answers.

    Whoever ends the lease early (the device when the link is lost, a watchdog, a broken client)
    calls end(), which cancels `cancel_scope`; `ended` then says why.
    """

    def __init__(self, device: Device, client: str, sink: Sink, log_level: str = "INFO") -> None:
        self.device = device
        self.client = client
        self.log_level = log_level
        self.released = False
        self.cancel_scope = trio.CancelScope()
        self.ended: str | None = None
        self.last_activity = trio.current_time()
        # When the client last sent to the device, and the device to the client.
        self.last_sent = self.last_received = 0.0
        self._sink = sink
        self._link: trio.abc.Stream | None = None
        self._link_fd = -1

    async def send(self, data: bytes) -> None:
        """Writes `data` to the device. Raises LinkLost when the link is gone or breaks."""
        device, link = self.device, self._link
        if link is None or self.ended is not None:
            raise LinkLost(self.ended or "no link")
        if device.tracing:
            logger.trace("{}: {} -> device: {}", device.name, self.client, log.hexdump(data))
        try:
            await wire.send_all(link, self._link_fd, data)
        except BROKEN as exc:
            device.reset_link(f"write failed: {exc}")
            raise LinkLost(f"write failed: {exc}") from None
        device.counters.bytes_to_device += len(data)
        self.last_activity = self.last_sent = trio.current_time()

    async def _deliver(self, data: bytes) -> None:
        self.last_activity = self.last_received = trio.current_time()
        try:
            await self._sink(data)
        except BROKEN as exc:
            self.end(f"connection failed: {exc}")

    def release(self) -> None:
        """Gives the device to the next waiter now (idempotent); the lease's block may still run on."""
        if not self.released:
            self.released = True
            self._link = None
            self.device._release(self)

    def end(self, reason: str) -> None:
        """Ends the lease early for `reason`; the first reason given is the one kept."""
        if self.ended is None:
            self.ended = reason
        self._link = None
        self.cancel_scope.cancel()


class Device:
    """A device: keeps its link open (or takes it from the dial-in server), reads it, and lends it to
    one lease at a time.

    Only the reader task started by run() reads the link; only the current lease writes it. Bytes the
    device sends while no lease is held are logged and dropped, and what is buffered when a lease
    begins is discarded, so nothing meant for one client reaches another. (The first lease on a newly
    connected dial-in device is the exception: it gets what the device sent before anyone held it.)
    """

    def __init__(self, config: DeviceConfig, dialin: DialinConfig | None = None) -> None:
        self.config = config
        self.name = config.name
        self.state = State.OFFLINE
        self.counters = Counters()
        self.clients = 0
        self.waiting = 0
        self.tracing = False
        self.holder: Lease | None = None
        # FIFO like trio.Lock (its ParkingLot hands a release to the first waiter), but releasable by
        # any task: the device's reader ends an exchange's lease the moment the answer is complete.
        self._lock = trio.Semaphore(1)
        self._link: trio.abc.Stream | None = None
        self._link_scope: trio.CancelScope | None = None
        # Why the link was closed from inside the proxy: a reason, or None when closed on purpose.
        self._link_close_reason: str | None = None
        # Set on every change an observer can see (state, holder, waiters, clients, refusals, dropped
        # bytes), and created only when someone waits for one. Not set per forwarded chunk.
        self._changed: trio.Event | None = None
        # release_port: set while a lease wants the link opened.
        self._demand = trio.Event()
        # reconnect_interval = 0 and the last open failed: waiters are refused at once.
        self._gave_up = False
        self._last_open_error = ""
        # Dial-in devices: their links are handed in by the dial-in server (attach()), not opened.
        self.dialin = dialin
        self.peer: str | None = None
        self._handover: Handover | None = None
        self._handover_ready = trio.Event()
        # Until the first lease on a newly connected dial-in device, what it sends is kept for it.
        self._fresh = False
        self._held = bytearray()
        self._last_received = 0.0
        self._pinged = self._idle_logged = -1.0

    # -- the supervisor --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keeps the link open (or opens it per lease with release_port) until cancelled.

        Error handling: a link that cannot be opened or is lost is logged and retried every
        reconnect_interval seconds; 0 means never retry. Nothing here raises to the caller.
        """
        self.tracing = log.tracing()
        if self.dialin is not None:
            await self._run_dialin(task_status)
            return
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                if self.config.release_port:
                    await self._demand.wait()
                link = await self._open(nursery)
                if link is not None:
                    lost = await self._serve_link(link)
                    if lost is None:
                        continue
                    self._set_state(State.OFFLINE, f"link lost ({lost})")
                if self.config.reconnect_interval > 0:
                    await trio.sleep(self.config.reconnect_interval)
                    continue
                # Never retry: whoever waits is refused now; with release_port the next client tries anew.
                self._gave_up = True
                self._notify()
                if not self.config.release_port:
                    await trio.sleep_forever()
                self._demand = trio.Event()

    async def _run_dialin(self, task_status: trio.TaskStatus[None]) -> None:
        """A dial-in device: serves each connection the dial-in server hands in, until the next one."""
        task_status.started()
        try:
            while True:
                await self._handover_ready.wait()
                self._handover_ready = trio.Event()
                handover, self._handover = self._handover, None
                if handover is None:
                    continue
                self.counters.link_opens += 1
                self.counters.last_connect = datetime.now(UTC)
                try:
                    lost = await self._serve_link(handover.link, handover.first)
                finally:
                    handover.on_done()
                self._set_state(State.OFFLINE, f"disconnected ({lost or 'closed'})")
        finally:
            if self._handover is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self._handover.link)
                self._handover.on_done()

    async def attach(self, link: trio.abc.Stream, first: bytes, peer: str, on_done: Callable[[], None]) -> None:
        """A dial-in device connected on `link`; `first` is what it sent after its id.

        Resource handling: the device owns `link` from now on and closes it when it is lost, replaced
        or the device stops; then it calls on_done(). A connection already open for the same device is
        closed (its holder disconnected), so that the newest one serves.
        """
        self.peer = peer
        superseded, self._handover = self._handover, Handover(link, first, on_done)
        self._handover_ready.set()
        if superseded is not None:
            await trio.aclose_forcefully(superseded.link)
            superseded.on_done()
        if self._link is not None:
            self.reset_link(f"replaced by a new connection from {peer}")

    async def _open(self, nursery: trio.Nursery) -> trio.abc.Stream | None:
        self._set_state(State.CONNECTING)
        try:
            link = await open_link(self.config, nursery)
        except LinkError as exc:
            # Repeating the same failure every reconnect_interval would drown the log: say it once.
            level = "DEBUG" if str(exc) == self._last_open_error else "WARNING"
            self._last_open_error = str(exc)
            logger.log(level, "{}: cannot open the device: {}; {}", self.name, exc, self._retry_note())
            self._set_state(State.OFFLINE)
            return None
        self._last_open_error = ""
        self.counters.link_opens += 1
        self.counters.last_connect = datetime.now(UTC)
        self._gave_up = False
        return link

    def _retry_note(self) -> str:
        if self.config.reconnect_interval == 0:
            return "not retrying (reconnect_interval = 0)"
        if self.config.release_port:
            return f"retrying in {self.config.reconnect_interval:g} s while a client waits"
        return f"retrying in {self.config.reconnect_interval:g} s"

    async def _serve_link(self, link: trio.abc.Stream, first: bytes = b"") -> str | None:
        """Reads the link until it is lost (returns why) or closed on purpose (returns None)."""
        self._link = link
        self._fresh, self._held = self.dialin is not None, bytearray(first)
        self._last_received = trio.current_time()
        self._link_scope = scope = trio.CancelScope()
        self._link_close_reason = None
        # With release_port an open per client is routine, not news.
        opened = "" if self.config.release_port else f"{self.config.describe()} opened"
        self._set_state(State.BUSY if self.holder else State.IDLE, opened)
        self._notify()
        lost: str | None = None
        try:
            with scope:
                lost = await self._read(link)
        finally:
            self._link = None
            self._link_scope = None
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(link)
            self.counters.last_disconnect = datetime.now(UTC)
            if scope.cancelled_caught:
                lost = self._link_close_reason
            if lost is not None:
                self.counters.link_losses += 1
                if self.holder is not None:
                    self.holder.end(f"disconnected: link lost ({lost})")
            self._notify()
        return lost

    async def _read(self, link: trio.abc.Stream) -> str:
        """Passes what the device sends to the current lease; returns why the link ended."""
        counters = self.counters
        receive = wire.reader(link, READ_SIZE)
        while True:
            try:
                data = await receive()
            except BROKEN as exc:
                return f"read failed: {exc}"
            if not data:
                return "end of file"
            counters.bytes_from_device += len(data)
            self._last_received = trio.current_time()
            lease = self.holder
            if lease is None and self._fresh and len(self._held) + len(data) <= HELD_LIMIT:
                self._held += data
                continue
            if lease is None:
                counters.unsolicited_bytes += len(data)
                self._notify()
                logger.debug(
                    "{}: {} bytes from the device with no client holding it, dropped: {}",
                    self.name,
                    len(data),
                    log.hexdump(data, 32),
                )
                continue
            if self.tracing:
                logger.trace("{}: device -> {}: {}", self.name, lease.client, log.hexdump(data))
            await lease._deliver(data)

    def check_silence(self, now: float) -> None:
        """A dial-in device's silence: a ping after ping_after (when nobody holds it), closed after disconnect_after.

        The dial-in server calls this for every device once a tick, which spares each device a task.
        """
        dialin, link = self.dialin, self._link
        if dialin is None or link is None:
            return
        quiet_since = self._last_received
        silent = now - quiet_since
        if silent >= dialin.disconnect_after:
            self.reset_link(f"silent for disconnect_after = {dialin.disconnect_after:g} s")
            return
        if silent >= dialin.idle_after and self._idle_logged != quiet_since:
            self._idle_logged = quiet_since
            logger.debug("{}: idle (silent for {:.0f} s)", self.name, silent)
        if dialin.ping_after and silent >= dialin.ping_after and self._pinged != quiet_since and self.holder is None:
            self._pinged = quiet_since
            try:
                sent = os.write(wire.fileno(link), dialin.ping_bytes)
            except OSError as exc:
                self.reset_link(f"ping failed: {exc.strerror or exc}")
                return
            self.counters.bytes_to_device += sent
            logger.debug("{}: silent for {:.0f} s; ping sent", self.name, silent)

    def reset_link(self, reason: str) -> None:
        """Closes the link as failed, so a late answer cannot reach the next client; it is reopened."""
        self._close_link(reason)

    def _release_link(self) -> None:
        """release_port: closes the link on purpose after a lease."""
        self._close_link(None)

    def _close_link(self, reason: str | None) -> None:
        if self._link_scope is not None:
            self._link_close_reason = reason
            self._link_scope.cancel()
            # No lease may start on a link that is being closed: from now on waiters wait for the next.
            self._link = None

    def _notify(self) -> None:
        # Created only when someone waits: most changes (two a lease) have no observer.
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def changed(self) -> None:
        """Returns at the next change of state, holder, waiters, clients, refusals or dropped bytes."""
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    def client_connected(self) -> None:
        self.clients += 1
        self._notify()

    def client_disconnected(self) -> None:
        self.clients -= 1
        self._notify()

    def count_exchange(self, result: str, seconds: float) -> None:
        self.counters.exchanges[result.split(" (")[0]] += 1
        if result != "refused":
            self.counters.exchange_seconds.observe(seconds)
        self._notify()

    def count_refusal(self, reason: str) -> None:
        self.counters.refused[reason] += 1
        self._notify()

    def _set_state(self, state: State, why: str = "") -> None:
        if state != self.state and why:
            # A dial-in device that goes away is routine (it calls again); a configured one is news.
            trouble = state == State.OFFLINE and self.dialin is None
            retry = f"; {self._retry_note()}" if trouble else ""
            logger.log("WARNING" if trouble else "INFO", "{}: {}{}", self.name, why, retry)
        self.state = state
        self._notify()

    # -- leases ----------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, client: str, sink: Sink, *, log_level: str = "INFO") -> AsyncIterator[Lease]:
        """Waits up to acquire_timeout for the device, in arrival order, and holds it while inside.

        `sink` receives every byte the device sends during the lease; `log_level` is that of the lines
        saying who holds it (DEBUG for exchange sharing, where a lease lasts one exchange). Raises
        Refused("busy") when another client kept the device for the whole wait, Refused("offline")
        when the link was down.
        """
        lease = Lease(self, client, sink, log_level)
        started = trio.current_time()
        if self._lock.value and self._link is not None and not self.config.release_port:
            # Free and open: nothing to wait for, so no timer and no scheduling round.
            self._lock.acquire_nowait()
            self._discard_stale(self._link)
        else:
            try:
                await self._wait_for_lease()
            except Refused:
                self.counters.lock_wait_seconds.observe(trio.current_time() - started)
                raise
        if self._fresh:
            await self._hand_over_held(lease)
        self.holder = lease
        lease._link = self._link
        lease._link_fd = wire.fileno(self._link) if self._link is not None else -1
        lease.last_activity = trio.current_time()
        self.counters.leases_granted += 1
        self._set_state(State.BUSY)
        waited = trio.current_time() - started
        self.counters.lock_wait_seconds.observe(waited)
        logger.log(log_level, "{}: {} holds the device (waited {:.2f} s)", self.name, client, waited)
        try:
            yield lease
        finally:
            lease.release()

    def _release(self, lease: Lease) -> None:
        """Ends `lease` and hands the device to the next waiter; any task may call it, once."""
        self.holder = None
        if self._link is not None:
            self._set_state(State.IDLE)
        if self.config.release_port:
            self._end_demand()
            self._release_link()
        self._lock.release()
        self._notify()
        logger.log(lease.log_level, "{}: {} released the device", self.name, lease.client)

    async def _wait_for_lease(self) -> None:
        """Waits, in arrival order, for the lock and an open link; Refused after acquire_timeout."""
        holding = granted = False
        self.waiting += 1
        self._notify()
        try:
            with trio.move_on_after(self.config.acquire_timeout):
                # acquire_nowait() first, so that acquire_timeout = 0 still takes a free device.
                try:
                    self._lock.acquire_nowait()
                except trio.WouldBlock:
                    await self._lock.acquire()
                holding = True
                granted = await self._wait_for_link()
        finally:
            self.waiting -= 1
            self._notify()
            if holding and not granted:
                self._end_demand()
                self._lock.release()
        if not granted:
            raise self._refusal()

    async def _wait_for_link(self) -> bool:
        """With the lock held: waits for an open link and empties it of stale bytes."""
        if self.config.release_port:
            self._gave_up = False
            self._demand.set()
        while (link := self._link) is None:
            if self._gave_up:
                return False
            await self.changed()
        self._discard_stale(link)
        return True

    async def _hand_over_held(self, lease: Lease) -> None:
        """The first lease on a new dial-in connection gets what the device sent before anyone held it."""
        while self._held:
            held, self._held = bytes(self._held), bytearray()
            await lease._deliver(held)
        # No checkpoint from here to the lease's start: the reader cannot slip a chunk in between.
        self._fresh = False

    def _discard_stale(self, link: trio.abc.Stream) -> None:
        if self._fresh:
            return
        # The reader decides whose bytes are whose the moment they leave the kernel (wire.reader has
        # no scheduling point after its read), so what is still in the kernel now is stale.
        dropped = discard_input(link)
        if dropped:
            self.counters.unsolicited_bytes += dropped
            self._notify()
            logger.debug("{}: dropped {} stale bytes before the next lease", self.name, dropped)

    def _end_demand(self) -> None:
        if self.config.release_port:
            self._demand = trio.Event()

    def _refusal(self) -> Refused:
        if self._link is None:
            reason, detail = "offline", f"{self.config.describe()} is {self.state}"
        elif self.holder is not None:
            reason, detail = "busy", f"held by {self.holder.client}"
        else:
            reason, detail = "busy", "other clients were waiting first"
        self.count_refusal(reason)
        return Refused(reason, detail)
