"""Exchange sharing (ECRService): clients stay connected and take turns, one request and answer at a time.

Each client has two tasks. The reader splits what the client sends into the protocol's messages: a
request is queued, in order, for the runner; a message that belongs to the exchange in progress (a
Shtrih host ACK, say) goes to the device at once. The runner takes the queued requests one by one: it
leases the device, sends the request, and streams the device's answer back to the client as it comes
(so an ACK reaches the client before the rest), until the protocol says the exchange is complete.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable

import attrs
import trio
from loguru import logger

from proxy import log, protocols, wire
from proxy.config import AUTO
from proxy.device import BROKEN, READ_SIZE, Device, Lease, LinkLost, Refused
from proxy.protocols import DeviceProtocol, Event, Exchange, Junk

# Requests a client may have queued before the proxy stops reading from it (TCP pushes back).
QUEUED_REQUESTS = 64


class ClientGone(Exception):
    """The client must be disconnected: it was refused with no answer to give, or its socket broke."""


@attrs.define
class Request:
    event: Event


@attrs.define
class LocalAnswer:
    """Bytes the proxy itself answers (a NAK for a corrupt frame), sent in turn with the answers."""

    data: bytes


@attrs.define(eq=False)
class Running:
    """The exchange in progress for one client, as both of its tasks see it."""

    exchange: Exchange
    frame_gap: float
    lease: Lease | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    # What the runner waits in; the device's bytes move its deadline (answer begun, silence).
    wait: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    exchange_deadline: float = math.inf
    last_byte: float = 0.0
    answer_head: bytearray = attrs.field(factory=bytearray)
    answer_size: int = 0

    def finish(self) -> None:
        """The exchange is complete: the next client's request may go to the device at once."""
        if self.lease is not None:
            self.lease.release()
        self.done.set()


class ExchangeClient:
    """One client connection under exchange sharing."""

    def __init__(self, device: Device, stream: trio.SocketStream, client: str) -> None:
        self.device = device
        self.config = device.config
        self.protocol: DeviceProtocol = protocols.get(device.config.protocol)
        self.stream = stream
        self.client = client
        self.running: Running | None = None
        self.broken = False
        self._fd = wire.fileno(stream)

    async def serve(self) -> str:
        """Serves the client until it closes; returns how it ended. ClientGone when it must be dropped.

        When the protocol's host never speaks during an exchange, the reader runs each exchange
        itself (the client's next request waits in the socket meanwhile), saving a task hop a request.
        """
        if not self.protocol.host_speaks_during_exchange:
            return await self._read_requests(self._handle)
        send_queue, queue = trio.open_memory_channel[Request | LocalAnswer](QUEUED_REQUESTS)
        gone: list[ClientGone] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_requests, queue, gone, nursery.cancel_scope)
            async with send_queue:
                why = await self._read_requests(send_queue.send)
        if gone:
            raise gone[0]
        return why

    async def _write(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            await wire.send_all(self.stream, self._fd, data)
        except BROKEN:
            # The answer is still followed to its end, so that none of it reaches the next client.
            self.broken = True

    # -- the reader ------------------------------------------------------------------------------

    async def _read_requests(self, submit: Callable[[Request | LocalAnswer], Awaitable[None]]) -> str:
        framer = self.protocol.host_framer()
        receive = wire.reader(self.stream, READ_SIZE)
        protocol = self.protocol
        silence = self.config.frame_gap if protocol.request_ends_in_silence else protocol.partial_timeout
        while True:
            try:
                if framer.pending:
                    data = None
                    with trio.move_on_after(silence):
                        data = await receive()
                else:
                    # No timer while nothing is pending: a cancel scope a read is measurable here.
                    data = await receive()
            except BROKEN as exc:
                self.broken = True
                return f"connection failed: {exc}"
            if data is None:
                events = framer.flush()
            elif data:
                events = framer.feed(data)
            else:
                for event in framer.flush():
                    await self._dispatch(event, submit)
                return "closed the connection"
            for event in events:
                await self._dispatch(event, submit)

    async def _dispatch(self, event: Event, submit: Callable[[Request | LocalAnswer], Awaitable[None]]) -> None:
        running = self.running
        if running is not None and not running.exchange.complete and running.exchange.from_host(event):
            if running.lease is not None:
                # A lost link fails the exchange; the runner reports it.
                with contextlib.suppress(LinkLost):
                    await running.lease.send(event.raw)
            if running.exchange.complete:
                running.finish()
        elif self.protocol.is_request(event):
            await submit(Request(event))
        else:
            logger.info(
                "{}: client {} sent {} bytes that are no {} request, dropped: {}",
                self.device.name,
                self.client,
                len(event.raw),
                self.protocol.name,
                log.hexdump(event.raw, 32),
            )
            answer = self.protocol.reject_answer(event) if isinstance(event, Junk) else None
            if answer:
                await submit(LocalAnswer(answer))

    # -- the runner ------------------------------------------------------------------------------

    async def _run_requests(
        self, queue: trio.MemoryReceiveChannel, gone: list[ClientGone], scope: trio.CancelScope
    ) -> None:
        """Runs the queued requests in order; a ClientGone ends the reader too (handed over in `gone`)."""
        async with queue:
            try:
                async for item in queue:
                    await self._handle(item)
            except ClientGone as exc:
                gone.append(exc)
                scope.cancel()

    async def _handle(self, item: Request | LocalAnswer) -> None:
        if isinstance(item, LocalAnswer):
            await self._write(item.data)
        elif self.broken:
            # Nobody would see the answer: a queued command is not run for a client that is gone.
            logger.info(
                "{}: request of client {} dropped: the client is gone: {}",
                self.device.name,
                self.client,
                log.hexdump(item.event.raw, 16),
            )
        else:
            await self._run(item.event)

    async def _run(self, request: Event) -> None:
        device = self.device
        running = Running(self.protocol.exchange(request), self.config.frame_gap)
        started = trio.current_time()

        async def to_client(data: bytes) -> None:
            exchange = running.exchange
            if exchange.complete:
                device.counters.unsolicited_bytes += len(data)
                return
            running.last_byte = now = trio.current_time()
            if exchange.ends_in_silence:
                running.wait.deadline = min(running.exchange_deadline, now + running.frame_gap)
            elif not running.answer_size:
                running.wait.deadline = running.exchange_deadline
            running.answer_size += len(data)
            if len(running.answer_head) < 32:
                running.answer_head += data[: 32 - len(running.answer_head)]
            exchange.from_device(data)
            await self._write(data)
            if exchange.complete:
                running.finish()

        try:
            async with device.lease(self.client, to_client, log_level="DEBUG") as lease:
                running.lease = lease
                self.running = running
                try:
                    result = await self._exchange(lease, running, request)
                finally:
                    self.running = None
        except Refused as exc:
            device.count_exchange("refused", 0.0)
            await self._refused(request, exc)
            return
        duration = trio.current_time() - started
        device.count_exchange(result, duration)
        if result != "ok" and not running.exchange.complete:
            await self._write(running.exchange.failure_answer())
        logger.opt(lazy=True).debug(
            "{}: {} exchange for {}: {} -> {} ({} bytes) in {:.3f} s",
            lambda: device.name,
            lambda: result,
            lambda: self.client,
            lambda: log.hexdump(request.raw, 16),
            lambda: log.hexdump(bytes(running.answer_head), 16) or "nothing",
            lambda: running.answer_size,
            lambda: duration,
        )

    async def _exchange(self, lease: Lease, running: Running, request: Event) -> str:
        """Sends the request and waits for the exchange to complete; returns "ok" or why it failed.

        One wait, whose deadline is response_timeout until the device's first byte, then
        exchange_timeout (or frame_gap of silence, for protocols whose answers end in it).
        """
        device, config, exchange = self.device, self.config, running.exchange
        running.exchange_deadline = trio.current_time() + config.exchange_timeout
        running.wait.deadline = trio.current_time() + config.response_timeout
        # One cancel scope serves both: the lease's (ended when the link is lost) and the wait's.
        lease.cancel_scope = running.wait
        try:
            await lease.send(request.raw)
        except LinkLost as exc:
            return f"link lost ({exc})"
        while not exchange.complete:
            with running.wait:
                await running.done.wait()
            if lease.ended is not None:
                return f"link lost ({lease.ended})"
            if exchange.complete:
                break
            if not exchange.answered:
                device.reset_link(f"no answer within response_timeout = {config.response_timeout:g} s")
                return "timeout"
            if trio.current_time() >= running.exchange_deadline:
                limit = config.exchange_timeout
                device.reset_link(f"exchange not complete within exchange_timeout = {limit:g} s")
                return "timeout"
            exchange.quiet()
            running.wait = trio.CancelScope(
                deadline=min(running.exchange_deadline, running.last_byte + config.frame_gap)
            )
            lease.cancel_scope = running.wait
        return "ok"

    async def _refused(self, request: Event, refusal: Refused) -> None:
        answer = self.config.busy_reply
        if answer == AUTO:
            answer = self.protocol.busy_answer(request) or b""
        logger.info(
            "{}: request of client {} refused: {}{}",
            self.device.name,
            self.client,
            refusal,
            "" if answer else "; closing the connection (no busy answer to give)",
        )
        if not answer:
            raise ClientGone(f"refused ({refusal.reason})")
        await self._write(answer)
