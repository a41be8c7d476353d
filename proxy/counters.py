"""What a device counts: bytes, exchanges by result, refusals and waits, as the status page and /metrics read them."""

from __future__ import annotations

import bisect
import enum
import math
import time
from collections import Counter
from datetime import datetime

import attrs

# Upper bounds, in seconds, of the buckets of the wait and exchange histograms (the last is +Inf).
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, math.inf)
# Why a client was refused, as clients.py and device.py name it (Counters.refused's keys); "tls": its
# TLS handshake failed or timed out, or its certificate's name is not allowed.
REFUSAL_REASONS = ("busy", "offline", "too many clients", "not allowed", "tls")
# "Refusals in the last hour" counts whole minutes: 60 counters cover the hour to within a minute.
RECENT_MINUTES = 60


class ExchangeResult(enum.StrEnum):
    """How one request of exchange sharing ended."""

    OK = "ok"
    # Complete, but its first byte came after response_timeout (the device settled meanwhile).
    LATE = "late"
    # The client left before the answer was complete; the device finished it without the client.
    CLIENT_GONE = "client_gone"
    # No answer in time: not complete within exchange_timeout, or (raw) no byte within response_timeout.
    TIMEOUT = "timeout"
    LINK_LOST = "link_lost"
    REFUSED = "refused"


@attrs.define
class Histogram:
    """Observed durations, counted into BUCKETS (not cumulative), with their sum."""

    counts: list[int] = attrs.field(factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class RecentCount:
    """Events in the last hour, to the minute, for the status page's summary.

    A device makes one only at its first refusal: most devices never refuse anyone, and 10,000 dial-in
    devices should not each carry 120 numbers for it. Counting is O(1) and summing O(60).
    """

    __slots__ = ("_counts", "_minutes")

    def __init__(self) -> None:
        self._counts = [0] * RECENT_MINUTES
        self._minutes = [-1] * RECENT_MINUTES

    def add(self, now: float) -> None:
        """One event at `now` (seconds since the epoch)."""
        minute = int(now // 60)
        slot = minute % RECENT_MINUTES
        if self._minutes[slot] != minute:
            self._minutes[slot], self._counts[slot] = minute, 0
        self._counts[slot] += 1

    def total(self, now: float) -> int:
        """Events in the last RECENT_MINUTES minutes, this one included."""
        minute = int(now // 60)
        return sum(count for count, at in zip(self._counts, self._minutes, strict=True) if minute - at < RECENT_MINUTES)


@attrs.define
class Counters:
    """What a device has done since the proxy started."""

    bytes_to_device: int = 0
    bytes_from_device: int = 0
    # Sent by the device while nobody held it or owed anything (dropped).
    unsolicited_bytes: int = 0
    # Sent by the device to a client that had left, or after a timeout, while it settled (dropped).
    discarded_bytes: int = 0
    leases_granted: int = 0
    refused: Counter[str] = attrs.field(factory=Counter)
    exchanges: Counter[ExchangeResult] = attrs.field(factory=Counter)
    exchange_seconds: Histogram = attrs.field(factory=Histogram)
    # How long clients waited for the device, granted or not.
    lock_wait_seconds: Histogram = attrs.field(factory=Histogram)
    link_opens: int = 0
    link_losses: int = 0
    last_connect: datetime | None = None
    last_disconnect: datetime | None = None
    # Made at the first refusal (see RecentCount).
    recent_refusals: RecentCount | None = None

    def refuse(self, reason: str) -> None:
        """One client refused for `reason` (one of REFUSAL_REASONS)."""
        self.refused[reason] += 1
        if self.recent_refusals is None:
            self.recent_refusals = RecentCount()
        self.recent_refusals.add(time.time())


# Devices with metrics_histograms = false (dial-in devices by default) count their waits and exchanges
# here, all together: a histogram per device is 13 series on /metrics, and 10,000 dial-in devices would
# make /metrics megabytes long. The process serves one proxy, so these are the proxy's.
POOLED_LOCK_WAIT = Histogram()
POOLED_EXCHANGE = Histogram()


def counters_for(histograms: bool) -> Counters:
    """A device's counters: with its own wait and exchange histograms, or adding to the pooled ones."""
    if histograms:
        return Counters()
    return Counters(exchange_seconds=POOLED_EXCHANGE, lock_wait_seconds=POOLED_LOCK_WAIT)
