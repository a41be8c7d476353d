"""The dial-in server: accepts device connections, identifies them, and hands each to its device."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from loguru import logger

from proxy import log
from proxy.clients import peer_name
from proxy.config import DialinConfig
from proxy.device import Device
from proxy.dialin.identify import IdentifyFailed, identify
from proxy.dialin.registry import Registry

# Bytes counted by the devices reach the registry this often, not per chunk.
FLUSH_INTERVAL = 10.0


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

    async def serve(
        self, listeners: list[trio.SocketListener], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accepts devices until cancelled. Error handling: a device's trouble ends that connection only;
        accept errors such as EMFILE make trio's accept loop pause, not spin."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_traffic)
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started()

    async def _connection(self, stream: trio.SocketStream) -> None:
        peer = peer_name(stream)
        if self.connected >= self.config.max_devices:
            logger.warning("dialin: {} refused: max_devices = {} connected", peer, self.config.max_devices)
            return
        self.connected += 1
        try:
            await self._serve(stream, peer)
        finally:
            self.connected -= 1

    async def _serve(self, stream: trio.SocketStream, peer: str) -> None:
        timeout = self.config.identify_timeout
        try:
            with trio.fail_after(timeout):
                device_id, first = await identify(stream, self.config)
        except trio.TooSlowError:
            logger.info("dialin: {} did not identify within identify_timeout = {:g} s; closed", peer, timeout)
            return
        except IdentifyFailed as exc:
            logger.info("dialin: {} did not identify ({}); sent: {}; closed", peer, exc, log.hexdump(exc.sent, 64))
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.info("dialin: {} went away while identifying: {}", peer, exc)
            return
        device = await self._lookup(device_id, peer)
        if device is None:
            return
        logger.info("dialin: {} is {} ({})", peer, device_id, device.name)
        await self.registry.run(self.registry.connected, device_id, peer)
        try:
            await device.attach(stream, first, peer)
        finally:
            with trio.CancelScope(shield=True):
                await self.registry.run(self.registry.disconnected, device_id)

    async def _flush_traffic(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        """Adds the bytes each device moved since the last flush to its registry totals."""
        updates = []
        for device in self._devices():
            counters = device.counters
            done_to, done_from = self._flushed.get(device.config.path, (0, 0))
            if counters.bytes_to_device < done_to or counters.bytes_from_device < done_from:
                done_to = done_from = 0  # the device was restarted (a reload): its counters began anew
            if (counters.bytes_to_device, counters.bytes_from_device) != (done_to, done_from):
                updates.append(
                    (device.config.path, counters.bytes_to_device - done_to, counters.bytes_from_device - done_from)
                )
                self._flushed[device.config.path] = (counters.bytes_to_device, counters.bytes_from_device)
        if updates:
            await self.registry.run(self.registry.add_traffic, updates)
