"""What a client sees first: one task per connection, admitted (allow, max_clients), then served by the
device's sharing mode (proxy.sharing)."""

from __future__ import annotations

import ipaddress
from functools import partial

import trio
from loguru import logger

from proxy import accept, tls, wire
from proxy.config import DeviceConfig
from proxy.device import Device, Refused
from proxy.dialin import forward
from proxy.events import Kind
from proxy.telnet_stream import ComPortListener, ComPortStream

# Refused clients told nothing: networks the proxy does not serve, and peers with no working TLS session.
SILENT_REFUSALS = ("not allowed", "tls")


def peer_name(stream: trio.abc.Stream) -> str:
    """'host:port' of the client at the other end of `stream` (under its TLS or Telnet layer)."""
    sock = wire.socket_of(stream)
    try:
        if sock is None:
            raise OSError("not a socket")
        host, port, *_ = sock.getpeername()
    except OSError:
        return "unknown client"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Client:
    """One client connection as a sharing mode sees it: its name and stream, ordered writes to it, and a
    way to end it from any task.

    Resource handling: handle_client() owns the stream; the outlet is closed before the stream, so that
    no task can write to a descriptor the kernel has given to another connection since.
    """

    def __init__(self, stream: trio.abc.Stream, name: str, config: DeviceConfig) -> None:
        self.stream = stream
        self.name = name
        self.outlet = wire.Outlet(stream)
        self._write_timeout = config.client_write_timeout
        # The client's task runs in this scope; disconnect() cancels it.
        self.scope = trio.CancelScope()
        # Why the client is gone (None while it is there).
        self.gone: str | None = None

    async def send(self, data: bytes) -> bool:
        """Writes `data` to the client; False when it is gone, or is gone now because its connection
        failed or it took no byte for client_write_timeout (`gone` says which). The caller decides what
        ends: its task (disconnect()) or only its turn at the device."""
        if self.gone is not None:
            return False
        try:
            await self.outlet.send(data, self._write_timeout)
        except trio.TooSlowError:
            self.leaving(f"took no byte of its answer for client_write_timeout = {self._write_timeout:g} s")
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.leaving(f"connection failed: {exc}")
            return False
        return True

    def leaving(self, why: str) -> None:
        """The client's own task is done with it: nothing more is sent to it."""
        if self.gone is None:
            self.gone = why
        self.outlet.close()

    def disconnect(self, reason: str) -> None:
        """Ends the client from any task: its task is cancelled and closes the connection."""
        self.leaving(reason)
        self.scope.cancel()

    async def close(self) -> None:
        """Closes the connection now, from the client's own task."""
        self.outlet.close()
        await trio.aclose_forcefully(self.stream)


def serve_clients(device: Device, listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
    """Accepts clients of `device` on `listeners`, an accept loop a listener in `nursery`, until it is cancelled.

    Error handling: the accept loop pauses and retries on EMFILE and the like; one client's failure is
    logged and never reaches another client or the device. The caller closes the listeners.
    """
    for listener in listeners:
        handler = partial(handle_client, device, rfc2217=isinstance(listener, ComPortListener))
        nursery.start_soon(accept.accept_loop, listener, handler, nursery)


async def handle_client(device: Device, stream: trio.abc.Stream, *, rfc2217: bool = False) -> None:
    """One client connection, from accept to close: `allow`, then a TLS port's handshake, then
    max_clients; a client refused by any of them never counts as connected nor waits for the device.

    Resource handling: closes `stream` before returning.
    """
    name = peer_name(stream)
    # Every line about this client names its device and itself, for log_json and the per-device log_level.
    client_log = logger.bind(device=device.name, client=name)
    try:
        refusal = _not_allowed(device, stream)
        # A dial-in device another instance holds (a shared registry): its clients are carried there.
        if refusal is None and await forward.to_holder(device, stream, name):
            return
        refusal = refusal or await _handshake(stream) or _over_capacity(device)
        if refusal:
            device.count_refusal(refusal[0])
            device.events.record(Kind.REFUSED, f"{refusal[0]}: {refusal[1]}", name)
            client_log.info(
                "{}: client {} refused: {}", device.name, name, refusal[1], event="refused", reason=refusal[0]
            )
            if refusal[0] not in SILENT_REFUSALS:
                await wire.finish(stream, device.config.busy_reply)
            return
        device.client_connected()
        device.events.record(Kind.CONNECT, client=name)
        client_log.info("{}: client {} connected ({} connected)", device.name, name, device.clients, event="connect")
        if rfc2217:
            # An RFC 2217 port's client (listen_rfc2217): the Telnet layer, once it is admitted.
            stream = ComPortStream(stream, device, name)
        client = Client(stream, name, device.config)
        try:
            why = "disconnected"
            with client.scope:
                why = await device.sharing.serve(client)
            device.events.record(Kind.DISCONNECT, client.gone or why, name)
            client_log.info("{}: client {} {}", device.name, name, client.gone or why, event="disconnect")
            if client.scope.cancelled_caught:
                # Disconnected by the proxy: end our side and drain, so the close is clean, not a reset.
                await wire.finish(stream)
        except Refused as exc:
            device.events.record(Kind.REFUSED, str(exc), name)
            client_log.info("{}: client {} refused: {}", device.name, name, exc, event="refused", reason=exc.reason)
            await wire.finish(stream, device.config.busy_reply)
        except Exception:
            # A bug must cost this one client its connection, never the proxy or the other clients.
            device.events.record(Kind.ERROR, "unexpected error; connection closed (the log has the traceback)", name)
            client_log.exception("{}: client {}: unexpected error; connection closed", device.name, name, event="error")
        finally:
            client.leaving("closed")
            device.client_disconnected()
    finally:
        await tls.aclose(stream)


def _not_allowed(device: Device, stream: trio.abc.Stream) -> tuple[str, str] | None:
    """Why this client's address may not reach the device, or None. Checked before anything costs."""
    config = device.config
    if config.allow:
        try:
            sock = wire.socket_of(stream)
            if sock is None:
                raise OSError("not a socket")
            address = ipaddress.ip_address(sock.getpeername()[0])
        except (OSError, ValueError):
            return ("not allowed", "its address cannot be read")
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not any(address in network for network in config.allow):
            return ("not allowed", f"{address} is not in allow")
    return None


async def _handshake(stream: trio.abc.Stream) -> tuple[str, str] | None:
    """Why a TLS port's client failed its handshake, or None (also for a plain port)."""
    if not isinstance(stream, trio.SSLStream):
        return None
    try:
        await tls.handshake(stream)
    except tls.HandshakeFailed as exc:
        return ("tls", f"TLS handshake failed: {exc}")
    return None


def _over_capacity(device: Device) -> tuple[str, str] | None:
    """Why the device takes no more clients now, or None."""
    config = device.config
    if device.clients >= config.max_clients:
        return ("too many clients", f"max_clients = {config.max_clients} reached")
    return None
