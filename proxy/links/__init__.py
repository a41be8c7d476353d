"""Links to devices: open_link(config, nursery) opens the right kind and returns a trio Stream."""

from __future__ import annotations

import os

import trio

from proxy import wire
from proxy.config import DeviceConfig


class LinkError(Exception):
    """A link could not be opened; the message says why in an operator's words."""


async def open_link(config: DeviceConfig, nursery: trio.Nursery) -> trio.abc.Stream:
    """Opens the device's link. Raises LinkError with the reason when it cannot.

    Resource handling: the caller owns the returned stream and closes it. A simulated device runs as a
    task in `nursery` and ends when the stream is closed.
    """
    if config.type == "serial":
        from proxy.links.serial import open_serial

        return await open_serial(config)
    if config.type == "tcp":
        from proxy.links.tcp import open_tcp

        if config.tls:
            from proxy.links.tcp import open_tls

            return await open_tls(config)
        return await open_tcp(config.path)
    from proxy.links.simulator import open_simulator

    return await open_simulator(config, nursery)


def discard_input(link: trio.abc.Stream) -> int:
    """Drops what the device sent that nobody has read yet; returns how many bytes were dropped.

    A serial port or a socket is a non-blocking file descriptor, so a plain read until EAGAIN empties the
    kernel's buffer without disturbing the task that waits to read the link. A TLS link drops nothing:
    its bytes are a session's records, which only its reader may take; they reach the sharing mode as
    they are decrypted, so what came late still goes to whoever holds the device then.
    """
    if not wire.has_fileno(link):
        return 0
    fd = wire.fileno(link)
    dropped = 0
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return dropped
        if not chunk:
            return dropped
        dropped += len(chunk)
