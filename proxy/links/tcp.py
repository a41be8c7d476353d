"""TCP links: a device reached at host:port (an Ethernet register, a serial-to-LAN converter)."""

from __future__ import annotations

import socket

import trio

from proxy.config import parse_address
from proxy.links import LinkError

# A device that does not answer a connect in this time is treated as offline; the supervisor retries.
CONNECT_TIMEOUT = 10.0


async def open_tcp(path: str) -> trio.SocketStream:
    """Connects to `path` ("host:port") with TCP_NODELAY, so small frames leave at once."""
    address = parse_address(path)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise LinkError(f"connect to {path} timed out after {CONNECT_TIMEOUT:g} s") from None
    except OSError as exc:
        raise LinkError(f"connect to {path} failed: {_reason(exc)}") from None
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return stream


def _reason(exc: OSError) -> str:
    # open_tcp_stream wraps the failure of each address it tried in a group, as the OSError's cause.
    cause = exc.__cause__
    inner = cause.exceptions[0] if isinstance(cause, ExceptionGroup) else exc
    return getattr(inner, "strerror", None) or str(inner)
