"""What a device counts: bytes, exchanges by result, refusals and waits, as the status page and /metrics read them."""

from __future__ import annotations

import bisect
import enum
import math
from collections import Counter
from datetime import datetime

import attrs

# Upper bounds, in seconds, of the buckets of the wait and exchange histograms (the last is +Inf).
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, math.inf)


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
