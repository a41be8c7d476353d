"""How clients take turns at a device: session sharing (a client holds it for its connection) and
exchange sharing (clients stay connected and take turns request by request)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

if TYPE_CHECKING:
    from proxy.clients import Client
    from proxy.device import Device


class Sharing(Protocol):
    """What a Device asks of its sharing mode."""

    # True when the mode needs a task of its own beside the device's supervisor (run()).
    needs_task: bool

    @property
    def holder(self) -> str | None:
        """Who has the device now, for the status page."""

    @property
    def waiting(self) -> int:
        """How many clients (or requests) wait for the device."""

    @property
    def held_since(self) -> float | None:
        """Since when (trio's clock) the holder has had the device (exchange sharing: since its request
        or its latest message in the exchange went), for the device's page."""

    def waiters(self) -> list[tuple[str, float]]:
        """Who waits for the device, in turn: each client's name and since when (trio's clock)."""

    async def run(self) -> None:
        """The mode's own task, when needs_task: its timers."""

    async def serve(self, client: Client) -> str:
        """Serves one client connection until it ends; returns how. Raises Refused."""

    async def device_bytes(self, data: bytes, now: float) -> None:
        """What the device just sent, from the device's reader, the moment it left the kernel (`now`)."""

    def link_up(self) -> None:
        """The link opened."""

    def link_down(self, reason: str | None) -> None:
        """The link closed: lost (`reason`) or on purpose (None). Must not wait."""

    def gave_up(self) -> None:
        """reconnect_interval = 0 and the link cannot be opened: whoever waits is refused."""

    def disconnect_holder(self) -> str | None:
        """Disconnects the client that holds the device (the status API); its name, or None."""

    def ping(self, data: bytes, nursery: trio.Nursery) -> bool:
        """Sends a dial-in ping when nobody has the device; True when it was sent."""

    def stop(self) -> None:
        """The device is stopping: its clients are let go, no new one gets it, what it owes settles."""


def for_device(device: Device) -> Sharing:
    """The sharing mode the device's settings name."""
    if device.config.sharing == "exchange":
        from proxy.sharing.exchange import ExchangeSharing

        return ExchangeSharing(device)
    from proxy.sharing.session import SessionSharing

    return SessionSharing(device)
