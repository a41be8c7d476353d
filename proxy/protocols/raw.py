"""raw: no framing at all. A message is whatever arrives before frame_gap of silence."""

from __future__ import annotations

from proxy.protocols import DeviceProtocol, Event, Exchange, Frame


class SilenceFramer:
    """Collects bytes until flush(), which the proxy calls after frame_gap of silence."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        return []

    def flush(self) -> list[Event]:
        if not self._buffer:
            return []
        message, self._buffer = bytes(self._buffer), bytearray()
        return [Frame(message)]

    @property
    def pending(self) -> int:
        return len(self._buffer)


class RawExchange(Exchange):
    ends_in_silence = True

    def on_device(self, event: Event) -> None:
        """Device bytes never end a raw exchange by themselves; frame_gap of silence does."""


class RawProtocol(DeviceProtocol):
    name = "raw"
    framer = SilenceFramer
    request_ends_in_silence = True
    partial_timeout = 0.0  # unused: a raw message ends in frame_gap of silence

    def exchange(self, request: Event) -> RawExchange:
        return RawExchange(SilenceFramer())


PROTOCOL = RawProtocol()
