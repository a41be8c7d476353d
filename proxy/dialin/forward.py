"""Clients of a dial-in device that another instance holds: a byte pipe to that instance's direct port.

The lock, the queue, busy answers and settling stay at the instance that holds the meter's link; this
instance only carries bytes. Admission (allow, max_clients) is checked here first, as for any client,
and again at the holder, which sees this instance's address as the client's. A forwarded client counts
among the device's clients here for as long as it is carried, so that max_clients bounds the
connections a flood (or two instances that each believe the other holds the device) can open.
"""

from __future__ import annotations

import attrs
import trio
from loguru import logger

from proxy import wire
from proxy.config import Address
from proxy.device import Device

# Seconds to reach the holding instance before the client is served here instead (the device offline).
CONNECT_TIMEOUT = 3.0
# The largest chunk carried at once, either way.
CHUNK = 65536


@attrs.frozen
class Holder:
    """The instance that holds a dial-in device, and its direct port of the device."""

    instance: str
    address: Address


async def to_holder(device: Device, stream: trio.abc.Stream, name: str) -> bool:
    """Carries an admitted client's bytes to the instance that holds `device`, when another does, until
    either side ends; False, with nothing sent either way, when this instance serves the client itself:
    it holds the device, no live instance does, max_clients is reached here, or the holder cannot be
    reached. A TLS port's client is carried before its handshake, which the holder's port (TLS too)
    answers: the session is end to end, and the holder checks the client's certificate.

    Resource handling: closes its own connection to the holder; the caller owns and closes `stream`.
    The client counts in `device.clients` from the first attempt until it is carried no more.
    Error handling: a connection to the holder that fails is logged; the caller then serves the client
    here, where the device is offline. A side that fails or ends mid-way ends the other.
    """
    holder = device.elsewhere() if device.elsewhere is not None else None
    if holder is None or device.clients >= device.config.max_clients:
        return False
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    device.client_connected()
    try:
        return await _forward(device, stream, name, holder)
    finally:
        device.client_disconnected()


async def _forward(device: Device, stream: trio.abc.Stream, name: str, holder: Holder) -> bool:
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            upstream = await trio.open_tcp_stream(holder.address.host, holder.address.port)
    except (OSError, trio.TooSlowError) as exc:
        logger.warning(
            "{}: client {}: instance {}, which holds the device, cannot be reached at {} ({}); serving it here",
            device.name,
            name,
            holder.instance,
            holder.address,
            exc if str(exc) else "timeout",
            device=device.name,
            client=name,
            event="forward_failed",
        )
        return False
    logger.info(
        "{}: client {} forwarded to instance {} at {}, which holds the device",
        device.name,
        name,
        holder.instance,
        holder.address,
        device=device.name,
        client=name,
        event="forward",
    )
    async with upstream, trio.open_nursery() as nursery:
        # The holder ending (an answer and a close, a busy reply) ends the client, as a direct line would.
        nursery.start_soon(_carry, upstream, stream, nursery.cancel_scope)
        nursery.start_soon(_carry, stream, upstream, None)
    return True


async def _carry(source: trio.abc.Stream, sink: trio.abc.Stream, ends: trio.CancelScope | None) -> None:
    """Copies `source` to `sink` until `source` ends; then half-closes `sink` (where it can) or cancels
    `ends`. A broken or closed side just ends the copy. On the byte path's direct reads and writes
    (proxy.wire): a forwarded exchange costs no scheduling round more than it must."""
    receive, outlet = wire.reader(source, CHUNK), wire.Outlet(sink)
    try:
        while data := await receive():
            await outlet.send(data)
        if ends is None and isinstance(sink, trio.abc.HalfCloseableStream):
            await sink.send_eof()
            return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    if ends is not None:
        ends.cancel()
    else:
        await trio.aclose_forcefully(sink)
