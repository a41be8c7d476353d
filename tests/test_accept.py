"""Accept loops pause when descriptors run out, and go on accepting once they are back."""

from __future__ import annotations

import errno

import trio

from proxy.accept import CAPACITY_PAUSE, accept_loop


class ExhaustedListener:
    """A real listener whose first accepts fail with EMFILE, as a process out of descriptors sees."""

    def __init__(self, listener: trio.SocketListener, failures: int) -> None:
        self.listener = listener
        self.socket = listener.socket
        self.failures = failures
        self.attempts: list[float] = []

    async def accept(self) -> trio.SocketStream:
        self.attempts.append(trio.current_time())
        if self.failures:
            self.failures -= 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.listener.accept()


async def test_emfile_pauses_the_accept_loop_and_the_waiting_client_is_served_after():
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    exhausted = ExhaustedListener(listener, failures=3)
    served = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hi")
            served.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, exhausted, handler, nursery)
        port = listener.socket.getsockname()[1]
        async with await trio.open_tcp_stream("127.0.0.1", port) as client:
            assert await client.receive_some() == b"hi"
        await served.wait()
        nursery.cancel_scope.cancel()
    gaps = [later - earlier for earlier, later in zip(exhausted.attempts, exhausted.attempts[1:], strict=False)]
    assert len(exhausted.attempts) >= 4
    assert all(gap >= CAPACITY_PAUSE * 0.9 for gap in gaps[:3])
    await listener.aclose()
