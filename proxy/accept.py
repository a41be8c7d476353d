"""Accept loops whose handlers own their connections, and that pause, not spin, when descriptors run out."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import trio
from loguru import logger

# Out of descriptors or memory: accepting again at once would fail again. Wait, as trio's own loop does,
# and let connections wait in the backlog meanwhile; any other accept error is a bug and propagates.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
CAPACITY_PAUSE = 0.1

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def accept_loop(listener: trio.SocketListener, handler: Handler, nursery: trio.Nursery) -> None:
    """Accepts forever, starting handler(stream) in `nursery` for each connection.

    Resource handling: the handler owns the stream and closes it (a dial-in device's connection
    outlives its handler). Error handling: EMFILE and its kin are logged and retried after a pause.
    """
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            logger.warning("accept on {}: {}; retrying in {:g} s", listener.socket.getsockname(), exc, CAPACITY_PAUSE)
            await trio.sleep(CAPACITY_PAUSE)
            continue
        nursery.start_soon(handler, stream)


async def serve_listeners(
    handler: Handler,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves every listener until cancelled; the first one's loop runs in this task, to spare one a port.

    Resource handling: the listeners are closed when this returns.
    """
    try:
        # Containment: each handler contains its own connection's failures; an accept error other than
        # running out of descriptors is a bug and ends this nursery, for the caller to log.
        async with trio.open_nursery() as nursery:
            for listener in listeners[1:]:
                nursery.start_soon(accept_loop, listener, handler, nursery)
            task_status.started()
            if listeners:
                await accept_loop(listeners[0], handler, nursery)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await trio.aclose_forcefully(listener)
