"""This instance among the others that share a PostgreSQL registry: its heartbeat, its claims, the
devices the others registered, and where each device's clients go.

Every heartbeat (claim_timeout / 3) the instance says it lives, writes the claims of the devices that
identified here, and reads every device with its holder (proxy/dialin/postgres.py). From that it
- starts the devices other instances registered, so that it listens on every direct port;
- closes the link of a device claimed by another instance since it identified here: the meter dialled
  in there, and this link is stale;
- forwards the clients of a device another live instance holds there (proxy/dialin/forward.py).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio
from loguru import logger

from proxy.config import Address, DialinConfig
from proxy.device import Device
from proxy.dialin.forward import Holder
from proxy.dialin.postgres import Claim, PostgresRegistry, is_postgres
from proxy.dialin.registry import Registry, RegistryError

if TYPE_CHECKING:
    from proxy.app import Running

# Seconds a clean stop waits for the database to take this instance's claims back.
RELEASE_TIMEOUT = 5.0
WILDCARDS = ("", "0.0.0.0", "::")


def instance_name(dialin: DialinConfig) -> str:
    """[dialin] instance, else the host name."""
    return dialin.instance or socket.gethostname()


def advertised_host(dialin: DialinConfig) -> str:
    """Where the other instances reach this one's direct ports: [dialin] advertise, else the direct
    ports' host when it is one address, else the host name."""
    if dialin.advertise:
        return dialin.advertise
    return dialin.direct_host if dialin.direct_host not in WILDCARDS else socket.gethostname()


def open_registry(dialin: DialinConfig, *, lock_wait: float | None = None) -> Registry | PostgresRegistry:
    """The registry [dialin] registry names: a PostgreSQL database (a URL) or a SQLite file.

    `lock_wait` (SQLite only): how long to wait for another program that holds the file. Error
    handling: RegistryError naming the registry and why it cannot be used.
    """
    if is_postgres(dialin.registry):
        return PostgresRegistry(
            dialin.registry,
            dialin.direct_ports,
            instance=instance_name(dialin),
            advertise=advertised_host(dialin),
            claim_timeout=dialin.claim_timeout,
        )
    if lock_wait is None:
        return Registry(dialin.registry, dialin.direct_ports)
    return Registry(dialin.registry, dialin.direct_ports, lock_wait=lock_wait)


class Cluster:
    """Keeps this instance's view of the shared registry and acts on it (see the module docstring)."""

    def __init__(self, registry: PostgresRegistry, running: Running, dialin: DialinConfig) -> None:
        self.registry = registry
        self.instance = registry.instance
        self._running = running
        self._interval = dialin.claim_timeout / 3
        # Each device's claim as the last heartbeat read it.
        self.claims: dict[str, Claim] = {}
        # When each device last identified here (trio time): a heartbeat that began before must not
        # take that connection for stale.
        self._identified: dict[str, float] = {}
        # Why the last heartbeat failed, while the database cannot be reached.
        self._failing: str | None = None
        # Instances found advertising this instance's own address (logged once each).
        self._sharing_address: set[str] = set()
        # Set after each heartbeat that reached the database.
        self.polled = trio.Event()

    def lookup(
        self, find: Callable[[str, str], Awaitable[Device | None]]
    ) -> Callable[[str, str], Awaitable[Device | None]]:
        """The dial-in server's lookup, claiming each device found for this instance."""

        async def claiming(device_id: str, peer: str) -> Device | None:
            device = await find(device_id, peer)
            if device is not None:
                await self.claim(device_id)
                self._follow(device)
            return device

        return claiming

    async def claim(self, device_id: str) -> None:
        """Claims a device that identified here now. Error handling: while the database cannot be
        reached, the claim waits for the next heartbeat; the device is served here meanwhile."""
        self._identified[device_id] = trio.current_time()
        self.claims.pop(device_id, None)
        self.registry.claiming(device_id)
        try:
            await self.registry.claim_pending()
        except RegistryError as exc:
            logger.info("dialin: {}: claim kept until the registry can be reached ({})", device_id, exc)

    def elsewhere(self, device: Device) -> Holder | None:
        """The live instance that holds `device`, with its direct port there, when that is not this one.

        None also when the holder advertises this instance's own address: a client carried there would
        come back here, again and again (heartbeat() logs that misconfiguration).
        """
        claim = self.claims.get(device.config.path)
        if claim is None or claim.holder == self.instance or not claim.live or not claim.advertise:
            return None
        if claim.advertise == self.registry.advertise:
            return None
        config = device.config
        # The direct port is plain, TLS or RFC 2217 ([dialin] direct_tls, direct_rfc2217): one of these.
        port = (*config.listen, *config.listen_tls, *config.listen_rfc2217)[0].port
        return Holder(claim.holder, Address(claim.advertise, port))

    def _follow(self, device: Device) -> None:
        if device.elsewhere is None:
            device.elsewhere = lambda: self.elsewhere(device)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeats until cancelled; ready after the first. Error handling: a database that cannot be
        reached is logged once, then its return; this instance keeps serving what it holds meanwhile.
        At a clean stop, this instance's claims are given up."""
        try:
            await self.registry.run(self.registry.drop_claims)
        except RegistryError as exc:
            logger.error("dialin: cannot give up this instance's old claims: {}", exc)
        try:
            await self.heartbeat()
            task_status.started()
            while True:
                await trio.sleep(self._interval)
                await self.heartbeat()
        finally:
            with trio.move_on_after(RELEASE_TIMEOUT) as scope:
                scope.shield = True
                try:
                    await self.registry.run(self.registry.drop_claims)
                except RegistryError as exc:
                    logger.warning("dialin: this instance's claims expire after claim_timeout: {}", exc)

    def _warn_of_shared_addresses(self) -> None:
        """Logs once each instance that holds devices and advertises this instance's address: its
        clients are served here, offline, rather than carried in a loop."""
        for claim in self.claims.values():
            same = claim.advertise == self.registry.advertise and claim.holder != self.instance
            if same and claim.live and claim.holder not in self._sharing_address:
                self._sharing_address.add(claim.holder)
                logger.error(
                    "dialin: instance {} advertises {}, as this instance {} does; its devices' clients are not"
                    " forwarded from here: give each instance its own [dialin] advertise",
                    claim.holder,
                    claim.advertise,
                    self.instance,
                )

    async def heartbeat(self) -> None:
        """One heartbeat and what follows from it (see the module docstring)."""
        began = trio.current_time()
        try:
            poll = await self.registry.heartbeat()
        except RegistryError as exc:
            if self._failing is None:
                logger.error(
                    "dialin: instance {}: {}; serving the devices it holds, refusing new ones, and retrying",
                    self.instance,
                    exc,
                )
            self._failing = str(exc)
            return
        if self._failing is not None:
            logger.info("dialin: instance {}: the registry can be reached again", self.instance)
            self._failing = None
        self.claims = poll.claims
        self._warn_of_shared_addresses()
        for device_id, record in poll.records.items():
            if device_id not in self.registry.known:
                self.registry.adopt(record)
                logger.info(
                    "dialin: {} was registered by another instance; direct port {}", device_id, record.direct_port
                )
                await self._running.dialin_device(device_id, "another instance")
        for device in self._running.devices.values():
            if device.dialin is None:
                continue
            self._follow(device)
            claim = self.claims.get(device.config.path)
            stale = self._identified.get(device.config.path, float("-inf")) < began
            if claim is not None and claim.holder != self.instance and device.link_up and stale:
                device.reset_link(f"claimed by instance {claim.holder}, where it dialled in since")
        self.polled.set()
        self.polled = trio.Event()
