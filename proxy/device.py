"""Device: the one owner of a link to a device: it opens the link (or takes it from the dial-in server),
reads it, writes it in order, and lends it to clients through its sharing mode."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import attrs
import trio
from loguru import logger

from proxy import log, protocols, wire
from proxy.config import DeviceConfig, DialinConfig
from proxy.counters import ExchangeResult, counters_for
from proxy.events import DEVICE_EVENTS, DIALIN_EVENTS, Direction, EventRing, Kind, Traffic
from proxy.line_control import LineControl
from proxy.links import LinkError, discard_input, open_link

if TYPE_CHECKING:
    from proxy.dialin.forward import Holder
    from proxy.sharing import Sharing

# A raw byte path passes chunks on as they come; a framed one feeds them to a framer first, and a
# smaller read bounds how long one hostile chunk can hold the event loop (bench/framers.py: about
# 1 MB/s on the worst input, so 16 ms for a device's chunk, 4 ms for a client's; requests are small).
RAW_READ_SIZE = 65536
FRAMED_READ_SIZE = 16384
FRAMED_CLIENT_READ_SIZE = 4096
# What a newly connected dial-in device may send before the first client takes it, kept for that client.
HELD_LIMIT = 65536
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class State(enum.StrEnum):
    OFFLINE = "offline"
    CONNECTING = "connecting"
    IDLE = "idle"
    BUSY = "busy"
    # The device may still be answering a client that left, or a request whose answer is late: nobody
    # else gets it until the answer is complete or exchange_timeout has passed.
    SETTLING = "settling"
    # release_port: the link is closed until a client wants it, and its last open did not fail.
    CLOSED = "closed"


UP_STATES = frozenset((State.IDLE, State.BUSY, State.SETTLING))


class Refused(Exception):
    """A client did not get the device; `reason` is "busy" or "offline"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class LinkLost(Exception):
    """The link to the device is gone, or broke during a write."""


@attrs.define(eq=False)
class Handover:
    """A dial-in connection on its way from the dial-in server to its device."""

    link: trio.abc.Stream
    first: bytes
    on_done: Callable[[], None]
    # The order in which the dial-in server accepted the connection: the newest one serves.
    order: int = 0


class Device:
    """A device: keeps its link open (or takes it from the dial-in server), reads it, and lends it to
    clients as its sharing mode says (proxy.sharing).

    Only the reader task started by run() reads the link, and it hands every chunk to the sharing mode
    at the moment it left the kernel; every write goes through write(), in order. Bytes the device sends
    while nobody is owed anything are logged and dropped. (The first client of a newly connected dial-in
    device is the exception: it gets what the device sent before anyone held it.)
    """

    # Thousands of dial-in devices: no per-instance dictionary.
    __slots__ = (
        "_changed",
        "_demand",
        "_handover",
        "_handover_ready",
        "_idle_logged",
        "_last_open_error",
        "_last_received",
        "_line_rate",
        "_link",
        "_link_close_reason",
        "_link_scope",
        "_outlet",
        "_pinged",
        "_serving_order",
        "client_read_size",
        "clients",
        "config",
        "counters",
        "debugging",
        "dialin",
        "elsewhere",
        "events",
        "fresh",
        "gave_up",
        "held",
        "last_error",
        "line",
        "name",
        "peer",
        "protocol",
        "read_size",
        "sharing",
        "state",
        "tracing",
        "traffic",
    )

    def __init__(self, config: DeviceConfig, dialin: DialinConfig | None = None) -> None:
        from proxy.sharing import for_device

        self.config = config
        self.name = config.name
        self.protocol = protocols.get(config.protocol)
        self.state = State.OFFLINE
        self.counters = counters_for(config.metrics_histograms)
        self.clients = 0
        log.device_level(self.name, config.log_level)
        self.follow_log_level()
        # Set while a status page watches the traffic: the byte path checks it and does nothing else.
        self.traffic: Traffic | None = None
        self.events = EventRing(DIALIN_EVENTS if dialin is not None else DEVICE_EVENTS)
        # When and why the link last failed to open or was lost, for the status page's last-error column.
        self.last_error: tuple[float, str] | None = None
        framed = config.protocol != "raw"
        self.read_size = FRAMED_READ_SIZE if framed else RAW_READ_SIZE
        self.client_read_size = FRAMED_CLIENT_READ_SIZE if framed else RAW_READ_SIZE
        self._link: trio.abc.Stream | None = None
        self._outlet: wire.Outlet | None = None
        # The rate an IEC 61107 session agreed, while the line runs at it (None: the sign-on rate).
        self._line_rate: int | None = None
        self._link_scope: trio.CancelScope | None = None
        # Why the link was closed from inside the proxy: a reason, or None when closed on purpose.
        self._link_close_reason: str | None = None
        # Set on every change an observer can see (state, holder, waiters, clients, refusals, dropped
        # bytes), and created only when someone waits for one. Not set per forwarded chunk.
        self._changed: trio.Event | None = None
        # release_port: set while a client wants the link opened.
        self._demand = trio.Event()
        # reconnect_interval = 0 and the last open failed: waiters are refused at once.
        self.gave_up = False
        self._last_open_error = ""
        # Dial-in devices: their links are handed in by the dial-in server (attach()), not opened.
        self.dialin = dialin
        # A dial-in device in a shared registry: where its clients go while another instance holds it
        # (proxy.dialin.cluster), or None there.
        self.elsewhere: Callable[[], Holder | None] | None = None
        self.peer: str | None = None
        self._handover: Handover | None = None
        self._handover_ready = trio.Event()
        self._serving_order = -1
        # Until the first client of a newly connected dial-in device, what it sends is kept for it.
        self.fresh = False
        self.held = bytearray()
        self._last_received = 0.0
        self._pinged = self._idle_logged = -1.0
        self.sharing: Sharing = for_device(self)
        # The serial line's settings: the configured ones, or an RFC 2217 holder's (proxy.telnet_stream).
        self.line = LineControl(self)

    def follow_log_level(self) -> None:
        """Takes the device's log level anew (its own log_level, or [proxy]'s after a reload): the byte
        path checks `tracing`, and a line per exchange `debugging`, before formatting anything."""
        self.tracing = log.tracing(self.config.log_level)
        self.debugging = log.debugging(self.config.log_level)

    @property
    def link_up(self) -> bool:
        return self._link is not None

    @property
    def holder(self) -> str | None:
        """Who has the device now (a client's address), for the status page and the disconnect API."""
        return self.sharing.holder

    @property
    def waiting(self) -> int:
        """Clients (session) or requests (exchange) waiting for the device."""
        return self.sharing.waiting

    # -- the supervisor --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keeps the link open (or opens it per client with release_port) until cancelled.

        Error handling: a link that cannot be opened or is lost is logged and retried every
        reconnect_interval seconds; 0 means never retry. Anything else raised here is a bug, which the
        caller contains (proxy.app restarts the supervisor after a pause).
        """
        self.follow_log_level()
        # A nursery only where something runs beside the link (a simulator, the exchange clock): a
        # thousand dial-in devices make every nursery count. Containment: a simulator contains its own
        # failures (links.simulator); anything else that fails here is a bug, contained by the caller,
        # which restarts this supervisor; the clients' tasks live elsewhere and stay.
        if self.dialin is not None and not self.sharing.needs_task:
            task_status.started()
            await self._run_dialin()
            return
        async with trio.open_nursery() as nursery:
            if self.sharing.needs_task:
                nursery.start_soon(self.sharing.run)
            task_status.started()
            if self.dialin is not None:
                await self._run_dialin()
            else:
                await self._run_configured(nursery)

    async def _run_configured(self, nursery: trio.Nursery) -> None:
        while True:
            if self.config.release_port:
                if not self._last_open_error:
                    self._set_state(State.CLOSED)
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
            self.gave_up = True
            self.sharing.gave_up()
            self._notify()
            if not self.config.release_port:
                await trio.sleep_forever()
            self._demand = trio.Event()

    async def _run_dialin(self) -> None:
        """A dial-in device: serves each connection the dial-in server hands in, until the next one."""
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
                self._handover = None

    async def attach(self, handover: Handover, peer: str) -> None:
        """A dial-in device connected on handover.link; handover.first is what it sent after its id.

        Resource handling: the device owns the link from now on and closes it when it is lost, replaced
        or the device stops; then it calls handover.on_done(). Of several connections for one device,
        the newest (in accept order, however their identification raced) serves: an older one already
        open is closed, its client disconnected; one older than the one serving is closed at once.
        """
        if handover.order < self._serving_order:
            logger.info(
                "{}: a connection older than the one serving ({}) closed",
                self.name,
                peer,
                device=self.name,
                peer=peer,
                event="connection_superseded",
            )
            handover.on_done()
            await trio.aclose_forcefully(handover.link)
            return
        self._serving_order = handover.order
        self.peer = peer
        superseded, self._handover = self._handover, handover
        self._handover_ready.set()
        if self._link is not None:
            self.reset_link(f"replaced by a new connection from {peer}")
        if superseded is not None:
            superseded.on_done()
            await trio.aclose_forcefully(superseded.link)

    async def _open(self, nursery: trio.Nursery) -> trio.abc.Stream | None:
        self._set_state(State.CONNECTING)
        try:
            link = await open_link(self.config, nursery)
        except LinkError as exc:
            # Repeating the same failure every reconnect_interval would drown the log: say it once.
            level = "DEBUG" if str(exc) == self._last_open_error else "WARNING"
            if level == "WARNING":
                self.events.record(Kind.OPEN_FAILED, str(exc))
            self.last_error = (time.time(), str(exc))
            self._last_open_error = str(exc)
            logger.log(
                level,
                "{}: cannot open the device: {}; {}",
                self.name,
                exc,
                self._retry_note(),
                device=self.name,
                event="open_failed",
            )
            self._set_state(State.OFFLINE)
            return None
        self._last_open_error = ""
        self.counters.link_opens += 1
        self.counters.last_connect = datetime.now(UTC)
        self.gave_up = False
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
        self._outlet = wire.Outlet(link)
        self._line_rate = None
        self.line.link_opened(link)
        # Held bytes are for the first client of a session; requests of exchange sharing own no such thing.
        self.fresh, self.held = self.dialin is not None and self.config.sharing == "session", bytearray(first)
        self._last_received = trio.current_time()
        self._link_scope = scope = trio.CancelScope()
        self._link_close_reason = None
        # With release_port an open per client is routine, not news.
        opened = "" if self.config.release_port else f"{self.config.describe()} opened"
        self.events.record(Kind.LINK_OPEN, f"from {self.peer}" if self.dialin is not None else self.config.describe())
        self._set_state(State.IDLE, opened)
        self.sharing.link_up()
        lost: str | None = None
        try:
            with scope:
                lost = await self._read(link)
        finally:
            self._link = None
            self.line.link_closed()
            self._outlet.close()
            self._link_scope = None
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(link)
            self.counters.last_disconnect = datetime.now(UTC)
            if scope.cancelled_caught:
                lost = self._link_close_reason
            if lost is not None:
                self.counters.link_losses += 1
                self.events.record(Kind.LINK_LOST, lost)
                self.last_error = (time.time(), lost)
            else:
                self.events.record(Kind.LINK_CLOSED)
            self.sharing.link_down(lost)
            self._notify()
        return lost

    async def _read(self, link: trio.abc.Stream) -> str:
        """Hands what the device sends to the sharing mode; returns why the link ended."""
        counters, sharing = self.counters, self.sharing
        receive = wire.reader(link, self.read_size)
        while True:
            try:
                data = await receive()
            except BROKEN as exc:
                return f"read failed: {exc}"
            if not data:
                return "end of file"
            counters.bytes_from_device += len(data)
            self._last_received = now = trio.current_time()
            if self.tracing:
                holder = sharing.holder
                logger.trace(
                    "{}: device -> {}",
                    self.name,
                    holder or "nobody",
                    device=self.name,
                    client=holder,
                    direction=log.FROM_DEVICE,
                    **log.wire_bytes(data),
                )
            if self.traffic is not None:
                self.traffic.publish(Direction.FROM_DEVICE, sharing.holder, data)
            if self.fresh and sharing.holder is None:
                if len(self.held) + len(data) <= HELD_LIMIT:
                    self.held += data
                    continue
                self.fresh = False
            await sharing.device_bytes(data, now)

    # -- writing, and what is dropped --------------------------------------------------------------

    async def write(self, data: bytes, deadline: float, source: str) -> None:
        """Writes `data` to the device after every write that began before it, by `deadline`.

        Error handling: LinkLost when there is no link or it breaks (the link is then reset);
        trio.TooSlowError at the deadline, which the caller answers (usually by resetting the link).
        """
        outlet = self._outlet
        if outlet is None or self._link is None:
            raise LinkLost("the link is down")
        if self.tracing:
            logger.trace(
                "{}: {} -> device",
                self.name,
                source,
                device=self.name,
                client=source,
                direction=log.TO_DEVICE,
                **log.wire_bytes(data),
            )
        if self.traffic is not None:
            self.traffic.publish(Direction.TO_DEVICE, source, data)
        try:
            await outlet.send(data, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.reset_link(f"write failed: {exc}")
            raise LinkLost(f"write failed: {exc}") from None
        self.counters.bytes_to_device += len(data)

    async def follow_line_rate(self, rate: int | None) -> None:
        """IEC 61107 mode C on a serial line: after the host's option select has left, the line takes the
        rate it agreed; at the session's end (rate None) it returns to the sign-on rate."""
        if not self.config.switches_baud or rate == self._line_rate or self._link is None:
            return
        link, self._line_rate = self._link, rate
        target = rate or self.config.iec_signon_baudrate
        try:
            await link.set_line_rate(target)
        except (trio.BrokenResourceError, ValueError) as exc:
            self.reset_link(f"cannot switch to {target} baud: {exc}")
            return
        logger.debug("{}: line at {} baud", self.name, target, device=self.name, event="line_rate")

    def unsolicited(self, data: bytes) -> None:
        """Bytes from the device while nobody was owed anything: logged and dropped."""
        self.counters.unsolicited_bytes += len(data)
        self._notify()
        if not self.debugging:
            return  # a chatty device sends this every chunk: no hex unless someone reads it
        logger.debug(
            "{}: {} bytes from the device with no client holding it, dropped: {}",
            self.name,
            len(data),
            log.hexdump(data, 32),
            device=self.name,
            event="unsolicited",
            size=len(data),
        )

    def discarded(self, data: bytes, whose: str) -> None:
        """Bytes of an answer whose client is gone (or after a timeout): counted, logged, dropped."""
        self.counters.discarded_bytes += len(data)
        self._notify()
        if not self.debugging:
            return
        logger.debug(
            "{}: {} bytes of the answer for {} dropped: {}",
            self.name,
            len(data),
            whose,
            log.hexdump(data, 32),
            device=self.name,
            event="discarded",
            size=len(data),
        )

    def discard_stale(self) -> None:
        """Drops what is still in the kernel before a new client's turn: it was nobody's answer.

        The reader gives every chunk to its owner the moment it leaves the kernel (wire.reader has no
        scheduling point after its read), so what is still there now arrived after the last owner's
        answer was complete.
        """
        if self._link is None or self.fresh:
            return
        dropped = discard_input(self._link)
        if dropped:
            self.counters.unsolicited_bytes += dropped
            self._notify()
            logger.debug(
                "{}: dropped {} stale bytes before the next client",
                self.name,
                dropped,
                device=self.name,
                event="stale_dropped",
                size=dropped,
            )

    # -- the link's lifecycle ----------------------------------------------------------------------

    def reset_link(self, reason: str) -> None:
        """Closes the link as failed; it is reopened (a dial-in device's, when it calls again).

        A reset settles nothing: reopening a serial port does not stop a device that is answering, and a
        "TCP device" may be a serial-to-TCP converter whose register answers on the next connection.
        """
        self._close_link(reason)

    def release_link(self) -> None:
        """release_port: closes the link on purpose when nobody needs it."""
        self._demand = trio.Event()
        if self._link is not None:
            self._close_link(None)
            self._set_state(State.CLOSED)

    def demand_link(self) -> None:
        """release_port: a client wants the link; the supervisor opens it."""
        self.gave_up = False
        self._demand.set()

    def _close_link(self, reason: str | None) -> None:
        # The first reason is the one to log: a write that fails because the link is closing says less.
        if self._link_scope is not None and self._link is not None:
            self._link_close_reason = reason
            self._link_scope.cancel()
            # Nobody may start on a link that is being closed: from now on clients wait for the next.
            self._link = None

    def check_silence(self, now: float, nursery: trio.Nursery) -> None:
        """A dial-in device's silence: a ping after ping_after (when nobody holds it), closed after disconnect_after.

        The dial-in server calls this for every device once a tick, which spares each device a task; a
        ping that needs to wait for its answer runs in `nursery`.
        """
        dialin = self.dialin
        if dialin is None or self._link is None:
            return
        quiet_since = self._last_received
        silent = now - quiet_since
        if silent >= dialin.disconnect_after:
            self.reset_link(f"silent for disconnect_after = {dialin.disconnect_after:g} s")
            return
        if silent >= dialin.idle_after and self._idle_logged != quiet_since:
            self._idle_logged = quiet_since
            logger.debug("{}: idle (silent for {:.0f} s)", self.name, silent, device=self.name, event="idle")
        due = dialin.ping_after and silent >= dialin.ping_after and self._pinged != quiet_since
        if due and self.sharing.ping(dialin.ping_bytes, nursery):
            self._pinged = quiet_since
            logger.debug("{}: silent for {:.0f} s; ping sent", self.name, silent, device=self.name, event="ping")

    async def wind_down(self) -> None:
        """Before the device stops: its clients are disconnected, and it settles (at most
        exchange_timeout) so that nothing it is still answering reaches whoever opens it next."""
        self.sharing.stop()
        with trio.move_on_after(self.config.exchange_timeout + self.config.response_timeout):
            while self.sharing.holder is not None and self.link_up:
                await self.changed()

    # -- what observers see ------------------------------------------------------------------------

    def _notify(self) -> None:
        # Created only when someone waits: most changes (two an exchange) have no observer.
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def notify(self) -> None:
        """Something an observer can see changed (a sharing mode's holder or waiters)."""
        self._notify()

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

    def count_exchange(self, result: ExchangeResult, seconds: float) -> None:
        self.counters.exchanges[result] += 1
        if result != ExchangeResult.REFUSED:
            self.counters.exchange_seconds.observe(seconds)
        self._notify()

    def count_refusal(self, reason: str) -> None:
        self.counters.refuse(reason)
        self._notify()

    def refusal(self) -> Refused:
        """Why a client that waited acquire_timeout did not get the device (counted)."""
        if self._link is None:
            reason, detail = "offline", f"{self.config.describe()} is {self.state}"
        elif self.holder is not None:
            reason, detail = "busy", f"held by {self.holder}"
        else:
            reason, detail = "busy", "other clients were waiting first"
        self.count_refusal(reason)
        return Refused(reason, detail)

    def set_state(self, state: State, why: str = "") -> None:
        """A sharing mode's view of a working link: idle, busy or settling."""
        if self._link is not None:
            self._set_state(state, why)

    def _set_state(self, state: State, why: str = "") -> None:
        if state != self.state and why:
            # A dial-in device that goes away is routine (it calls again); a configured one is news.
            trouble = state == State.OFFLINE and self.dialin is None
            retry = f"; {self._retry_note()}" if trouble else ""
            logger.log(
                "WARNING" if trouble else "INFO",
                "{}: {}{}",
                self.name,
                why,
                retry,
                device=self.name,
                event="link_lost" if state == State.OFFLINE else "link_open",
            )
        self.state = state
        self._notify()
