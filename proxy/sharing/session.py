"""Session sharing (the ATOL remote server): one client holds the device for its whole connection.

Clients wait in arrival order, up to acquire_timeout. While a client holds the device, its bytes go to
the device as they come and the device's bytes come back to it. When its turn ends (it closed or reset
its connection, the status API or idle_timeout ended it) while the device may still be answering it, the
device settles before the next client gets it: the answer goes to the client if it still reads (it only
closed its sending side), else it is dropped, and the protocol's framers say when it is complete (raw:
frame_gap of silence after it began, or response_timeout with no byte), within exchange_timeout.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import trio
from loguru import logger

from proxy import wire
from proxy.answers import Answer, Verdict
from proxy.config import DeviceConfig
from proxy.device import BROKEN, LinkLost, Refused, State
from proxy.events import Kind
from proxy.protocols import DeviceProtocol, Event
from proxy.protocols.raw import RawExchange
from proxy.recording import Recorder, Take, recorder_for

if TYPE_CHECKING:
    from proxy.clients import Client
    from proxy.device import Device

CLOSED = "closed the connection"


# What the device sent, sorted: (to pass on to the client, the host's part the proxy plays, to drop).
Sorted = tuple[bytes, bytes, bytes]


class RawTracker:
    """What a raw device may still owe: the answer to the client's last bytes (raw has no frames).

    A raw device may speak first (a scale, a reader): all it sends goes to the client as it comes.

    Recorded (`record`), an exchange is what the client sent until the device answered, and the answer
    is all the device sent until the client spoke again (or its turn ended): pairs split by silence.
    """

    holds_partial = False
    line_rate = None

    def __init__(self, config: DeviceConfig, recorder: Recorder | None = None, client: str = "") -> None:
        self._config = config
        self._answer: Answer | None = None
        self._recorder = recorder
        self._client = client
        self._take: Take | None = None

    def client_sent(self, data: bytes, now: float) -> None:
        answer = self._answer
        if answer is None or answer.answered or answer.complete:
            self._answer = Answer(RawExchange(), self._config, now)
        else:
            answer.sent_at = now
        if self._recorder is not None:
            take = self._take
            if take is None or take.first_byte is not None:
                self.end_recording(now)
                self._take = self._recorder.take(self._client, data, now)
            else:
                take.requested(data)

    def device_sent(self, data: bytes, now: float) -> Sorted:
        answer = self._answer
        if answer is not None and not answer.complete:
            answer.heard(now)
        if self._take is not None:
            self._take.answered(data, now)
        return data, b"", b""

    def end_recording(self, now: float) -> None:
        """The pair recorded so far is complete (the client spoke again, or its turn ended)."""
        take, self._take = self._take, None
        if take is not None and self._recorder is not None:
            self._recorder.finish(take, now, "ok" if take.first_byte is not None else "no_answer")

    def pending(self) -> Answer | None:
        answer = self._answer
        return answer if answer is not None and not answer.complete else None

    def host_gone(self) -> bytes:
        return b""

    def client_left(self) -> float:
        return -math.inf  # a raw message ends in silence: the client cannot leave one unfinished

    def next_look(self, answer: Answer) -> float:
        return answer.deadline()

    def quiet_deadline(self) -> float:
        return math.inf

    def flush_if_quiet(self, now: float) -> Sorted:
        return b"", b"", b""


class FramedTracker:
    """What a device that speaks a protocol may still owe: the answers to the client's requests, found by
    the protocol's framers on both sides, in order.

    Only what can be an answer is passed on: a message the protocol says belongs to another request (a
    repeated or late answer) is dropped, and so is all the device sends before the client has sent
    anything, since these devices never speak first. A message with no answer owed, after the client
    spoke, is passed on as it would be on a direct line.

    Recorded (`record`), each request is an exchange, with the messages passed on as its answer.
    """

    def __init__(
        self, protocol: DeviceProtocol, config: DeviceConfig, recorder: Recorder | None = None, client: str = ""
    ) -> None:
        self._protocol = protocol
        self._config = config
        self._recorder = recorder
        self._client = client
        # The exchanges being recorded, in order, each with the Answer that says when it is complete.
        self._takes: deque[tuple[Answer, Take]] = deque()
        self._host = protocol.host_framer()
        self._device = protocol.device_framer()
        self._answers: deque[Answer] = deque()
        self._spoken = False
        self._last_byte = 0.0
        # When the client last sent anything: an exchange it has left alone this long is abandoned.
        self.last_client_bytes = trio.current_time()

    @property
    def holds_partial(self) -> bool:
        """Part of a message from the device is held until it is whole (or found to be line noise)."""
        return self._device.pending > 0

    @property
    def line_rate(self) -> int | None:
        """The rate the latest exchange agreed while it runs (IEC 61107 mode C), else None."""
        last = self._answers[-1] if self._answers else None
        return last.exchange.line_rate if last is not None and not last.complete else None

    def client_sent(self, data: bytes, now: float) -> None:
        self._spoken = True
        self.last_client_bytes = now
        self._take(self._host.feed(data), now)
        if self._takes:
            self._record_complete(now)  # the host's own part may have ended an exchange (a final ACK)

    def client_left(self) -> float:
        """The client sends nothing more: what its framer held back is taken as it stands (a truncated
        request, or a lone IEC ACK that may have been the start of an option select). Returns when the
        device has dropped what the client left unfinished (the protocol's request_byte_timeout after
        its last byte), or -inf when its last bytes ended a message."""
        held_back = self._host.flush()
        if not held_back:
            return -math.inf
        self._take(held_back, self.last_client_bytes)
        return self.last_client_bytes + self._protocol.request_byte_timeout

    def _take(self, events: list[Event], now: float) -> None:
        """The client's messages: a part of the exchange in progress, or a request that starts one."""
        protocol, answers = self._protocol, self._answers
        for event in events:
            last = answers[-1] if answers else None
            if last is not None and not last.complete and last.exchange.from_host(event):
                last.restart(now)  # its timeouts count from the host's latest message in it
                continue
            if protocol.is_request(event):
                answers.append(Answer(protocol.exchange(event), self._config, now))
                if self._recorder is not None:
                    self._takes.append((answers[-1], self._recorder.take(self._client, event.raw, now)))

    def device_sent(self, data: bytes, now: float) -> Sorted:
        self._last_byte = now
        events = self._device.feed(data)
        if self._answers and not events:
            self._answers[0].heard(now)  # part of a message: the answer has begun
        return self._sort(events, now)

    def _sort(self, events: list[Event], now: float) -> Sorted:
        """The device's messages to the answers owed, in order."""
        answers = self._answers
        passed, replies, dropped = [], [], []
        for event in events:
            while answers and answers[0].complete:
                answers.popleft()
            if answers:
                to_pass, to_play, to_drop = answers[0].feed([event], now)
                if self._takes and to_pass:
                    self._record_answer(answers[0], to_pass, now)
                passed.append(to_pass)
                replies.append(to_play)
                dropped.append(to_drop)
            else:
                (passed if self._spoken else dropped).append(event.raw)
        if self._takes:
            self._record_complete(now)
        return b"".join(passed), b"".join(replies), b"".join(dropped)

    def _record_answer(self, answer: Answer, data: bytes, now: float) -> None:
        for recorded, take in self._takes:
            if recorded is answer:
                take.answered(data, now)
                return

    def _record_complete(self, now: float) -> None:
        """Complete exchanges, in order, go to the recorder."""
        takes = self._takes
        while takes and takes[0][0].complete:
            _, take = takes.popleft()
            self._recorder.finish(take, now, "ok")

    def end_recording(self, now: float) -> None:
        """The client's turn ended: what is still being recorded is recorded as it stands."""
        takes = self._takes
        while takes:
            answer, take = takes.popleft()
            self._recorder.finish(take, now, "ok" if answer.complete else "incomplete")

    def pending(self) -> Answer | None:
        answers = self._answers
        while answers and answers[0].complete:
            answers.popleft()
        return answers[0] if answers else None

    def host_gone(self) -> bytes:
        return b"".join(answer.exchange.host_gone() for answer in self._answers if not answer.complete)

    def quiet_deadline(self) -> float:
        """When a partial message held since the device's last byte is taken for line noise."""
        return self._last_byte + self._protocol.device_partial_timeout if self.holds_partial else math.inf

    def next_look(self, answer: Answer) -> float:
        """When settling must look again: the answer's deadline, or the end of a false start's grace."""
        return min(answer.deadline(), self.quiet_deadline())

    def flush_if_quiet(self, now: float) -> Sorted:
        """The device went quiet inside what looked like a message: a false start, rescanned so that an
        answer behind it is found."""
        if now < self.quiet_deadline():
            return b"", b"", b""
        return self._sort(self._device.flush(), self._last_byte)


Tracker = RawTracker | FramedTracker


class Lease:
    """A hold on the device: a client's whole connection, or a ping's answer; then the device settles."""

    def __init__(self, name: str, client: Client | None, tracker: Tracker) -> None:
        self.name = name
        # The client the device's bytes go to; None once it is gone (or for a ping).
        self.client = client
        self.tracker = tracker
        # The client's pump runs in this scope; end() cancels it.
        self.scope = trio.CancelScope()
        self.ended: str | None = None
        self.link_lost = False
        self.since = trio.current_time()
        # The reader waits for the client to take a chunk: the device is not read meanwhile, so its
        # silence says nothing about the end of an answer.
        self.delivering = False
        self.last_activity = trio.current_time()
        # Set at each chunk from the device while the lease settles.
        self.woken: trio.Event | None = None
        # Set when the device's side holds part of a message, for the task that gives up line noise.
        self.partial: trio.Event | None = None

    def end(self, reason: str) -> None:
        """Ends the client's turn for `reason` (the first reason given is kept); the device then settles."""
        if self.ended is None:
            self.ended = reason
        self.scope.cancel()


class SessionSharing:
    """The device's FIFO lock and the lease that holds it."""

    __slots__ = ("_lease", "_lock", "_stopping", "_switches_baud", "_waiters", "config", "device", "recorder")

    def __init__(self, device: Device) -> None:
        self.device = device
        self.config = device.config
        self._switches_baud = device.config.switches_baud
        # FIFO like trio.Lock (its ParkingLot hands a release to the first waiter), and free of the
        # owning-task rule: a ping's lease is released by its own short task.
        self._lock = trio.Semaphore(1)
        self._lease: Lease | None = None
        # The clients waiting for their turn, in arrival order, with since when.
        self._waiters: dict[Client, float] = {}
        self._stopping = False
        self.recorder = recorder_for(device.config)

    @property
    def needs_task(self) -> bool:
        """Only a recording device needs a task: its recorder's writer."""
        return self.recorder is not None

    @property
    def holder(self) -> str | None:
        return self._lease.name if self._lease is not None else None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def held_since(self) -> float | None:
        return self._lease.since if self._lease is not None else None

    def waiters(self) -> list[tuple[str, float]]:
        return [(client.name, since) for client, since in self._waiters.items()]

    async def run(self) -> None:
        """Session sharing keeps no time of its own (each client's task keeps its own): this runs only the
        recorder's writer, for a device that records."""
        if self.recorder is not None:
            await self.recorder.run()

    def _tracker(self, client: str | None) -> Tracker:
        """A tracker for `client`'s turn (None: a ping's, which is not recorded)."""
        recorder = self.recorder if client is not None else None
        if self.config.protocol == "raw":
            return RawTracker(self.config, recorder, client or "")
        return FramedTracker(self.device.protocol, self.config, recorder, client or "")

    # -- a client's turn -------------------------------------------------------------------------

    async def serve(self, client: Client) -> str:
        """Waits for the device, holds it while the client is connected, settles it, and gives it on.

        Raises Refused when the device did not become free (or did not come online) in acquire_timeout.
        Resource handling: the lock is released on every path, cancellation included.
        """
        lease = await self._acquire(client)
        try:
            return await self._hold(lease, client)
        finally:
            self._release(lease)

    async def _acquire(self, client: Client) -> Lease:
        started = trio.current_time()
        device = self.device
        if self._lock.value and device.link_up and not self.config.release_port:
            # Free and open: nothing to wait for, so no timer and no scheduling round.
            self._lock.acquire_nowait()
        else:
            try:
                await self._wait_for_turn(client)
            except Refused:
                device.counters.lock_wait_seconds.observe(trio.current_time() - started)
                raise
        if self._stopping:
            self._lock.release()
            raise Refused("offline", "the device is being stopped")
        # No checkpoint from here until serve()'s try: a cancellation cannot leave the lock taken.
        lease = Lease(client.name, client, self._tracker(client.name))
        self._lease = lease
        waited = trio.current_time() - started
        device.counters.leases_granted += 1
        device.counters.lock_wait_seconds.observe(waited)
        device.set_state(State.BUSY)
        device.events.record(Kind.LEASE, client=client.name, seconds=waited)
        logger.info(
            "{}: {} holds the device (waited {:.2f} s)",
            device.name,
            client.name,
            waited,
            device=device.name,
            client=client.name,
            event="lease",
        )
        return lease

    async def _wait_for_turn(self, client: Client) -> None:
        """Waits, in arrival order, for the lock and an open link; Refused after acquire_timeout."""
        device = self.device
        holding = granted = False
        self._waiters[client] = trio.current_time()
        device.notify()
        try:
            with trio.move_on_after(self.config.acquire_timeout):
                # acquire_nowait() first, so that acquire_timeout = 0 still takes a free device.
                try:
                    self._lock.acquire_nowait()
                except trio.WouldBlock:
                    await self._lock.acquire()
                holding = True
                if self.config.release_port:
                    device.demand_link()
                while not device.link_up and not device.gave_up:
                    await device.changed()
                granted = device.link_up
        finally:
            del self._waiters[client]
            device.notify()
            if holding and not granted:
                self._lock.release()
        if not granted:
            raise device.refusal()

    async def _hold(self, lease: Lease, client: Client) -> str:
        device = self.device
        await device.follow_line_rate(None)  # each client starts at the line's own rate
        if device.fresh:
            # The first client of a newly connected dial-in device gets what it sent before anyone held
            # it; the Outlet keeps these bytes ahead of whatever the reader passes on next.
            held, device.held, device.fresh = bytes(device.held), bytearray(), False
            if held:
                await self._deliver(lease, held)
        else:
            device.discard_stale()
        why = CLOSED
        with lease.scope:
            why = await self._pump(lease, client)
        why = lease.ended or why
        delivering = why == CLOSED and lease.client is not None and not lease.link_lost
        if not delivering:
            lease.client = None
            await client.close()
        await self._settle(lease, delivering=delivering)
        return why

    async def _pump(self, lease: Lease, client: Client) -> str:
        """Client -> device until the client closes; returns how the turn ended."""
        idle_timeout = self.config.idle_timeout
        framed = isinstance(lease.tracker, FramedTracker)
        if not idle_timeout and not framed:
            return await self._forward(lease, client)
        # Containment: these tasks are this client's; what fails here ends this client's turn
        # (handle_client logs it) and the device settles as after any other end.
        async with trio.open_nursery() as nursery:
            if idle_timeout:
                nursery.start_soon(_end_when_idle, lease, idle_timeout)
            if framed:
                nursery.start_soon(self._give_up_line_noise, lease)
                nursery.start_soon(self._end_abandoned_exchanges, lease)
            why = await self._forward(lease, client)
            nursery.cancel_scope.cancel()
        return why

    async def _give_up_line_noise(self, lease: Lease) -> None:
        """While the client holds the device: a partial message from the device that stays partial past
        the protocol's device_partial_timeout is line noise; it is rescanned, so that what follows it
        reaches the client."""
        tracker = lease.tracker
        while True:
            if not tracker.holds_partial:
                lease.partial = trio.Event()
                await lease.partial.wait()
                continue
            await trio.sleep_until(tracker.quiet_deadline())
            await self._pass_on(lease, tracker.flush_if_quiet(trio.current_time()))

    async def _end_abandoned_exchanges(self, lease: Lease) -> None:
        """While the client holds the device: an exchange whose host part it has left alone for
        exchange_timeout (an IEC programming session, an answer it never ACKed) is finished by the proxy,
        as for a client that left, so that the device is not left in the middle of it."""
        tracker, limit = lease.tracker, self.config.exchange_timeout
        while True:
            deadline = tracker.last_client_bytes + limit
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            replies = tracker.host_gone() if tracker.pending() is not None else b""
            if replies:
                logger.info(
                    "{}: {} left its exchange alone for exchange_timeout = {:g} s; the proxy ended it",
                    self.device.name,
                    lease.name,
                    limit,
                    device=self.device.name,
                    client=lease.name,
                    event="exchange_abandoned",
                )
                await self._write_for_absent_host(lease, replies)
                await self.device.follow_line_rate(tracker.line_rate)
            await trio.sleep(limit)  # nothing more to play until the client speaks again

    async def _forward(self, lease: Lease, client: Client) -> str:
        device, tracker = self.device, lease.tracker
        stall, switches_baud = self.config.response_timeout, self.config.switches_baud
        receive = wire.reader(client.stream, device.client_read_size)
        while True:
            try:
                data = await receive()
            except BROKEN as exc:
                return f"connection failed: {exc}"
            if not data:
                return CLOSED
            now = trio.current_time()
            lease.last_activity = now
            if switches_baud:
                # These bytes go at the rate of the exchange before them (the proxy may have ended it).
                await device.follow_line_rate(tracker.line_rate)
            tracker.client_sent(data, now)
            try:
                await device.write(data, stall, lease.name)
            except LinkLost as exc:
                return f"disconnected: link lost ({exc})"
            except trio.TooSlowError:
                device.reset_link(f"the device took no byte from {lease.name} for response_timeout = {stall:g} s")
                return "disconnected: the device stopped taking bytes"
            if switches_baud:
                await device.follow_line_rate(tracker.line_rate)

    # -- the device's side -----------------------------------------------------------------------

    async def device_bytes(self, data: bytes, now: float) -> None:
        lease = self._lease
        if lease is None:
            self.device.unsolicited(data)
            return
        lease.last_activity = now
        await self._pass_on(lease, lease.tracker.device_sent(data, now))
        if self._switches_baud and lease.tracker.line_rate is None:
            await self.device.follow_line_rate(None)  # an IEC session ended: back to the sign-on rate
        if lease.partial is not None and lease.tracker.holds_partial:
            lease.partial.set()
        if lease.woken is not None:
            lease.woken.set()

    async def _pass_on(self, lease: Lease, sorted_bytes: Sorted) -> None:
        """What the device sent, sorted by the tracker: the host's part played, the rest passed or dropped."""
        passed, replies, dropped = sorted_bytes
        if replies:
            await self._write_for_absent_host(lease, replies)
        if dropped:
            self.device.discarded(dropped, "an earlier client")
        if not passed:
            return
        client = lease.client
        if client is None:
            self.device.discarded(passed, lease.name)
            return
        lease.delivering = True
        try:
            delivered = await client.send(passed)
        finally:
            lease.delivering = False
        if not delivered:
            self._undelivered(lease, client, passed)

    async def _deliver(self, lease: Lease, data: bytes) -> None:
        client = lease.client
        if client is not None and not await client.send(data):
            self._undelivered(lease, client, data)

    def _undelivered(self, lease: Lease, client: Client, data: bytes) -> None:
        """The client is gone (or took no byte for client_write_timeout): its turn ends, `data` is dropped."""
        lease.client = None
        lease.end(client.gone or "connection failed")
        self.device.discarded(data, lease.name)

    async def _write_for_absent_host(self, lease: Lease, replies: bytes) -> None:
        """The host's part of the protocol (an ACK, a break) that the proxy plays for a client that left."""
        try:
            await self.device.write(replies, self.config.response_timeout, f"the proxy for {lease.name}")
        except LinkLost:
            pass
        except trio.TooSlowError:
            self.device.reset_link("the device took no byte for response_timeout")

    async def _settle(self, lease: Lease, *, delivering: bool) -> None:
        """Holds the device while it may still be answering `lease` (see the module docstring).

        The client sends nothing more, so the proxy plays the rest of the host's part of an exchange in
        progress (an ACK, a break) in any case; `delivering` says whether the answer still goes to the
        client (it only closed its sending side) or is dropped.
        """
        device, tracker = self.device, lease.tracker
        if lease.link_lost:
            return
        dropped_at = tracker.client_left()
        if trio.current_time() < dropped_at:
            # The client left inside a message: the device drops it after its byte timeout. Until then
            # the next client's bytes, or what the proxy plays below, would join it.
            device.set_state(State.SETTLING)
            logger.info(
                "{}: settling: {} left in the middle of a message; the device drops it after {:g} s of silence",
                device.name,
                lease.name,
                self.device.protocol.request_byte_timeout,
                device=device.name,
                client=lease.name,
                event="settling",
            )
            await trio.sleep_until(dropped_at)
        if tracker.pending() is None:
            return
        replies = tracker.host_gone()
        if replies:
            await self._write_for_absent_host(lease, replies)
            if (owed := tracker.pending()) is not None:
                owed.restart(trio.current_time())  # the device answers what was played for the host
        if tracker.pending() is None or not device.link_up:
            return
        if not delivering:
            device.set_state(State.SETTLING)
            logger.log(
                "DEBUG" if lease.name == PING else "INFO",
                "{}: settling: the device may still be answering {}; it goes to the next client when the answer "
                "is complete (at most exchange_timeout = {:g} s)",
                device.name,
                lease.name,
                self.config.exchange_timeout,
                device=device.name,
                client=lease.name,
                event="settling",
            )
        waited = False
        while (answer := tracker.pending()) is not None and device.link_up:
            now = trio.current_time()
            if lease.delivering:
                answer.last_byte = now  # the reader is held by the client: no silence can be seen
            flushed = tracker.flush_if_quiet(now)
            if any(flushed):
                await self._pass_on(lease, flushed)
                continue
            verdict = answer.check(now)
            if verdict in (Verdict.WAIT, Verdict.LATE):
                waited = True
                lease.woken = trio.Event()
                with trio.move_on_at(tracker.next_look(answer)):
                    await lease.woken.wait()
                lease.woken = None
            elif verdict is Verdict.EXPIRED and not waited:
                return  # an old request: whatever the device sends now answers nothing of this lease
            elif verdict is Verdict.EXPIRED:
                device.reset_link(f"the answer for {lease.name} was not complete within exchange_timeout")
                return

    def _release(self, lease: Lease) -> None:
        """Gives the device to the next waiter; any task may call it, once per lease."""
        device = self.device
        self._lease = None
        device.line.restore()  # the holder's line settings (RFC 2217) end with its lease
        if self.recorder is not None:
            lease.tracker.end_recording(trio.current_time())
        if lease.name != PING:
            device.events.record(Kind.RELEASE, client=lease.name)
        device.set_state(State.IDLE)
        if self.config.release_port:
            device.release_link()
        self._lock.release()
        device.notify()
        level = "DEBUG" if lease.name == PING else "INFO"
        logger.log(
            level,
            "{}: {} released the device",
            device.name,
            lease.name,
            device=device.name,
            client=lease.name,
            event="release",
        )

    # -- the link, the status API, pings ---------------------------------------------------------

    def link_up(self) -> None:
        if self._lease is not None:
            self.device.set_state(State.BUSY)

    def link_down(self, reason: str | None) -> None:
        lease = self._lease
        if lease is not None:
            lease.link_lost = True
            if reason is not None:
                lease.end(f"disconnected: link lost ({reason})")

    def gave_up(self) -> None:
        """Waiters see device.gave_up at their next look (device.changed() wakes them)."""

    def stop(self) -> None:
        self._stopping = True
        if self._lease is not None and self._lease.client is not None:
            self._lease.end("disconnected: the device is being stopped")

    def disconnect_holder(self) -> str | None:
        lease = self._lease
        if lease is None or lease.client is None:
            return None
        lease.end("disconnected through the status API")
        return lease.name

    def ping(self, data: bytes, nursery: trio.Nursery) -> bool:
        if not self._lock.value or not self.device.link_up:
            return False
        self._lock.acquire_nowait()
        lease = Lease(PING, None, self._tracker(None))
        self._lease = lease
        nursery.start_soon(self._ping, lease, data)
        return True

    async def _ping(self, lease: Lease, data: bytes) -> None:
        """A ping's turn: sent, then held like an exchange until its answer is complete.

        Error handling: it runs in the dial-in server's nursery, so a failure is logged here and ends
        this ping only.
        """
        try:
            lease.tracker.client_sent(data, trio.current_time())
            try:
                await self.device.write(data, self.config.response_timeout, PING)
            except LinkLost:
                return
            except trio.TooSlowError:
                self.device.reset_link("the device took no byte of a ping for response_timeout")
                return
            await self._settle(lease, delivering=False)
        except Exception:
            logger.exception(
                "{}: the ping failed unexpectedly", self.device.name, device=self.device.name, event="error"
            )
        finally:
            self._release(lease)


PING = "ping"


async def _end_when_idle(lease: Lease, idle_timeout: float) -> None:
    """Ends the lease once neither side has sent anything for idle_timeout seconds."""
    while True:
        deadline = lease.last_activity + idle_timeout
        if trio.current_time() >= deadline:
            lease.end(f"disconnected: silent for idle_timeout = {idle_timeout:g} s")
            return
        await trio.sleep_until(deadline)
