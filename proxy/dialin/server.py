"""The dial-in server: accepts device connections, identifies them, and hands each to its device."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable

import trio
from loguru import logger

from proxy import accept, log, tls
from proxy.clients import peer_name
from proxy.config import DialinConfig
from proxy.device import Device, Handover
from proxy.dialin.identify import IdentifyFailed, identify
from proxy.dialin.registry import Event, Record, Registry, RegistryError

# New devices' rows, connects, disconnects and bytes reach the registry this often, in one transaction,
# not one by one. A crash loses what came since the last flush: no port of it goes to another device
# (see proxy/dialin/registry.py), but a device registered meanwhile registers again, on a new port.
FLUSH_INTERVAL = 1.0
# The cyclic garbage collector's thresholds while dial-in devices are served. CPython's default (700, 10,
# 10) walks the young objects every 700 allocations and the whole heap each time it has grown by a
# quarter, and thousands of dial-in devices are hundreds of thousands of long-lived objects: in a burst
# of 9,000 registrations the collector took 3.3 of the proxy's 8.6 s of CPU, with these about 0.5 s.
# Cyclic garbage waits longer for its collection; reference counting still frees everything else at once.
GC_THRESHOLDS = (100_000, 50, 100)


class DialinServer:
    """Identifies devices that connect in and attaches each to its Device (found or registered by `lookup`)."""

    def __init__(
        self,
        config: DialinConfig,
        registry: Registry,
        lookup: Callable[[str, str], Awaitable[Device | None]],
        devices: Callable[[], list[Device]],
    ) -> None:
        self.config = config
        self.registry = registry
        self._lookup = lookup
        self._devices = devices
        self.connected = 0
        self._flushed: dict[str, tuple[int, int]] = {}
        self._events: list[Event] = []
        # Why the last flush failed, while the registry cannot be written.
        self._failing: str | None = None
        self.identifying = 0
        self._accepted = 0

    async def serve(
        self, listeners: list[trio.SocketListener], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accepts devices until cancelled. Error handling: a device's trouble ends that connection only;
        accept errors such as EMFILE make the accept loop pause, not spin."""
        collecting = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            # Containment: one device's connection (and a ping) fails alone (_connection, the sharing
            # modes); a failing flush is retried (flush); only a bug of the server itself ends this
            # nursery, which is logged, and the configured devices and direct ports keep running.
            async with trio.open_nursery() as nursery:
                if self.registry.held:
                    logger.warning(
                        "dialin: direct ports {} were reserved by a run that stopped before writing their devices; "
                        "they stay held back, so that no client of a lost device reaches another one. That run's "
                        "log names the device of each ('registered ID with direct port PORT'): with the proxy "
                        "stopped, `devproxy devices add ID --port PORT` gives it back (after `devproxy devices "
                        "remove ID` if the device registered again since)",
                        ", ".join(map(str, sorted(self.registry.held))),
                    )
                nursery.start_soon(self._flush_periodically)
                nursery.start_soon(self._check_silence, nursery)
                await nursery.start(accept.serve_listeners, self._connection, listeners)
                task_status.started()
        except Exception:
            logger.exception("dialin: the dial-in server failed; devices cannot connect until a restart")
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await self.flush()
                    await self._release_reservations()
            finally:
                gc.set_threshold(*collecting)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """Identifies one device and hands its connection over; closes it on any failure."""
        peer = peer_name(stream)
        self._accepted += 1
        order = self._accepted
        handed_over = False
        try:
            # Connections still identifying count too: a flood of silent connections is refused as well.
            if self.connected + self.identifying >= self.config.max_devices:
                logger.warning(
                    "dialin: {} refused: max_devices = {} connected",
                    peer,
                    self.config.max_devices,
                    peer=peer,
                    event="refused",
                    reason="max_devices",
                )
                return
            self.identifying += 1
            try:
                handed_over = await self._identify_and_attach(stream, peer, order)
            except Exception:
                logger.exception("dialin: {}: unexpected error; connection closed", peer, peer=peer, event="error")
            finally:
                self.identifying -= 1
        finally:
            if not handed_over:
                await trio.aclose_forcefully(stream)

    async def _identify_and_attach(self, stream: trio.abc.Stream, peer: str, order: int) -> bool:
        if isinstance(stream, trio.SSLStream):
            try:
                await tls.handshake(stream)
            except tls.HandshakeFailed as exc:
                logger.info(
                    "dialin: {} refused: TLS handshake failed: {}", peer, exc, peer=peer, event="refused", reason="tls"
                )
                return False
        timeout = self.config.identify_timeout
        try:
            with trio.fail_after(timeout):
                device_id, first = await identify(stream, self.config)
        except trio.TooSlowError:
            logger.info(
                "dialin: {} did not identify within identify_timeout = {:g} s; closed",
                peer,
                timeout,
                peer=peer,
                event="identify_failed",
            )
            return False
        except IdentifyFailed as exc:
            logger.info(
                "dialin: {} did not identify ({}); sent: {}; closed",
                peer,
                exc,
                log.hexdump(exc.sent, 64),
                peer=peer,
                event="identify_failed",
            )
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.info("dialin: {} went away while identifying: {}", peer, exc, peer=peer, event="identify_failed")
            return False
        device = await self._lookup(device_id, peer)
        if device is None:
            return False
        logger.info(
            "dialin: {} is {} ({})", peer, device_id, device.name, device=device.name, peer=peer, event="identified"
        )
        self.connected += 1
        self._events.append(Event(device_id, True, peer))

        def done() -> None:
            self.connected -= 1
            self._events.append(Event(device_id, False))

        await device.attach(Handover(stream, first, done, order), peer)
        return True

    async def _check_silence(self, nursery: trio.Nursery) -> None:
        config = self.config
        tick = min(1.0, config.disconnect_after / 4, config.idle_after / 2, (config.ping_after or 2.0) / 2)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for device in self._devices():
                device.check_silence(now, nursery)

    async def _flush_periodically(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except Exception:
                logger.exception("dialin: writing the registry failed unexpectedly; retrying")

    async def flush(self) -> None:
        """Writes the rows of the devices registered since the last flush, their connects and
        disconnects, and the bytes each device moved.

        Error handling: when the registry cannot be written, everything is kept for the next flush
        (events up to [dialin] max_pending_writes) and the failure is logged once, then its end; the devices
        registered meanwhile keep serving. A registry file deleted while the proxy runs is made again
        with every device the proxy knows.
        """
        registry = self.registry
        rows, events = registry.take_unwritten(), self._events
        self._events = []
        updates, done = self._traffic()
        try:
            if await registry.run(registry.replaced):
                await registry.run(registry.recreate, list(registry.known.values()), registry.reservations())
                logger.error(
                    "dialin: registry {} was deleted or replaced while the proxy ran; made it again with the {} "
                    "devices this proxy knows",
                    registry.path,
                    len(registry.known),
                )
            if rows or events or updates:
                await registry.run(registry.write, rows, events, updates)
        except RegistryError as exc:
            self._keep(rows, events)
            if self._failing is None:
                logger.error("dialin: cannot write the registry: {}; keeping its updates and retrying", exc)
            self._failing = str(exc)
            return
        except BaseException:
            # A cancellation too: the last flush, shielded, writes them.
            self._keep(rows, events)
            raise
        self._flushed.update(done)
        if self._failing is not None:
            logger.info("dialin: the registry is written again")
            self._failing = None

    def _keep(self, rows: list[Record], events: list[Event]) -> None:
        """Puts what a flush could not write back in front, for the next one."""
        self.registry.put_back(rows)
        self._events[:0] = events
        if len(self._events) > self.config.max_pending_writes:
            dropped = len(self._events) - self.config.max_pending_writes
            del self._events[:dropped]
            logger.error("dialin: registry still failing; dropped the {} oldest connect/disconnect events", dropped)

    async def _release_reservations(self) -> None:
        """Frees the direct ports reserved ahead and never handed out, as the proxy stops."""
        unused = self.registry.unused_reservations()
        if not unused:
            return
        try:
            await self.registry.run(self.registry.release, unused)
        except RegistryError as exc:
            logger.error(
                "dialin: cannot free the {} direct ports reserved ahead ({}); the next start holds them back",
                len(unused),
                exc,
            )

    def _traffic(self) -> tuple[list[tuple[str, int, int]], dict[str, tuple[int, int]]]:
        """(id, bytes to device, bytes from device) moved since the last flush, and the totals then flushed."""
        updates, done = [], {}
        for device in self._devices():
            counters = device.counters
            done_to, done_from = self._flushed.get(device.config.path, (0, 0))
            if counters.bytes_to_device < done_to or counters.bytes_from_device < done_from:
                done_to = done_from = 0  # the device was restarted (a reload): its counters began anew
            totals = (counters.bytes_to_device, counters.bytes_from_device)
            if totals != (done_to, done_from):
                updates.append((device.config.path, totals[0] - done_to, totals[1] - done_from))
                done[device.config.path] = totals
        return updates, done
