"""serve(settings): the root nursery, with a supervisor and acceptors per device, and the status server."""

from __future__ import annotations

import attrs
import trio
from loguru import logger

from proxy import log
from proxy.clients import serve_clients
from proxy.config import Address, DeviceConfig, Settings
from proxy.device import Device
from proxy.status.server import StatusServer


class BindError(Exception):
    """A listening address could not be bound; nothing was started."""


async def bind(address: Address, owner: str) -> list[trio.SocketListener]:
    """Listeners for `address`; BindError names the owner, the address and the reason."""
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host or None)
    except OSError as exc:
        raise BindError(f"{owner}: cannot listen on {address}: {exc.strerror or exc}") from None


async def _bind_device(config: DeviceConfig) -> list[trio.SocketListener]:
    """All of a device's listeners, or BindError with none of them left open."""
    bound: list[trio.SocketListener] = []
    try:
        for address in config.listen:
            bound += await bind(address, f"device {config.name!r}")
    except BaseException:
        await _close(bound)
        raise
    return bound


async def _close(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await trio.aclose_forcefully(listener)


def _bound_addresses(listeners: list[trio.SocketListener]) -> list[Address]:
    return [Address(*listener.socket.getsockname()[:2]) for listener in listeners]


@attrs.define(eq=False)
class _DeviceRun:
    device: Device
    addresses: list[Address]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stopped: trio.Event = attrs.field(factory=trio.Event)


class Running:
    """The proxy as it runs: its devices, the addresses their clients reach, and reload()."""

    def __init__(self, settings: Settings, nursery: trio.Nursery) -> None:
        self.settings = settings
        self.status: Address | None = None
        self._nursery = nursery
        self._runs: dict[str, _DeviceRun] = {}

    @property
    def devices(self) -> dict[str, Device]:
        return {name: run.device for name, run in self._runs.items()}

    @property
    def addresses(self) -> dict[str, list[Address]]:
        return {name: run.addresses for name, run in self._runs.items()}

    def devices_and_addresses(self) -> dict[str, tuple[Device, list[Address]]]:
        """What the status server shows: every running device with the addresses of its ports."""
        return {name: (run.device, run.addresses) for name, run in self._runs.items()}

    async def start_device(self, config: DeviceConfig, listeners: list[trio.SocketListener]) -> None:
        """Starts a device's supervisor and acceptors; returns once its ports accept clients."""
        run = _DeviceRun(Device(config), _bound_addresses(listeners))
        await self._nursery.start(self._run_device, run, listeners)
        self._runs[config.name] = run
        logger.info(
            "{}: {} ({}, {} sharing) on {}",
            config.name,
            config.describe(),
            config.protocol,
            config.sharing,
            ", ".join(map(str, run.addresses)),
        )

    async def _run_device(
        self, run: _DeviceRun, listeners: list[trio.SocketListener], *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            with run.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(run.device.run)
                    await nursery.start(serve_clients, run.device, listeners)
                    task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await _close(listeners)
            run.stopped.set()

    async def stop_device(self, name: str) -> None:
        """Closes a device's clients, link and ports, and waits until they are all closed."""
        run = self._runs.pop(name)
        run.scope.cancel()
        await run.stopped.wait()

    async def _restore(self, config: DeviceConfig) -> None:
        try:
            await self.start_device(config, await _bind_device(config))
        except BindError as exc:
            logger.error("{}; {} stays stopped until the next reload", exc, config.name)

    async def reload(self, settings: Settings) -> None:
        """Applies new settings: devices added are started, removed ones stopped, changed ones restarted.

        Devices whose configuration did not change keep running with their clients and leases. Error
        handling: a changed device whose new ports cannot be bound is started again as it was, and
        the error is logged; [proxy] changes other than logging need a restart and are logged as such.
        """
        old = {device.name: device for device in self.settings.devices}
        new = {device.name: device for device in settings.devices}
        for name in old.keys() - new.keys():
            logger.info("{}: removed from the settings; stopping", name)
            await self.stop_device(name)
        for name, config in list(new.items()):
            if name in old and old[name] == config:
                continue
            if name in old:
                logger.info("{}: settings changed; restarting", name)
                await self.stop_device(name)
            try:
                listeners = await _bind_device(config)
            except BindError as exc:
                logger.error("{}; {} keeps its previous settings", exc, name)
                del new[name]
                if name in old:
                    await self._restore(old[name])
                    new[name] = old[name]
                continue
            await self.start_device(config, listeners)
        status_keys = (settings.proxy.status, settings.proxy.status_token)
        if status_keys != (self.settings.proxy.status, self.settings.proxy.status_token):
            logger.warning("[proxy] status and status_token take effect at the next start")
        log.setup(settings.proxy)
        self.settings = attrs.evolve(
            settings, devices=tuple(config for config in new.values() if config.name in self._runs)
        )
        logger.info("settings reloaded: {} device(s)", len(self._runs))


async def serve(settings: Settings, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
    """Runs the proxy until cancelled; task_status gets a Running once every port accepts clients.

    Error handling: BindError when a port cannot be bound (before any device is opened). Devices that
    are absent are not errors: their supervisors retry.
    """
    status_listeners: list[trio.SocketListener] = []
    device_listeners: list[tuple[DeviceConfig, list[trio.SocketListener]]] = []
    try:
        if settings.proxy.status is not None:
            status_listeners = await bind(settings.proxy.status, "[proxy] status")
        for config in settings.devices:
            device_listeners.append((config, await _bind_device(config)))
    except BaseException:
        await _close(status_listeners)
        for _, listeners in device_listeners:
            await _close(listeners)
        raise
    async with trio.open_nursery() as nursery:
        running = Running(settings, nursery)
        if status_listeners:
            status = StatusServer(running.devices_and_addresses, settings.proxy.status_token)
            await nursery.start(status.serve, status_listeners)
            running.status = _bound_addresses(status_listeners)[0]
            logger.info("status page on http://{}/", running.status)
        for config, listeners in device_listeners:
            await running.start_device(config, listeners)
        task_status.started(running)
        # The nursery stays open for the devices a reload starts.
        await trio.sleep_forever()
