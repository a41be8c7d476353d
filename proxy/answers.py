"""What the device may still owe: one request's answer, followed until the protocol says it is complete.

Both sharing modes hold the device while an Answer is outstanding, so that no byte of it can reach the
next client (settling), and both ask it the same question when a deadline passes: check().
"""

from __future__ import annotations

import enum

from proxy.config import DeviceConfig
from proxy.protocols import Event, Exchange


class Verdict(enum.Enum):
    """What check() found."""

    WAIT = enum.auto()  # nothing decided yet: check again at deadline()
    COMPLETE = enum.auto()  # the protocol says the answer is complete (raw: frame_gap of silence)
    NO_ANSWER = enum.auto()  # raw: no byte within response_timeout, so none is coming
    LATE = enum.auto()  # no byte within response_timeout; the device may still answer
    EXPIRED = enum.auto()  # not complete within exchange_timeout


class Answer:
    """The answer to one request, from the moment the request began to leave.

    Its deadlines: response_timeout for the first byte; then exchange_timeout for the whole exchange,
    and for answers that end in silence (raw) frame_gap after the last byte. A LATE answer stays
    outstanding until exchange_timeout, since the device may still be answering.
    """

    __slots__ = ("answered", "config", "exchange", "last_byte", "late", "sent_at")

    def __init__(self, exchange: Exchange, config: DeviceConfig, sent_at: float) -> None:
        self.exchange = exchange
        self.config = config
        self.sent_at = sent_at
        self.answered = False
        self.late = False
        self.last_byte = sent_at

    def restart(self, now: float) -> None:
        """The proxy sent the device something that calls for an answer of its own (an ENQ for a host
        that left): the timeouts count again from now."""
        self.sent_at = self.last_byte = now
        self.answered = self.late = False

    @property
    def complete(self) -> bool:
        return self.exchange.complete

    def heard(self, now: float) -> None:
        """Bytes of the answer arrived (no whole message yet, or a protocol without messages)."""
        self.answered = True
        self.last_byte = now

    def feed(self, events: list[Event], now: float) -> tuple[bytes, bytes, bytes]:
        """Device bytes arrived, as `events` (none yet while a frame is incomplete).

        Returns (what belongs to this answer, to pass on; what the proxy owes the device for a host that
        is gone, an ACK or an EOT; what answered something else, to drop).
        """
        exchange = self.exchange
        passed, replies, dropped = [], b"", []
        for event in events:
            if exchange.complete or not exchange.belongs(event):
                dropped.append(event.raw)
                continue
            passed.append(exchange.client_bytes(event))
            replies += exchange.on_device(event)
        if passed:
            self.heard(now)
        return b"".join(passed), replies, b"".join(dropped)

    def deadline(self) -> float:
        """When check() may decide something next."""
        config = self.config
        end = self.sent_at + config.exchange_timeout
        if not self.answered and not self.late:
            return min(end, self.sent_at + config.response_timeout)
        if self.answered and self.exchange.ends_in_silence:
            return min(end, self.last_byte + config.frame_gap)
        return end

    def check(self, now: float) -> Verdict:
        """Whether the answer is complete, still owed, or over its time."""
        exchange, config = self.exchange, self.config
        if exchange.complete:
            return Verdict.COMPLETE
        if now < self.deadline():
            return Verdict.WAIT
        if self.answered and exchange.ends_in_silence and now >= self.last_byte + config.frame_gap:
            exchange.quiet()
            return Verdict.COMPLETE
        if now >= self.sent_at + config.exchange_timeout:
            return Verdict.EXPIRED
        if exchange.ends_in_silence:
            exchange.quiet()  # raw: the silence that ends an answer ended this one before it began
            return Verdict.NO_ANSWER
        self.late = True
        return Verdict.LATE
