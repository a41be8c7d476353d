"""What a client sees: one task per connection, admitted, queued for the device, then served."""

from __future__ import annotations

import ipaddress
from functools import partial

import trio
from loguru import logger

from proxy import accept, wire
from proxy.device import BROKEN, READ_SIZE, Device, Lease, LinkLost, Refused
from proxy.exchanges import ClientGone, ExchangeClient

# After a client's end-of-file, the device's answer is still passed on until it pauses this long.
ANSWER_LINGER = 0.5
CLOSED = "closed the connection"


def peer_name(stream: trio.SocketStream) -> str:
    """'host:port' of the client at the other end of `stream`."""
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "unknown client"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve_clients(device: Device, listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
    """Accepts clients of `device` on `listeners`, an accept loop a listener in `nursery`, until it is cancelled.

    Error handling: the accept loop pauses and retries on EMFILE and the like; one client's failure is
    logged and never reaches another client or the device. The caller closes the listeners.
    """
    handler = partial(handle_client, device)
    for listener in listeners:
        nursery.start_soon(accept.accept_loop, listener, handler, nursery)


async def handle_client(device: Device, stream: trio.SocketStream) -> None:
    """One client connection, from accept to close. Resource handling: closes `stream` before returning."""
    client = peer_name(stream)
    async with stream:
        refusal = _admission(device, stream)
        if refusal:
            device.count_refusal(refusal[0])
            logger.info("{}: client {} refused: {}", device.name, client, refusal[1])
            if refusal[0] != "not allowed":
                await wire.finish(stream, device.config.busy_reply)
            return
        device.client_connected()
        logger.info("{}: client {} connected ({} connected)", device.name, client, device.clients)
        try:
            if device.config.sharing == "exchange":
                why = await ExchangeClient(device, stream, client).serve()
                logger.info("{}: client {} {}", device.name, client, why)
            else:
                await _session(device, stream, client)
        except ClientGone as exc:
            logger.info("{}: client {} disconnected: {}", device.name, client, exc)
            await wire.finish(stream, b"")
        except Refused as exc:
            logger.info("{}: client {} refused: {}", device.name, client, exc)
            await wire.finish(stream, device.config.busy_reply)
        except Exception:
            # A bug must cost this one client its connection, never the proxy or the other clients.
            logger.exception("{}: client {}: unexpected error; connection closed", device.name, client)
        finally:
            device.client_disconnected()


def _admission(device: Device, stream: trio.SocketStream) -> tuple[str, str] | None:
    """Why this client may not even queue for the device, or None."""
    config = device.config
    if config.allow:
        try:
            address = ipaddress.ip_address(stream.socket.getpeername()[0])
        except (OSError, ValueError):
            return ("not allowed", "its address cannot be read")
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not any(address in network for network in config.allow):
            return ("not allowed", f"{address} is not in allow")
    if device.clients >= config.max_clients:
        return ("too many clients", f"max_clients = {config.max_clients} reached")
    return None


async def _session(device: Device, stream: trio.SocketStream, client: str) -> None:
    """Session sharing: the client holds the device for its whole connection."""
    idle_timeout = device.config.idle_timeout
    client_fd = wire.fileno(stream)

    async def to_client(data: bytes) -> None:
        await wire.send_all(stream, client_fd, data)

    async with device.lease(client, to_client) as lease:
        why = "closed the connection"
        with lease.cancel_scope:
            async with trio.open_nursery() as nursery:
                if idle_timeout:
                    nursery.start_soon(_end_when_idle, lease, idle_timeout)
                why = await _pump(stream, lease)
                if why == CLOSED:
                    await _drain_answer(lease)
                nursery.cancel_scope.cancel()
        logger.info("{}: client {} {}", device.name, client, lease.ended or why)


async def _pump(stream: trio.SocketStream, lease: Lease) -> str:
    """Client -> device until the client closes; returns how the session ended."""
    receive = wire.reader(stream, READ_SIZE)
    while True:
        try:
            data = await receive()
        except BROKEN as exc:
            return f"connection failed: {exc}"
        if not data:
            return CLOSED
        try:
            await lease.send(data)
        except LinkLost as exc:
            return f"disconnected: link lost ({exc})"


async def _drain_answer(lease: Lease) -> None:
    """The client closed its sending side right after a request: the answer still reaches it.

    A script that writes its request and half-closes (`printf ... | nc -N`) gets the answer, as socat
    gives the other direction a moment after an end-of-file. When the device spoke last, the client
    has had its answer and the device goes to the next client at once.
    """
    if lease.last_received >= lease.last_sent:
        return
    while True:
        heard = lease.last_activity
        await trio.sleep_until(heard + ANSWER_LINGER)
        if lease.last_activity == heard:
            return


async def _end_when_idle(lease: Lease, idle_timeout: float) -> None:
    """Ends the lease once neither side has sent anything for idle_timeout seconds."""
    while True:
        deadline = lease.last_activity + idle_timeout
        if trio.current_time() >= deadline:
            lease.end(f"disconnected: silent for idle_timeout = {idle_timeout:g} s")
            return
        await trio.sleep_until(deadline)
