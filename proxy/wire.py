"""The byte path's two primitives: read and write a stream's file descriptor with no extra scheduler round.

Every stream the proxy forwards between (TCP sockets, serial ports, socket pairs) is a non-blocking file
descriptor. trio's send_all() ends each successful write with a scheduling round, and receive_some()
first tries a read that usually fails with EAGAIN; on the forwarding path those cost about a third of
the proxy's added latency. These functions make the system call directly and fall back to the stream's
own methods only when the kernel cannot take or give bytes at once, so they still block, and are still
cancellable, exactly when there is something to wait for.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from functools import partial

import trio


def fileno(stream: trio.abc.Stream) -> int:
    """The file descriptor behind a socket stream or a serial link."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    return stream.fileno()


async def send_all(stream: trio.abc.Stream, fd: int, data: bytes) -> None:
    """Writes all of `data`: at once when the kernel takes it, else through stream.send_all().

    Error handling: a failed write raises trio.BrokenResourceError, as stream.send_all() would.
    """
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise trio.BrokenResourceError(f"write failed: {exc.strerror or exc}") from exc
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])


async def receive_some(stream: trio.abc.Stream, fd: int, max_bytes: int) -> bytes:
    """Up to `max_bytes` bytes, b"" at end of file: waits for readability, then reads once.

    Only for sockets: a serial link has its own receive_some() that tells a false end-of-file from a
    real one. Error handling: a failed read raises trio.BrokenResourceError.
    """
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(f"read failed: {exc.strerror or exc}") from exc


def reader(stream: trio.abc.Stream, max_bytes: int) -> Callable[[], Awaitable[bytes]]:
    """A no-argument receive for `stream`: the direct path for sockets, the stream's own otherwise.

    Both return straight after their read, with no scheduling point in between (trio's own
    SocketStream.receive_some has one), so the caller sees the bytes at the moment they left the
    kernel: the device's reader relies on that to give them to the lease that was current then.
    """
    if isinstance(stream, trio.SocketStream):
        return partial(receive_some, stream, stream.socket.fileno(), max_bytes)
    return partial(stream.receive_some, max_bytes)


async def finish(stream: trio.SocketStream, reply: bytes = b"", linger: float = 1.0) -> None:
    """Sends `reply`, ends our side, and reads what the peer still sends (up to `linger` seconds).

    Closing a socket with unread input makes the kernel send a reset, which can destroy the reply
    before the peer reads it; draining first lets a refusal or an error answer arrive. Errors from a
    peer already gone are ignored: there is nobody left to tell.
    """
    with trio.move_on_after(linger):
        try:
            if reply:
                await stream.send_all(reply)
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
