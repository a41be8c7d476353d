"""A device's recent history for its status page: a small bounded ring of events, and the live view of its
traffic (the subscribers that watch its bytes while a page is open)."""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import trio

# Events a [[device]] keeps: its page shows them all.
DEVICE_EVENTS = 200
# Events a dial-in device keeps: 10,000 of them must stay small. Measured with tracemalloc: a dial-in
# Device is 2.2 KiB with no event, 2.5 KiB with one, 5.3 KiB with 20 (about 150 bytes an event); a
# meter polled hourly (connect, lease, release, disconnect) fills 20 in five hours.
DIALIN_EVENTS = 20
# Lines a subscriber's queue holds; past it, lines are dropped and counted, so that a browser that reads
# slowly costs a bounded amount of memory and never holds up the device's bytes.
SUBSCRIBER_LINES = 256
# The bytes of one chunk a traffic line keeps: a 64 KiB read would otherwise be 200 KB of hex.
LINE_BYTES = 512
# Live traffic views of one device at once: each costs a status connection (of 64) and a copy of
# every chunk.
MAX_SUBSCRIBERS = 4


class Kind(enum.StrEnum):
    """What happened; the values are what the page and the JSON API show."""

    CONNECT = "connect"  # a client connected
    DISCONNECT = "disconnect"  # a client's connection ended; detail: how
    REFUSED = "refused"  # a client (or its request) was refused; detail: reason: why
    LEASE = "lease"  # a client holds the device (session sharing); seconds: how long it waited
    RELEASE = "release"  # the client's turn ended and the device settled
    EXCHANGE = "exchange"  # a request and its answer (exchange sharing); detail: result; seconds: how long
    LINK_OPEN = "link_open"  # the link opened (a dial-in device connected)
    LINK_CLOSED = "link_closed"  # the link was closed on purpose (release_port, stopping)
    LINK_LOST = "link_lost"  # the link was lost; detail: why
    OPEN_FAILED = "open_failed"  # the link could not be opened; detail: why (said once while it repeats)
    ERROR = "error"  # something unexpected; the log has its traceback


class Event(NamedTuple):
    """One thing that happened to a device. A tuple: a ring of them must be small."""

    at: float  # seconds since the epoch
    kind: Kind
    client: str | None
    detail: str
    seconds: float | None  # a wait or an exchange's duration, where the event has one


class EventRing:
    """The device's last `capacity` events, oldest dropped first.

    A list grown to `capacity` and then overwritten in a circle, made at the first event: a dial-in
    device that never connects costs one small object, and a full ring of 20 about 3 KB (a deque would
    add a 600-byte block to each).
    """

    __slots__ = ("_events", "_next", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._events: list[Event] | None = None
        # Where the next event goes once the ring is full: the oldest one.
        self._next = 0

    def record(self, kind: Kind, detail: str = "", client: str | None = None, seconds: float | None = None) -> None:
        """Adds an event that happens now."""
        event = Event(time.time(), kind, client, detail, seconds)
        events = self._events
        if events is None:
            self._events = [event]
        elif len(events) < self.capacity:
            events.append(event)
        else:
            events[self._next] = event
            self._next = (self._next + 1) % self.capacity

    def recent(self) -> list[Event]:
        """The events kept, oldest first."""
        events = self._events
        if events is None:
            return []
        return events[self._next :] + events[: self._next]


class Direction(enum.StrEnum):
    """Which way a chunk crossed the link."""

    TO_DEVICE = "to_device"
    FROM_DEVICE = "from_device"


class TrafficLine(NamedTuple):
    """One chunk on the wire, as a subscriber sees it: the first LINE_BYTES of it and its full size."""

    at: float
    direction: Direction
    client: str | None  # who sent it (to the device) or whom it went to (from the device; None: nobody)
    data: bytes
    size: int


class Subscriber:
    """One open live view: a bounded queue of lines; when it is full, new lines are dropped and counted."""

    __slots__ = ("_lines", "_wake", "dropped")

    def __init__(self) -> None:
        self._lines: deque[TrafficLine] = deque()
        self._wake = trio.Event()
        self.dropped = 0

    def offer(self, line: TrafficLine) -> None:
        """Queues a line, or counts it as dropped; never waits (it runs on the device's byte path)."""
        if len(self._lines) < SUBSCRIBER_LINES:
            self._lines.append(line)
        else:
            self.dropped += 1
        self._wake.set()

    async def take(self) -> tuple[list[TrafficLine], int]:
        """Waits for lines; returns those queued and how many were dropped since the last take."""
        await self._wake.wait()
        self._wake = trio.Event()
        lines, self._lines = list(self._lines), deque()
        dropped, self.dropped = self.dropped, 0
        return lines, dropped


class Traffic:
    """The subscribers to one device's bytes. A device holds one only while someone subscribes, so its
    byte path pays one attribute check when nobody watches."""

    __slots__ = ("subscribers",)

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []

    def publish(self, direction: Direction, client: str | None, data: bytes) -> None:
        """A chunk that crossed the link now; copies at most LINE_BYTES of it."""
        line = TrafficLine(time.time(), direction, client, bytes(data[:LINE_BYTES]), len(data))
        for subscriber in self.subscribers:
            subscriber.offer(line)


class Watched(Protocol):
    """What a subscription needs of a device: the attribute its byte path checks, and a way to tell its
    observers that a live view started or ended."""

    traffic: Traffic | None

    def notify(self) -> None: ...


class TooManySubscribers(Exception):
    """The device already has MAX_SUBSCRIBERS live views."""


@contextmanager
def subscribed(device: Watched) -> Iterator[Subscriber]:
    """A live view of `device`'s traffic for the duration of the block.

    Error handling: TooManySubscribers when MAX_SUBSCRIBERS views are open. Resource handling: the
    subscriber is removed when the block ends, and the device's Traffic with the last one. The device's
    observers are told when a view starts and ends (device.notify()).
    """
    traffic = device.traffic
    if traffic is None:
        traffic = device.traffic = Traffic()
    elif len(traffic.subscribers) >= MAX_SUBSCRIBERS:
        raise TooManySubscribers(f"{MAX_SUBSCRIBERS} live views of this device are open already")
    subscriber = Subscriber()
    traffic.subscribers.append(subscriber)
    device.notify()
    try:
        yield subscriber
    finally:
        traffic.subscribers.remove(subscriber)
        if not traffic.subscribers and device.traffic is traffic:
            device.traffic = None
        device.notify()
