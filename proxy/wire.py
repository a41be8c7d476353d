"""The byte path's two primitives: read and write a stream's file descriptor with no extra scheduler round.

Most streams the proxy forwards between (TCP sockets, serial ports, socket pairs) are a non-blocking file
descriptor. trio's send_all() ends each successful write with a scheduling round, and receive_some()
first tries a read that usually fails with EAGAIN; on the forwarding path those cost about a third of
the proxy's added latency. These functions make the system call directly and fall back to the stream's
own methods only when the kernel cannot take or give bytes at once, so they still block, and are still
cancellable, exactly when there is something to wait for. A stream that transforms its bytes (TLS, the
Telnet layer of RFC 2217) has no descriptor of its own: it takes the stream's own methods throughout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from functools import partial

import trio

# A stream with no descriptor of its own (TLS, Telnet) is written this much at a time, each piece with
# its own stall timeout: about one TLS record.
LAYERED_PIECE = 16384


def fileno(stream: trio.abc.Stream) -> int:
    """The file descriptor behind a socket stream or a serial link."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    return stream.fileno()


def has_fileno(stream: trio.abc.Stream) -> bool:
    """Whether the stream's bytes are its descriptor's bytes (not TLS, not a Telnet layer)."""
    return isinstance(stream, trio.SocketStream) or hasattr(stream, "fileno")


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under a stream and the layers wrapped around it (TLS, Telnet), or None."""
    while not isinstance(stream, trio.SocketStream):
        stream = getattr(stream, "transport_stream", None)
        if stream is None:
            return None
    return stream.socket


async def receive_some(stream: trio.abc.Stream, fd: int, max_bytes: int) -> bytes:
    """Up to `max_bytes` bytes, b"" at end of file: waits for readability, then reads once.

    Only for sockets: a serial link has its own read (SerialLink.receive_unguarded) that tells a false
    end-of-file from a real one. Error handling: a failed read raises trio.BrokenResourceError.
    """
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(f"read failed: {exc.strerror or exc}") from exc


class Outlet:
    """Ordered writes to one stream: at once when the kernel takes them, else in turn before a deadline.

    Several tasks write to a device (a client's request, the proxy's ACK for a client that left, a
    ping) and to a client (the device's answer, a busy answer): the bytes of one send() never interleave
    with another's, and sends complete in the order they began. The common case is one system call and
    no scheduling point; a stream with no descriptor of its own (TLS, Telnet) always sends in turn.

    Resource handling: the owner calls close() before it closes the stream, so that no write can reach a
    file descriptor number the kernel has given to another connection since.
    """

    __slots__ = ("_fd", "_in_turn", "_lock", "_stream", "closed")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._fd = fileno(stream) if has_fileno(stream) else None
        # Made at the first send that must wait: ten thousand idle dial-in links need none.
        self._lock: trio.StrictFIFOLock | None = None
        # Sends that are waiting or writing in turn; while there are any, nobody may write at once.
        self._in_turn = 0
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def send(self, data: bytes, stall_timeout: float = math.inf) -> None:
        """Writes all of `data`; a peer that takes no byte for `stall_timeout` seconds fails the send.

        A slow peer that keeps taking bytes is not a stalled one: each byte taken restarts the time.
        Error handling: trio.BrokenResourceError when the stream fails, trio.ClosedResourceError once it
        is closed, trio.TooSlowError when the peer stalled (part of `data` may have been written).
        """
        if self.closed:
            raise trio.ClosedResourceError("closed")
        if self._fd is None:
            await self._send_layered(data, stall_timeout)
            return
        written = 0
        if not self._in_turn:
            written = self._write(data)
            if written == len(data):
                return
        view = memoryview(data)[written:]
        self._in_turn += 1
        if self._lock is None:
            self._lock = trio.StrictFIFOLock()
        try:
            async with self._lock:
                while view:
                    if self.closed:
                        raise trio.ClosedResourceError("closed")
                    with trio.move_on_after(stall_timeout) as waited:
                        await trio.lowlevel.wait_writable(self._fd)
                    if waited.cancelled_caught:
                        raise trio.TooSlowError
                    view = view[self._write(view) :]
        finally:
            self._in_turn -= 1

    async def _send_layered(self, data: bytes, stall_timeout: float) -> None:
        """send() through the stream's own send_all, in turn, LAYERED_PIECE bytes at a time: each piece
        the peer takes restarts stall_timeout, so a slow peer that keeps reading is not a stalled one.
        A stall leaves the stream unusable, as a cancelled TLS write does; the caller ends the
        connection then."""
        self._in_turn += 1
        if self._lock is None:
            self._lock = trio.StrictFIFOLock()
        try:
            async with self._lock:
                for start in range(0, len(data), LAYERED_PIECE):
                    if self.closed:
                        raise trio.ClosedResourceError("closed")
                    piece = data if len(data) <= LAYERED_PIECE else data[start : start + LAYERED_PIECE]
                    with trio.move_on_after(stall_timeout) as waited:
                        await self._stream.send_all(piece)
                    if waited.cancelled_caught:
                        raise trio.TooSlowError
        finally:
            self._in_turn -= 1

    def _write(self, view: bytes | memoryview) -> int:
        try:
            return os.write(self._fd, view)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"write failed: {exc.strerror or exc}") from exc


def reader(stream: trio.abc.Stream, max_bytes: int) -> Callable[[], Awaitable[bytes]]:
    """A no-argument receive for `stream`, its only reader: the direct path for sockets, a serial link's
    own read without trio-serial's wrapper, the stream's receive_some otherwise.

    All return straight after their read, with no scheduling point in between (trio's own
    SocketStream.receive_some has one), so the caller sees the bytes at the moment they left the
    kernel: the device's reader relies on that to give them to the lease that was current then.
    """
    if isinstance(stream, trio.SocketStream):
        return partial(receive_some, stream, stream.socket.fileno(), max_bytes)
    unguarded = getattr(stream, "receive_unguarded", None)
    if unguarded is not None:
        return partial(unguarded, max_bytes)
    return partial(stream.receive_some, max_bytes)


async def finish(stream: trio.abc.Stream, reply: bytes = b"", linger: float = 1.0) -> None:
    """Sends `reply`, ends our side, and reads what the peer still sends (up to `linger` seconds).

    Closing a socket with unread input makes the kernel send a reset, which can destroy the reply
    before the peer reads it; draining first lets a refusal or an error answer arrive. TLS ends with its
    close_notify and waits for the peer's (or its leaving), which drains the connection the same way;
    its TCP connection is then closed here. Another stream that cannot end one direction is closed after
    the reply, which tells its peer the same. Errors from a peer already gone are ignored: there is
    nobody left to tell.
    """
    with trio.move_on_after(linger):
        try:
            if reply:
                await stream.send_all(reply)
            if isinstance(stream, trio.SSLStream):
                transport, _ = await stream.unwrap()
                async with transport:
                    await _end_and_drain(transport)
            elif isinstance(stream, trio.abc.HalfCloseableStream):
                await _end_and_drain(stream)
            else:
                await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _end_and_drain(stream: trio.abc.HalfCloseableStream) -> None:
    await stream.send_eof()
    while await stream.receive_some(65536):
        pass
