"""A recorded device played back (`devproxy simulate replay FILE`): each request gets its recorded answer.

Protocol-agnostic: the host's bytes are matched against the recorded requests as bytes. A request is
recognised when the bytes so far begin with one (the longest, when one recorded request begins
another: then the device waits for more, up to its byte timeout of silence). Bytes that begin no
recorded request (a host's ACK of an answer, a request never recorded) are dropped, one at a time, and
logged once per burst; a real device ignores what it does not understand.

Which answer: by default the recorded answer to the same request bytes, and for a request recorded
several times its answers in turn (the last one again once they are used up). With `in_order`, each
recognised request gets the next answer of the recording, whatever it asked, and nothing once the
recording is played out.

When: at once, or with `timing = "recorded"` the answer's first byte after the recorded first_byte
seconds and the rest at the recorded complete.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from loguru import logger

from proxy import log
from proxy.recording import Recorded
from proxy.simulators.base import Write

TIMINGS = ("none", "recorded")
# A trie node: the next byte -> its node, and END -> {} where a recorded request ends.
Node = dict[int, "Node"]
END = -1
# The trie of the last recording replayed: built once per recording (serve_* makes a device per connection).
_tries: dict[int, tuple[list[Recorded], Node]] = {}


def _trie(records: list[Recorded], requests: Iterable[bytes]) -> Node:
    """The recorded requests as a trie: memory O(their bytes), and a scan O(bytes * longest request)."""
    cached = _tries.get(id(records))
    if cached is not None and cached[0] is records:
        return cached[1]
    root: Node = {}
    for request in requests:
        node = root
        for byte in request:
            node = node.setdefault(byte, {})
        node[END] = {}
    _tries.clear()
    _tries[id(records)] = (records, root)
    return root


# Bytes of a run that begins no recorded request shown in its log line.
UNKNOWN_SHOWN = 32


class ReplayDevice:
    """One connection's replaying device, as serve_stream drives a simulated one (feed, line_idle)."""

    answer_delay = 0.0

    def __init__(self, records: list[Recorded], *, in_order: bool = False, timing: str = "none") -> None:
        if timing not in TIMINGS:
            raise ValueError(f"timing {timing!r} is not one of {', '.join(TIMINGS)}")
        self.records = records
        self.in_order = in_order
        self.timing = timing
        self.clock = None  # serve_stream sets it; replay keeps no time of its own
        self._answers: dict[bytes, list[Recorded]] = defaultdict(list)
        for record in records:
            self._answers[record.request].append(record)
        self._turns: dict[bytes, int] = defaultdict(int)
        self._next = 0
        self._trie = _trie(records, self._answers)
        self._buffer = bytearray()
        self._unknown = bytearray()
        self._unknown_count = 0
        # What the host's requests got, for tests and logs: (request, answer) in order.
        self.played: list[tuple[bytes, bytes]] = []

    @property
    def mid_frame(self) -> bool:
        """Bytes are held that may be the start of a recorded request."""
        return bool(self._buffer)

    def sent(self, write: Write) -> None:
        """serve_stream's hook after each write; nothing to do."""

    def feed(self, data: bytes) -> list[Write]:
        self._buffer += data
        return self._scan(final=False)

    def line_idle(self) -> list[Write]:
        """The host went quiet: what is held is taken as it stands."""
        return self._scan(final=True)

    def _scan(self, *, final: bool) -> list[Write]:
        """O(n * L) for n bytes and L the longest request: each byte is dropped, or ends a request, after
        at most L steps down the trie."""
        buffer, writes, start = self._buffer, [], 0
        while start < len(buffer):
            node, size, walked = self._trie, 0, True
            for index in range(start, len(buffer)):
                child = node.get(buffer[index])
                if child is None:
                    walked = False
                    break
                node = child
                if END in node:
                    size = index + 1 - start
            if walked and not final and len(node) > (END in node):
                break  # the start of a recorded request: wait for the rest
            if not size:
                # Bytes that begin no request: counted, and the first few kept for the log line.
                if len(self._unknown) < UNKNOWN_SHOWN:
                    self._unknown.append(buffer[start])
                self._unknown_count += 1
                start += 1
                continue
            request = bytes(buffer[start : start + size])
            start += size
            writes += self._answer(request)
        del buffer[:start]  # once: dropping byte by byte would be quadratic in a run of junk
        if self._unknown_count and (writes or not buffer):
            logger.info(
                "replay: {} bytes from the host begin no recorded request, ignored: {}",
                self._unknown_count,
                log.hexdump(bytes(self._unknown), UNKNOWN_SHOWN),
            )
            self._unknown.clear()
            self._unknown_count = 0
        return writes

    def _answer(self, request: bytes) -> list[Write]:
        if self.in_order:
            if self._next >= len(self.records):
                logger.info("replay: the recording is played out; {} gets no answer", log.hexdump(request, 16))
                return []
            record = self.records[self._next]
            self._next += 1
        else:
            answers = self._answers[request]
            turn = self._turns[request]
            record = answers[min(turn, len(answers) - 1)]
            self._turns[request] = turn + 1
        self.played.append((request, record.answer))
        return self._writes(record)

    def _writes(self, record: Recorded) -> list[Write]:
        answer = record.answer
        if not answer:
            return []
        if self.timing == "none":
            return [Write(answer)]
        first = record.first_byte or 0.0
        complete = record.complete if record.complete is not None else first
        writes = [Write(answer[:1], delay=first)]
        if len(answer) > 1:
            writes.append(Write(answer[1:], delay=max(0.0, complete - first)))
        return writes
