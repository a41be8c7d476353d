"""Exchange sharing (ECRService): clients stay connected and take turns, one request and answer at a time.

Each client's task splits what it sends into the protocol's requests and queues them at the device, in
order; a message that belongs to the client's exchange in progress (a Shtrih host ACK, say) goes to the
device at once. The device keeps one queue for all clients. The device's reader drives the rest: it
streams each answer back to its client as it arrives (an ACK before the rest), and when the protocol says
the exchange is complete it writes the next queued request, then passes the answer's last bytes on.
One clock task per device keeps the times: response_timeout, exchange_timeout, frame_gap (raw) and
acquire_timeout for queued requests.

The device is never given to the next request while it may still be answering the last one (settling):
when the client left mid-exchange the proxy plays the rest of the host's part (an ACK, an EOT, a C2, a
break) and drops the answer; when the first byte is late the device waits for it until exchange_timeout.
After a timeout the proxy never answers in the device's name:
the client's own driver timeout applies, as on a direct line. When the link is lost mid-answer, the client
receiving that answer is disconnected, so that its driver starts again from a clean frame.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import trio
from loguru import logger

from proxy import log, wire
from proxy.answers import Answer, Verdict
from proxy.config import AUTO
from proxy.counters import ExchangeResult
from proxy.device import BROKEN, LinkLost, State
from proxy.events import Kind
from proxy.protocols import NUMBERS_PER_REQUEST, Event, Frame, Junk
from proxy.recording import Take, recorder_for, run_beside

if TYPE_CHECKING:
    from proxy.clients import Client
    from proxy.device import Device

# Requests a client may have at the device (queued or running) before the proxy stops reading from it
# (TCP then pushes back on the client).
QUEUED_REQUESTS = 64
# Bytes a client may send that form no request, since its last request, before it is disconnected: no
# driver sends that much garbage, and scanning it costs every other device time.
JUNK_LIMIT = 65536
PING = "ping"


class Queued:
    """A request waiting for the device; `client` is None for the proxy's own (a ping)."""

    __slots__ = ("client", "queued_at", "request", "then")

    def __init__(self, client: ExchangeClient | None, request: Event, queued_at: float) -> None:
        self.client = client
        self.request = request
        self.queued_at = queued_at
        # What the proxy itself answers the client after this request's answer (a NAK for a corrupt
        # frame the client sent next), so that the client sees answers in the order it asked.
        self.then = b""


class Flight:
    """The request the device is answering now."""

    __slots__ = ("answer", "answer_head", "answer_size", "orphan_pending", "queued", "take")

    def __init__(self, queued: Queued, answer: Answer) -> None:
        self.queued = queued
        self.answer = answer
        # The exchange as it is recorded (`record`), or None.
        self.take: Take | None = None
        self.answer_head = b""
        self.answer_size = 0
        # The client left; the clock plays the host's part for it at its next tick.
        self.orphan_pending = False

    @property
    def client(self) -> ExchangeClient | None:
        return self.queued.client

    @property
    def name(self) -> str:
        return self.queued.client.name if self.queued.client is not None else PING


class ExchangeSharing:
    """The device's queue of requests, the one in flight, and the clock that keeps their times."""

    needs_task = True

    def __init__(self, device: Device) -> None:
        self.device = device
        self.config = device.config
        self.protocol = device.protocol
        self._queue: deque[Queued] = deque()
        self._flight: Flight | None = None
        # One framer for the device's side, reset at each request; raw answers need none.
        self._framer = self.protocol.device_framer() if device.config.protocol != "raw" else None
        self._wake_at = math.inf
        self._clock: trio.CancelScope | None = None
        # Answer bytes on their way to a client that has not taken them yet: meanwhile the device is not
        # read, so its silence means nothing (raw answers end in silence; a request's answer may be
        # waiting in the kernel).
        self._delivering = 0
        self._stopping = False
        # Counts the requests written, for protocols that renumber their packets (Exchange.request_bytes).
        self._written = 0
        self.recorder = recorder_for(device.config)

    @property
    def holder(self) -> str | None:
        return self._flight.name if self._flight is not None else None

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def held_since(self) -> float | None:
        return self._flight.answer.sent_at if self._flight is not None else None

    def waiters(self) -> list[tuple[str, float]]:
        return [(queued.client.name if queued.client else PING, queued.queued_at) for queued in self._queue]

    # -- the clock -------------------------------------------------------------------------------

    async def run(self) -> None:
        """The device's clock, and the recorder's writer beside it when the device records."""
        await run_beside(self.recorder, self._run_clock)

    async def _run_clock(self) -> None:
        """The device's clock: wakes at the earliest deadline of the request in flight and the queue."""
        while True:
            with trio.CancelScope(deadline=self._wake_at) as self._clock:
                await trio.sleep_forever()
            self._clock = None
            self._wake_at = math.inf
            await self._tick()

    def _arm(self, when: float) -> None:
        """Makes the clock wake no later than `when`; deadlines that moved later are found at the wake."""
        if when < self._wake_at:
            self._wake_at = when
            if self._clock is not None:
                self._clock.deadline = when

    async def _tick(self) -> None:
        now = trio.current_time()
        flight = self._flight
        if flight is not None and flight.orphan_pending:
            await self._orphan(flight)
        flight = self._flight
        if flight is not None:
            await self._check(flight, now)
        if self._flight is None and self.device.link_up:
            await self._start_next()
        await self._expire(trio.current_time())
        if self._flight is not None:
            self._arm(self._flight.answer.deadline())
            if self._framer is not None and self._framer.pending:
                self._arm(self._flight.answer.last_byte + self.protocol.device_partial_timeout)
        if self._queue:
            self._arm(self._queue[0].queued_at + self.config.acquire_timeout)

    async def _check(self, flight: Flight, now: float) -> None:
        device, config = self.device, self.config
        if self._delivering:
            # The reader is held by a slow client (for at most client_write_timeout): its own answer's
            # silence, or the time the next request has waited behind it, counts again from now.
            if flight.answer.answered:
                flight.answer.last_byte = now
            else:
                flight.answer.restart(now)
            return
        framer = self._framer
        if (
            framer is not None
            and framer.pending
            and now >= flight.answer.last_byte + self.protocol.device_partial_timeout
        ):
            # The device went quiet inside what looked like a frame: a false start (line noise), which
            # is rescanned so that an answer behind it is found.
            passed, replies, dropped = flight.answer.feed(framer.flush(), flight.answer.last_byte)
            if replies:
                await self._write_for_absent_host(flight, replies)
            if dropped:
                self.device.discarded(dropped, f"an earlier request (now {flight.name})")
            if passed:
                await self._pass_on(flight, passed)
            if self._flight is not flight:
                return
        verdict = flight.answer.check(now)
        if verdict is Verdict.COMPLETE:
            await self._finish(flight)
        elif verdict is Verdict.NO_ANSWER:
            self._fail(flight, ExchangeResult.TIMEOUT, "no answer within response_timeout")
        elif verdict is Verdict.EXPIRED:
            # Whatever the host still owed (an ACK of the answer, a break) is played now: a reset does not
            # clear an answer that waits in the device for its ACK, and the next client would get it.
            exchange = flight.answer.exchange
            was_orphaned = exchange.orphaned
            replies = exchange.host_gone()
            if replies:
                await self._write_for_absent_host(flight, replies)
            if self._flight is not flight:
                return
            if replies and not exchange.complete and not was_orphaned:
                # What was played calls for an answer (an ENQ fetching a pending response): the client,
                # holding half an exchange, is let go, and the device gets its time once more.
                if flight.client is not None and not flight.client.gone:
                    flight.client.client.disconnect("disconnected: not complete within exchange_timeout")
                flight.answer.restart(now)
                self._arm(flight.answer.deadline())
                return
            self._fail(flight, ExchangeResult.TIMEOUT, "not complete within exchange_timeout")
            if not exchange.complete:
                device.reset_link(f"exchange for {flight.name} not complete within exchange_timeout")
        elif verdict is Verdict.LATE:
            device.set_state(State.SETTLING)
            logger.info(
                "{}: settling: no answer to {} within response_timeout = {:g} s; the device may still be "
                "answering, so the next request waits for it (at most exchange_timeout = {:g} s)",
                device.name,
                flight.name,
                config.response_timeout,
                config.exchange_timeout,
                device=device.name,
                client=flight.name,
                event="settling",
            )

    async def _expire(self, now: float) -> None:
        """Refuses the queued requests that waited acquire_timeout (all of them when the device gave up)."""
        queue, limit = self._queue, self.config.acquire_timeout
        while queue and (self.device.gave_up or queue[0].queued_at + limit <= now):
            queued = queue.popleft()
            self.device.notify()
            if queued.client is not None and not queued.client.gone:
                await self._refuse(queued)

    async def _refuse(self, queued: Queued) -> None:
        device, client = self.device, queued.client
        refusal = device.refusal()
        device.counters.lock_wait_seconds.observe(trio.current_time() - queued.queued_at)
        device.count_exchange(ExchangeResult.REFUSED, 0.0)
        device.events.record(Kind.REFUSED, str(refusal), client.name)
        answer = self.config.busy_reply
        if answer == AUTO:
            answer = self.protocol.busy_answer(queued.request) or b""
        logger.info(
            "{}: request of client {} refused: {}{}",
            device.name,
            client.name,
            refusal,
            "" if answer else "; closing the connection (no busy answer to give)",
            device=device.name,
            client=client.name,
            event="refused",
            reason=refusal.reason,
        )
        if not answer:
            client.done(queued)
            client.client.disconnect(f"refused ({refusal.reason}), no busy answer to give")
            return
        await client.answer(queued, answer)

    # -- requests in and out ---------------------------------------------------------------------

    async def submit(self, queued: Queued) -> None:
        """Queues a client's request, and starts it at once when the device is free."""
        device = self.device
        if self._stopping:
            if queued.client is not None:
                queued.client.done(queued)  # the device is stopping: its client is about to be closed
            return
        if self._flight is None and not self._queue and device.link_up:
            await self._start(queued)
            return
        self._queue.append(queued)
        device.notify()
        if self.config.release_port and not device.link_up:
            device.demand_link()
        self._arm(trio.current_time() if device.gave_up else queued.queued_at + self.config.acquire_timeout)

    async def _start_next(self) -> None:
        queue = self._queue
        while queue and self._flight is None:
            queued = queue.popleft()
            self.device.notify()
            if queued.client is not None and queued.client.gone:
                continue
            await self._start(queued)
            return
        if not queue and self._flight is None:
            self.device.set_state(State.IDLE)
            if self.config.release_port and self.device.link_up:
                self.device.release_link()

    async def _start(self, queued: Queued) -> None:
        """Makes `queued` the request in flight and writes it; the device's reader takes it from there."""
        device, config = self.device, self.config
        now = trio.current_time()
        flight = Flight(queued, Answer(self.protocol.exchange(queued.request), config, now))
        self._flight = flight
        if self.recorder is not None and queued.client is not None:
            flight.take = self.recorder.take(flight.name, queued.request.raw, now)
        if self._framer is not None:
            self._framer.reset()
        device.discard_stale()
        device.counters.leases_granted += 1
        device.counters.lock_wait_seconds.observe(now - queued.queued_at)
        device.set_state(State.BUSY)
        self._arm(flight.answer.deadline())
        if queued.client is not None and queued.client.done_sending:
            flight.orphan_pending = True  # its client can send no part of the exchange any more
            self._arm(now)
        if config.switches_baud:
            # Each exchange starts at the line's own rate (an IEC session before may have switched it).
            await device.follow_line_rate(None)
        # Numbers for the request's own later packets too (ATOL v3: C2, polls), none serving twice in a row.
        self._written += NUMBERS_PER_REQUEST
        request = flight.answer.exchange.request_bytes(queued.request.raw, self._written)
        try:
            await device.write(request, config.response_timeout, flight.name)
        except LinkLost:
            if self._flight is flight:
                self._fail(flight, ExchangeResult.LINK_LOST, "the link was lost")
        except trio.TooSlowError:
            if self._flight is flight:
                self._fail(flight, ExchangeResult.TIMEOUT, "the device did not take the request")
                device.reset_link(f"the device took no byte of {flight.name}'s request for response_timeout")

    async def from_host(self, client: ExchangeClient, event: Event) -> bool:
        """A client's message that belongs to its exchange in flight goes to the device now; else False."""
        flight = self._flight
        if flight is None or flight.client is not client or flight.answer.complete:
            return False
        exchange = flight.answer.exchange
        if not exchange.from_host(event):
            return False
        # The device answers this message in its own time: the exchange's timeouts count from it (an
        # IEC session lasts as long as its reader keeps asking).
        flight.answer.restart(trio.current_time())
        try:
            await self.device.write(exchange.host_bytes(event), self.config.response_timeout, client.name)
        except LinkLost:
            pass  # the link's loss ends the exchange
        except trio.TooSlowError:
            self.device.reset_link(f"the device took no byte from {client.name} for response_timeout")
        else:
            await self.device.follow_line_rate(exchange.line_rate)
        if flight.answer.complete and self._flight is flight:
            await self._finish(flight)
        return True

    # -- the device's side -----------------------------------------------------------------------

    async def device_bytes(self, data: bytes, now: float) -> None:
        flight = self._flight
        if flight is None:
            self.device.unsolicited(data)
            return
        answer = flight.answer
        if self._framer is None:
            answer.heard(now)
            passed, replies, dropped = data, b"", b""
        else:
            # Only what can be this exchange's answer is passed on: a repeated or late answer to an
            # earlier request is dropped here, not handed to this client.
            events = self._framer.feed(data)
            if not events:
                answer.heard(now)  # part of a message: the answer has begun
            passed, replies, dropped = answer.feed(events, now)
        if replies:
            await self._write_for_absent_host(flight, replies)
        if dropped:
            self.device.discarded(dropped, f"an earlier request (now {flight.name})")
        if answer.complete and self._flight is flight:
            await self._finish(flight, passed)
            return
        if passed:
            await self._pass_on(flight, passed)
        if answer.complete:
            return
        if answer.exchange.ends_in_silence:
            self._arm(answer.deadline())
        elif self._framer is not None and self._framer.pending:
            self._arm(now + self.protocol.device_partial_timeout)

    async def _pass_on(self, flight: Flight, data: bytes) -> None:
        """The answer's bytes go to its client, or are dropped when it is gone (or is disconnected now)."""
        if len(flight.answer_head) < 32:
            flight.answer_head += data[: 32 - len(flight.answer_head)]
        flight.answer_size += len(data)
        if flight.take is not None:
            flight.take.answered(data, trio.current_time())
        client = flight.client
        self._delivering += 1
        try:
            delivered = client is not None and not client.gone and await client.client.send(data)
        finally:
            self._delivering -= 1
        if not delivered:
            self.device.discarded(data, flight.name)
            if client is not None:
                # Its task reads its requests: end it; the exchange goes on to its end without it.
                client.client.disconnect(client.client.gone or "gone")

    async def _write_for_absent_host(self, flight: Flight, replies: bytes) -> None:
        try:
            await self.device.write(replies, self.config.response_timeout, f"the proxy for {flight.name}")
        except LinkLost:
            pass
        except trio.TooSlowError:
            self.device.reset_link("the device took no byte for response_timeout")

    async def _finish(self, flight: Flight, last: bytes = b"") -> None:
        """The exchange is complete: the next request is written first, so that the device works on it
        while the rest is done: the answer's last bytes (`last`, not yet passed on) go to its client, then
        the count, the log, and what the proxy owes the client after the answer.

        The next request leaves before the answer's last bytes, with no scheduling point between the
        read that completed the answer and its write (unless the device is owed a reply or switches its
        rate first): passing the bytes on first wakes the client's
        process, which then takes the free CPU just when the device's side (a converter, a simulator on
        the same machine) should start on the request (bench/exchange.py, 100 clients: 88-91% of the
        direct rate that way, 96-98% this way). A client slow to take them holds the device's reader (at
        most client_write_timeout), as it would hold a direct line; the next request's times wait for the
        reader meanwhile (_check). A link reset by the next request's write (a device that takes no byte)
        cancels the reader: the complete answer is still delivered and counted (shielded; a client that
        takes nothing is let go at client_write_timeout, one whose connection closes at once).
        """
        self._flight = None
        if self.config.switches_baud:
            await self.device.follow_line_rate(None)  # an IEC session ended: back to the sign-on rate
        await self._start_next()
        with trio.CancelScope(shield=True):
            await self._answered(flight, last)

    async def _answered(self, flight: Flight, last: bytes) -> None:
        """The complete answer's last bytes go to its client, then the count, the log, and what it is owed."""
        if last:
            await self._pass_on(flight, last)
        client, answer = flight.client, flight.answer
        if client is None:
            result = None
        elif client.gone:
            result = ExchangeResult.CLIENT_GONE
        else:
            result = ExchangeResult.LATE if answer.late else ExchangeResult.OK
        self._log(flight, result or "ok")
        if flight.take is not None and result is not None:
            self.recorder.finish(flight.take, trio.current_time(), result)
        if result is not None:
            seconds = trio.current_time() - answer.sent_at
            self.device.count_exchange(result, seconds)
            self.device.events.record(Kind.EXCHANGE, result, flight.name, seconds)
        if client is not None:
            await client.answer(flight.queued, b"")

    def _fail(self, flight: Flight, result: ExchangeResult, why: str) -> None:
        """The exchange ends without a complete answer. Must not wait: the link's loss calls it."""
        self._flight = None
        client = flight.client
        self._log(flight, f"{result} ({why})")
        if client is None:
            return
        if flight.take is not None:
            self.recorder.finish(flight.take, trio.current_time(), result)
        seconds = trio.current_time() - flight.answer.sent_at
        self.device.count_exchange(result, seconds)
        self.device.events.record(Kind.EXCHANGE, f"{result}: {why}", flight.name, seconds)
        client.done(flight.queued)
        if flight.answer.answered and not client.gone:
            # The client has part of an answer: a direct line would have dropped it here too, and its
            # driver starts again from a clean frame.
            client.client.disconnect(f"disconnected: {why} while it was receiving an answer")

    def _log(self, flight: Flight, result: str) -> None:
        device = self.device
        if not device.debugging:
            return
        logger.debug(
            "{}: {} exchange for {}: {} -> {} ({} bytes) in {:.3f} s",
            device.name,
            result,
            flight.name,
            log.hexdump(flight.queued.request.raw, 16),
            log.hexdump(flight.answer_head, 16) or "nothing",
            flight.answer_size,
            trio.current_time() - flight.answer.sent_at,
            device=device.name,
            client=flight.name,
            event="exchange",
        )

    async def _orphan(self, flight: Flight) -> None:
        """The flight's client left: the proxy plays the rest of the host's part, and the device settles."""
        flight.orphan_pending = False
        exchange = flight.answer.exchange
        replies = exchange.host_gone()
        if replies:
            await self._write_for_absent_host(flight, replies)
            # The device answers what was played for the host in its own time (an ENQ, a C2, an EOT).
            flight.answer.restart(trio.current_time())
        if self._flight is not flight:
            return
        if exchange.complete:
            await self._finish(flight)
            return
        self.device.set_state(State.SETTLING)
        logger.info(
            "{}: settling: {} left while the device was answering it; the next request goes when the answer "
            "is complete (at most exchange_timeout = {:g} s)",
            self.device.name,
            flight.name,
            self.config.exchange_timeout,
            device=self.device.name,
            client=flight.name,
            event="settling",
        )

    def client_stopped_sending(self, client: ExchangeClient) -> None:
        """`client` closed its sending side: it still gets its answers, but its part of an exchange (an
        ACK of the answer, a break) can no longer come, so the proxy plays it, as for a client that left."""
        flight = self._flight
        if flight is not None and flight.client is client and not flight.answer.complete:
            flight.orphan_pending = True
            self._arm(trio.current_time())

    def client_left(self, client: ExchangeClient) -> None:
        """`client` is gone: its queued requests are dropped, its request in flight settles without it."""
        flight = self._flight
        if flight is not None and flight.client is client and not flight.answer.complete:
            flight.orphan_pending = True
            self._arm(trio.current_time())
        if any(queued.client is client for queued in self._queue):
            self._queue = deque(queued for queued in self._queue if queued.client is not client)
            self.device.notify()

    # -- the link, the status API, pings ---------------------------------------------------------

    def link_up(self) -> None:
        if self._queue:
            self._arm(trio.current_time())

    def link_down(self, reason: str | None) -> None:
        flight = self._flight
        if flight is not None:
            self._fail(flight, ExchangeResult.LINK_LOST, f"link lost ({reason or 'closed'})")

    def gave_up(self) -> None:
        self._arm(trio.current_time())

    def stop(self) -> None:
        self._stopping = True
        self._queue.clear()
        self.device.notify()
        flight = self._flight
        if flight is not None and flight.client is not None and not flight.client.gone:
            flight.client.client.disconnect("disconnected: the device is being stopped")

    def disconnect_holder(self) -> str | None:
        flight = self._flight
        if flight is None or flight.client is None or flight.client.gone:
            return None
        flight.client.client.disconnect("disconnected through the status API")
        return flight.name

    def ping(self, data: bytes, nursery: trio.Nursery) -> bool:
        if self._flight is not None or self._queue or not self.device.link_up:
            return False
        self._queue.append(Queued(None, Frame(data), trio.current_time()))
        self._arm(trio.current_time())
        return True

    async def serve(self, client: Client) -> str:
        return await ExchangeClient(self, client).serve()


class ExchangeClient:
    """One client connection under exchange sharing: its requests, in order, and what it is owed."""

    def __init__(self, sharing: ExchangeSharing, client: Client) -> None:
        self.sharing = sharing
        self.client = client
        self.name = client.name
        self.device = sharing.device
        self.protocol = sharing.protocol
        # Requests at the device, queued or in flight; the last one submitted.
        self.outstanding = 0
        self._junk = 0
        # It closed its sending side: its requests still run, with the host's part played by the proxy.
        self.done_sending = False
        self._last: Queued | None = None
        self._changed: trio.Event | None = None

    @property
    def gone(self) -> bool:
        return self.client.gone is not None

    async def serve(self) -> str:
        """Reads requests until the client closes; answers its remaining requests; returns how it ended."""
        why = "cancelled"
        try:
            why = await self._read_requests()
            if why == "closed the connection":
                # It only closed its sending side: it still gets the answers to what it asked.
                self.done_sending = True
                self.sharing.client_stopped_sending(self)
                while self.outstanding and not self.gone:
                    await self._wait_for_change()
            return why
        finally:
            self.client.leaving(why)
            self.sharing.client_left(self)

    async def _wait_for_change(self) -> None:
        self._changed = trio.Event()
        await self._changed.wait()

    def done(self, queued: Queued) -> None:
        """One of this client's requests left the device (answered, failed or refused)."""
        self.outstanding -= 1
        if queued is self._last:
            self._last = None
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def answer(self, queued: Queued, data: bytes) -> None:
        """Ends `queued` for this client, with `data` (a busy answer) and what the proxy owes it after."""
        self.done(queued)
        data += queued.then
        if data and not self.gone and not await self.client.send(data):
            self.client.disconnect(self.client.gone or "gone")

    async def _read_requests(self) -> str:
        device, protocol = self.device, self.protocol
        framer = protocol.host_framer(device.config.max_message)
        receive = wire.reader(self.client.stream, device.client_read_size)
        silence = device.config.frame_gap if protocol.request_ends_in_silence else protocol.partial_timeout
        junk_logged = False
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
                return f"connection failed: {exc}"
            events = framer.flush() if not data else framer.feed(data)
            for event in events:
                junk_logged = await self._dispatch(event, junk_logged)
            if data is not None and not data:
                return "closed the connection"

    async def _dispatch(self, event: Event, junk_logged: bool) -> bool:
        """Sends one message where it belongs; returns whether junk from this client was just logged."""
        sharing = self.sharing
        if await sharing.from_host(self, event):
            return False
        if self.protocol.is_request(event):
            self._junk = 0
            while self.outstanding >= QUEUED_REQUESTS:
                await self._wait_for_change()
            self.outstanding += 1
            # The last request before it is submitted: a NAK that follows it waits for its answer.
            self._last = queued = Queued(self, event, trio.current_time())
            await sharing.submit(queued)
            return False
        self._junk += len(event.raw)
        if self._junk > JUNK_LIMIT:
            self.client.disconnect(f"sent {self._junk} bytes that are no {self.protocol.name} request; disconnected")
            return True
        # One line per burst of junk: a peer sending garbage must not flood the log.
        level = "DEBUG" if junk_logged else "INFO"
        logger.log(
            level,
            "{}: client {} sent {} bytes that are no {} request, dropped: {}",
            self.device.name,
            self.name,
            len(event.raw),
            self.protocol.name,
            log.hexdump(event.raw, 32),
            device=self.device.name,
            client=self.name,
            event="junk",
            size=len(event.raw),
        )
        reply = self.protocol.reject_answer(event) if isinstance(event, Junk) else None
        if reply:
            if self._last is not None:
                self._last.then += reply
            elif not await self.client.send(reply):
                self.client.disconnect(self.client.gone or "gone")
        return True
