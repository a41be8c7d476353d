"""raw: no framing at all. A message is whatever arrives before frame_gap of silence."""

from __future__ import annotations

from proxy.protocols import MAX_MESSAGE, DeviceProtocol, Event, Exchange, Frame


class SilenceFramer:
    """Collects bytes until flush(), which the proxy calls after frame_gap of silence.

    A message is cut at `max_message` bytes and passed on as it is, so a peer that never pauses cannot
    make the proxy hold more than that.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buffer = bytearray()
        self._max_message = max_message

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        if len(self._buffer) < self._max_message:
            return []
        cut = len(self._buffer) - len(self._buffer) % self._max_message
        whole, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return [Frame(bytes(whole[i : i + self._max_message])) for i in range(0, cut, self._max_message)]

    def reset(self) -> None:
        self._buffer = bytearray()

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

    def on_device(self, event: Event) -> bytes:
        """Device bytes never end a raw exchange by themselves; frame_gap of silence does."""
        return b""


class RawProtocol(DeviceProtocol):
    name = "raw"
    framer = SilenceFramer
    request_ends_in_silence = True
    partial_timeout = 0.0  # unused: a raw message ends in frame_gap of silence

    def host_framer(self, max_message: int = MAX_MESSAGE) -> SilenceFramer:
        return SilenceFramer(max_message)

    def exchange(self, request: Event) -> RawExchange:
        return RawExchange()


PROTOCOL = RawProtocol()
