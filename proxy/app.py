"""serve(settings): the root nursery, with a supervisor and acceptors per device, and the status server."""

from __future__ import annotations

import contextlib

import attrs
import trio
from loguru import logger

from proxy import log, tls
from proxy.clients import serve_clients
from proxy.config import Address, DeviceConfig, DialinConfig, Port, Settings, TlsFiles
from proxy.device import Device
from proxy.dialin.cluster import Cluster, open_registry
from proxy.dialin.postgres import PostgresRegistry
from proxy.dialin.registry import Record, Registry, RegistryError
from proxy.dialin.server import DialinServer
from proxy.telnet_stream import ComPortListener


class BindError(Exception):
    """A listening address could not be bound; nothing was started."""


async def bind(address: Address, owner: str) -> list[trio.SocketListener]:
    """Listeners for `address`; BindError names the owner, the address and the reason."""
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host or None)
    except OSError as exc:
        raise BindError(f"{owner}: cannot listen on {address}: {exc.strerror or exc}") from None


async def bind_tls(
    address: Address, owner: str, credentials: tls.Credentials, files: TlsFiles
) -> list[tls.TlsListener]:
    """TLS listeners for `address`, serving `files`; BindError also when the files cannot be loaded."""
    try:
        server = credentials.server(files)
    except tls.TlsError as exc:
        raise BindError(f"{owner}: {exc}") from None
    return [tls.TlsListener(listener, server) for listener in await bind(address, owner)]


async def _bind_device(
    config: DeviceConfig, credentials: tls.Credentials
) -> list[trio.SocketListener | tls.TlsListener]:
    """All of a device's listeners (plain, then TLS, then RFC 2217), or BindError with none of them left open."""
    bound: list[trio.SocketListener | tls.TlsListener] = []
    try:
        for address in config.listen:
            bound += await bind(address, f"device {config.name!r}")
        for address in config.listen_tls:
            bound += await bind_tls(address, f"device {config.name!r}", credentials, config.server_tls)
        for address in config.listen_rfc2217:
            bound += [ComPortListener(listener) for listener in await bind(address, f"device {config.name!r}")]
    except BaseException:
        await _close(bound)
        raise
    return bound


async def _close(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await trio.aclose_forcefully(listener)


def _bound_addresses(listeners: list[trio.SocketListener]) -> list[Address]:
    return [Address(*listener.socket.getsockname()[:2]) for listener in listeners]


def _client_ports(listeners: list[trio.abc.Listener]) -> list[Port]:
    """Where each of a device's listeners listens, and what its clients speak (the status page shows it)."""
    return [Port(*listener.socket.getsockname()[:2], _kind(listener)) for listener in listeners]


def _kind(listener: trio.abc.Listener) -> str:
    if isinstance(listener, tls.TlsListener):
        return "tls"
    return "rfc2217" if isinstance(listener, ComPortListener) else "plain"


@attrs.define(eq=False)
class _DeviceRun:
    device: Device
    addresses: list[Address]
    listeners: list[trio.abc.Listener] = attrs.field(factory=list)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stopped: trio.Event = attrs.field(factory=trio.Event)


# After an unexpected error, a device's supervisor starts again after this pause, doubled each time up
# to the maximum while it keeps failing, so that a bug that fails at once does not spin.
RESTART_PAUSE = 1.0
RESTART_PAUSE_MAX = 60.0
# A supervisor that ran this long before failing starts again with the shortest pause.
RESTART_RESET_AFTER = 60.0


async def supervise(device: Device) -> None:
    """Runs the device's supervisor until cancelled; after an unexpected error (a bug), logs it with its
    traceback and starts the supervisor again, after a pause that grows while it keeps failing."""
    pause = RESTART_PAUSE
    while True:
        started = trio.current_time()
        try:
            await device.run()
        except Exception:
            if trio.current_time() - started > RESTART_RESET_AFTER:
                pause = RESTART_PAUSE
            logger.exception("{}: the device's supervisor failed; restarting it in {:g} s", device.name, pause)
            await trio.sleep(pause)
            pause = min(pause * 2, RESTART_PAUSE_MAX)


class Running:
    """The proxy as it runs: its devices, the addresses their clients reach, and reload()."""

    def __init__(
        self,
        settings: Settings,
        nursery: trio.Nursery,
        registry: Registry | None = None,
        credentials: tls.Credentials | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        # The certificates every TLS listener serves; a reload loads them again.
        self.credentials = credentials or tls.Credentials(settings.proxy.tls_handshake_timeout)
        # With a PostgreSQL registry shared by several instances.
        self.cluster: Cluster | None = None
        self.status: Address | None = None
        self.dialin: list[Address] = []
        self._dialin_devices: dict[str, Device] = {}
        # Per dial-in id being registered: connections with that id wait their turn.
        self._registering: dict[str, trio.Lock] = {}
        self._started = trio.Event()
        self._nursery = nursery
        self._runs: dict[str, _DeviceRun] = {}
        # Names of dial-in devices being started (not yet in _runs).
        self._names_starting: set[str] = set()

    @property
    def devices(self) -> dict[str, Device]:
        return {name: run.device for name, run in self._runs.items()}

    @property
    def addresses(self) -> dict[str, list[Address]]:
        return {name: run.addresses for name, run in self._runs.items()}

    async def device_started(self) -> None:
        """Returns when the next device starts (one configured, reloaded or dialling in)."""
        await self._started.wait()

    def devices_and_addresses(self) -> dict[str, tuple[Device, list[Address]]]:
        """What the status server shows: every running device with the addresses of its ports."""
        return {name: (run.device, run.addresses) for name, run in self._runs.items()}

    async def start_device(
        self, config: DeviceConfig, listeners: list[trio.SocketListener], dialin: DialinConfig | None = None
    ) -> Device:
        """Starts a device's supervisor and acceptors; returns it once its ports accept clients."""
        run = _DeviceRun(Device(config, dialin), _client_ports(listeners), listeners)
        await self._nursery.start(self._run_device, run, listeners)
        self._runs[config.name] = run
        self._started.set()
        self._started = trio.Event()
        logger.info(
            "{}: {} ({}, {} sharing) on {}",
            config.name,
            config.describe(),
            config.protocol,
            config.sharing,
            ", ".join(map(str, run.addresses)),
        )
        return run.device

    async def dialin_device(self, device_id: str, peer: str) -> Device | None:
        """The Device of a dial-in id: running already, or registered now (autoregister), or None (logged).

        Connections with one id that arrive together register it once: they take turns here, and each
        finds the device the first one started.
        """
        if self.settings.dialin is None or self.registry is None:
            return None
        running = self._dialin_devices.get(device_id)
        if running is not None:
            return running
        lock = self._registering.setdefault(device_id, trio.Lock())
        try:
            async with lock:
                running = self._dialin_devices.get(device_id)
                return running if running is not None else await self._register(device_id, peer)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._registering.pop(device_id, None)

    async def _register(self, device_id: str, peer: str) -> Device | None:
        """Starts a known id's device, or registers a new one (autoregister) and starts it; None (logged)
        when it cannot be. A new device's row is written after its direct port listens (Registry)."""
        dialin, registry = self.settings.dialin, self.registry
        record = registry.known.get(device_id)
        if record is not None:
            return await self.start_registered(record)
        if not dialin.autoregister:
            logger.info("dialin: {} ({}) refused: unknown id and autoregister = false", device_id, peer)
            return None
        listeners: list[trio.SocketListener] = []
        try:
            if dialin.direct_ports is None:
                # direct_ports = "any": the system chooses a free port, which the registration then keeps.
                listeners = await _bind_device(dialin.device_config(device_id, device_id, 0), self.credentials)
                record = await registry.register_bound(device_id, _bound_addresses(listeners)[0].port)
            else:
                record = await registry.register(device_id)
        except (BindError, RegistryError) as exc:
            await _close(listeners)
            logger.error("dialin: {} ({}) not registered: {}", device_id, peer, exc)
            return None
        logger.info("dialin: registered {} with direct port {}", device_id, record.direct_port)
        return await self.start_registered(record, listeners)

    async def start_registered(
        self, record: Record, listeners: list[trio.SocketListener] | None = None
    ) -> Device | None:
        """Starts a registered dial-in device, offline until it connects, with its direct port listening;
        None (logged) for a row that cannot be served (Record.unusable), which then stays as it is."""
        dialin = self.settings.dialin
        problem = record.unusable()
        if problem is not None:
            logger.error("dialin: registry row {}; skipped until it is corrected or removed", problem)
            return None
        name = self._free_name(record)
        # Held until the device runs: another registration meanwhile must not take the same name.
        self._names_starting.add(name)
        try:
            config = dialin.device_config(record.id, name, record.direct_port)
            if not listeners:
                try:
                    listeners = await _bind_device(config, self.credentials)
                except BindError as exc:
                    logger.error("dialin: {}; {} has no direct port until it is free", exc, record.id)
                    return None
            device = await self.start_device(config, listeners, dialin)
        finally:
            self._names_starting.discard(name)
        self._dialin_devices[record.id] = device
        return device

    def _free_name(self, record: Record) -> str:
        """The record's name, else its id, else a name no running device has (ids can clash with names)."""
        taken = self._runs.keys() | self._names_starting
        for name in (record.name, record.id, f"dialin-{record.id}"):
            if name and name not in taken:
                return name
        number = 2
        while f"dialin-{record.id}-{number}" in taken:
            number += 1
        return f"dialin-{record.id}-{number}"

    async def _run_device(
        self, run: _DeviceRun, listeners: list[trio.SocketListener], *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            with run.scope:
                # Containment: a failure in one client's task ends that client (clients.handle_client);
                # a failure of the device's supervisor is logged and the supervisor restarted
                # (supervise); only an accept loop's own bug ends this nursery, and with it this device.
                async with trio.open_nursery() as nursery:
                    # The ports listen already: clients queue in the backlog until the loops accept them.
                    serve_clients(run.device, listeners, nursery)
                    task_status.started()
                    # In this task: thousands of dial-in devices make every task a device costs count.
                    await supervise(run.device)
        except Exception:
            logger.exception("{}: stopped by an unexpected error; its ports are closed", run.device.name)
        finally:
            with trio.CancelScope(shield=True):
                await _close(listeners)
            run.stopped.set()

    async def stop_device(self, name: str) -> None:
        """Closes a device's clients, lets the device settle, then closes its link and ports; returns
        when they are all closed. Settling first matters when the device is restarted with new settings:
        the answer it may still be giving would otherwise reach the new device's first client."""
        run = self._runs.pop(name)
        await run.device.wind_down()
        run.scope.cancel()
        await run.stopped.wait()

    async def _restore(self, config: DeviceConfig) -> None:
        try:
            await self.start_device(config, await _bind_device(config, self.credentials))
        except BindError as exc:
            logger.error("{}; {} stays stopped until the next reload", exc, config.name)

    async def reload(self, settings: Settings) -> None:
        """Applies new settings: devices added are started, removed ones stopped, changed ones restarted.

        Devices whose configuration did not change keep running with their clients and leases. Error
        handling: a changed device whose new ports cannot be bound is started again as it was, and
        the error is logged; [proxy] changes other than logging need a restart and are logged as such.
        """
        # Certificates first: a device restarted below, and every untouched listener, serve the new ones.
        self.credentials.reload()
        if settings.dialin != self.settings.dialin:
            logger.warning("[dialin] changes take effect at the next start")
            settings = attrs.evolve(settings, dialin=self.settings.dialin)
        old = {device.name: device for device in self.settings.devices}
        new = {device.name: device for device in settings.devices}
        for name in old.keys() - new.keys():
            logger.info("{}: removed from the settings; stopping", name)
            await self.stop_device(name)
        for name, config in list(new.items()):
            if name in old and old[name] == config:
                continue
            if name in old and attrs.evolve(old[name], log_level=config.log_level) == config:
                # Only its log level changed (TRACE for a misbehaving device): its clients stay.
                self._set_log_level(name, config)
                continue
            if name in old and _only_server_tls_changed(old[name], config):
                # New certificate files (a renewal under a new name): new clients get them, and the
                # connected ones, plain or TLS, keep their sessions.
                if not self._serve_new_certificates(name, config):
                    new[name] = old[name]
                continue
            if name in old:
                logger.info("{}: settings changed; restarting", name)
                await self.stop_device(name)
            try:
                listeners = await _bind_device(config, self.credentials)
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
        tls_keys = (settings.proxy.status_tls, settings.proxy.tls_handshake_timeout)
        if tls_keys != (self.settings.proxy.status_tls, self.settings.proxy.tls_handshake_timeout):
            logger.warning("[proxy] status_tls_* and tls_handshake_timeout take effect at the next start")
        try:
            log.setup(settings.proxy)
        except log.LogFileError as exc:
            # If the old file is gone too, setup() still leaves stderr.
            with contextlib.suppress(log.LogFileError):
                log.setup(self.settings.proxy)
            logger.error("{}; the previous logging settings stay", exc)
            settings = attrs.evolve(settings, proxy=self.settings.proxy)
        for device in self.devices.values():
            device.follow_log_level()
        self.settings = attrs.evolve(
            settings, devices=tuple(config for config in new.values() if config.name in self._runs)
        )
        logger.info("settings reloaded: {} device(s)", len(self._runs))

    def _serve_new_certificates(self, name: str, config: DeviceConfig) -> bool:
        """Gives the device's TLS ports the credentials of its new files; False (logged, and the files
        loaded before serve on) when the new ones do not load."""
        run = self._runs.get(name)
        if run is None:
            return False
        try:
            credentials = self.credentials.server(config.server_tls)
        except tls.TlsError as exc:
            logger.error("{}: {}; its TLS ports keep the certificate loaded before", name, exc)
            return False
        for listener in run.listeners:
            if isinstance(listener, tls.TlsListener):
                listener.credentials = credentials
        run.device.config = config
        logger.info("{}: TLS ports serve {} now; its clients stay connected", name, config.tls_cert)
        return True

    def _set_log_level(self, name: str, config: DeviceConfig) -> None:
        device = self.devices.get(name)
        if device is None:
            return
        device.config = config
        log.device_level(name, config.log_level)
        logger.info("{}: log_level is now {}", name, config.log_level or "[proxy]'s")


def _only_server_tls_changed(old: DeviceConfig, new: DeviceConfig) -> bool:
    """True when a device's TLS ports serve other files now (and nothing else changed): no restart needed.
    A log level changed beside them still needs one (rare enough not to be worth a path of its own)."""
    if old == new or new.server_tls is None or new.tls:
        return False
    files = ("tls_cert", "tls_key", "tls_client_ca", "tls_client_names")
    return attrs.evolve(old, **{key: getattr(new, key) for key in files}) == new


async def serve(settings: Settings, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
    """Runs the proxy until cancelled; task_status gets a Running once every port accepts clients.

    Error handling: BindError when a port cannot be bound (before any device is opened). Devices that
    are absent are not errors: their supervisors retry.
    """
    status_listeners: list[trio.SocketListener] = []
    dialin_listeners: list[trio.SocketListener] = []
    device_listeners: list[tuple[DeviceConfig, list[trio.SocketListener]]] = []
    registry = None
    credentials = tls.Credentials(settings.proxy.tls_handshake_timeout)
    try:
        status, status_tls = settings.proxy.status, settings.proxy.status_tls
        if status is not None and status_tls is not None:
            status_listeners = await bind_tls(status, "[proxy] status", credentials, status_tls)
        elif status is not None:
            status_listeners = await bind(status, "[proxy] status")
        if settings.dialin is not None:
            for address in settings.dialin.listen:
                dialin_listeners += await bind(address, "[dialin]")
            for address in settings.dialin.listen_tls:
                dialin_listeners += await bind_tls(address, "[dialin]", credentials, settings.dialin.dialin_tls)
            try:
                # In a thread: a PostgreSQL registry is reached over the network.
                registry = await trio.to_thread.run_sync(open_registry, settings.dialin)
            except RegistryError as exc:
                raise BindError(str(exc)) from None
        for config in settings.devices:
            device_listeners.append((config, await _bind_device(config, credentials)))
    except BaseException:
        # A failed start closes everything it opened, so that a caller that retries finds it all free.
        await _close(status_listeners + dialin_listeners)
        for _, listeners in device_listeners:
            await _close(listeners)
        if registry is not None:
            registry.close()
        raise
    try:
        # Containment: only a startup error (above) ends the process. From here, every task contains its
        # own failures and logs them: a device restarts its supervisor (supervise), a client's or a
        # dial-in connection's failure ends that connection, the status server answers 500.
        async with trio.open_nursery() as nursery:
            running = Running(settings, nursery, registry, credentials)
            if status_listeners:
                from proxy.status.server import StatusServer  # its HTTP and metrics stack only when it is on

                host = settings.proxy.status.host if settings.proxy.status is not None else ""
                scheme = "https" if settings.proxy.status_tls is not None else "http"
                running.status = _bound_addresses(status_listeners)[0]
                origin = (scheme, running.status.port)
                status = StatusServer(running.devices_and_addresses, settings.proxy.status_token, host, origin)
                await nursery.start(status.serve, status_listeners)
                logger.info("status page on {}://{}/", scheme, running.status)
            for config, listeners in device_listeners:
                await running.start_device(config, listeners)
            if registry is not None:
                records = await registry.run(registry.all)
                for record in records:
                    await running.start_registered(record)
                lookup = running.dialin_device
                if isinstance(registry, PostgresRegistry):
                    # Instances sharing the registry: heartbeat, claims, the others' devices.
                    running.cluster = Cluster(registry, running, settings.dialin)
                    await nursery.start(running.cluster.run)
                    lookup = running.cluster.lookup(lookup)
                server = DialinServer(
                    settings.dialin,
                    registry,
                    lookup,
                    lambda: [d for d in running.devices.values() if d.dialin is not None],
                )
                await nursery.start(server.serve, dialin_listeners)
                running.dialin = _bound_addresses(dialin_listeners)
                logger.info(
                    "dialin: devices connect on {}; {} registered", ", ".join(map(str, running.dialin)), len(records)
                )
            task_status.started(running)
            # The nursery stays open for the devices a reload starts.
            await trio.sleep_forever()
    finally:
        if registry is not None:
            registry.close()
