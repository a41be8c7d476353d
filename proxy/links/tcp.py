"""TCP links: a device reached at host:port (an Ethernet register, a serial-to-LAN converter)."""

from __future__ import annotations

import socket

import trio

from proxy import tls
from proxy.config import DeviceConfig, parse_address
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


async def open_tls(config: DeviceConfig) -> trio.SSLStream:
    """Connects to a device behind a TLS-terminating gateway: TCP as open_tcp(), then a handshake that
    checks the device's certificate (tls_ca, else the system's CAs) and its name (the host of `path`),
    and shows the proxy's own (tls_cert, tls_key) when it has one, all within CONNECT_TIMEOUT.

    The files are read at each open, so a reconnect after SIGHUP, or after the files are renewed, uses
    the current ones. Error handling: LinkError with the reason (the file, the TLS alert, the timeout).
    """
    try:
        context = tls.client_context(config.tls_ca, config.tls_cert, config.tls_key)
    except tls.TlsError as exc:
        raise LinkError(str(exc)) from None
    host = parse_address(config.path).host
    stream = await open_tcp(config.path)
    secured = trio.SSLStream(stream, context, server_hostname=host)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await secured.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(secured)
        raise LinkError(f"TLS handshake with {config.path} timed out after {CONNECT_TIMEOUT:g} s") from None
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(secured)
        raise LinkError(f"TLS handshake with {config.path} failed: {tls.failure(exc)}") from None
    return secured


def _reason(exc: OSError) -> str:
    # open_tcp_stream wraps the failure of each address it tried in a group, as the OSError's cause.
    cause = exc.__cause__
    inner = cause.exceptions[0] if isinstance(cause, ExceptionGroup) else exc
    return getattr(inner, "strerror", None) or str(inner)
