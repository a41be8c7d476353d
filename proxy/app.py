"""serve(settings): the root nursery, with one supervisor per device and one acceptor per device port."""

from __future__ import annotations

import attrs
import trio
from loguru import logger

from proxy.clients import serve_clients
from proxy.config import Address, Settings
from proxy.device import Device
from proxy.status.server import StatusServer

# The key of the status server's listeners among the devices' (no device name contains brackets).
STATUS = "[status]"


class BindError(Exception):
    """A listening address could not be bound; nothing was started."""


@attrs.define
class Running:
    """What serve() started: the devices by name and the addresses each one's clients can reach."""

    devices: dict[str, Device]
    addresses: dict[str, list[Address]]
    status: Address | None = None


async def bind(address: Address, owner: str) -> list[trio.SocketListener]:
    """Listeners for `address`; BindError names the owner, the address and the reason."""
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host or None)
    except OSError as exc:
        raise BindError(f"{owner}: cannot listen on {address}: {exc.strerror or exc}") from None


async def _bind_all(settings: Settings) -> dict[str, list[trio.SocketListener]]:
    """Binds every listening address before anything runs, so a clash starts nothing at all."""
    bound: dict[str, list[trio.SocketListener]] = {}
    try:
        if settings.proxy.status is not None:
            bound[STATUS] = await bind(settings.proxy.status, "[proxy] status")
        for device in settings.devices:
            bound[device.name] = []
            for address in device.listen:
                bound[device.name] += await bind(address, f"device {device.name!r}")
    except BaseException:
        for listeners in bound.values():
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        raise
    return bound


def _bound_addresses(listeners: list[trio.SocketListener]) -> list[Address]:
    return [Address(*listener.socket.getsockname()[:2]) for listener in listeners]


async def serve(settings: Settings, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
    """Runs the proxy until cancelled; task_status gets a Running once every port accepts clients.

    Error handling: BindError when a port cannot be bound (before any device is opened). Devices that
    are absent are not errors: their supervisors retry.
    """
    listeners = await _bind_all(settings)
    status_listeners = listeners.pop(STATUS, [])
    devices = {config.name: Device(config) for config in settings.devices}
    running = Running(devices, {name: _bound_addresses(ls) for name, ls in listeners.items()})
    async with trio.open_nursery() as nursery:
        if status_listeners:
            status = StatusServer(
                lambda: {name: (device, running.addresses[name]) for name, device in running.devices.items()},
                settings.proxy.status_token,
            )
            await nursery.start(status.serve, status_listeners)
            running.status = _bound_addresses(status_listeners)[0]
            logger.info("status page on http://{}/", running.status)
        for name, device in devices.items():
            await nursery.start(device.run)
            await nursery.start(serve_clients, device, listeners[name])
            logger.info(
                "{}: {} ({}, {} sharing) on {}",
                name,
                device.config.describe(),
                device.config.protocol,
                device.config.sharing,
                ", ".join(map(str, running.addresses[name])),
            )
        task_status.started(running)
