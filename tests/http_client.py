"""A small HTTP/1.1 client on h11 and trio sockets for the status server's tests: one request a connection,
and Server-Sent Events read as they come."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import trio

from helpers import WAIT_LIMIT


@attrs.frozen
class Reply:
    status_code: int
    # Lower-case names; a header given twice keeps its last value.
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def _request_bytes(
    connection: h11.Connection, address: str, method: str, target: str, headers: dict[str, str], body: bytes
) -> bytes:
    names = {name.lower() for name in headers}
    fields = [("connection", "close"), *headers.items()]
    if "host" not in names:  # a Host the caller gives asks for another name
        fields.insert(0, ("host", address))
    if body and "content-length" not in names:
        fields.append(("content-length", str(len(body))))
    data = connection.send(h11.Request(method=method, target=target, headers=fields))
    if body:
        data += connection.send(h11.Data(data=body))
    return data + connection.send(h11.EndOfMessage())


async def _next_event(stream: trio.SocketStream, connection: h11.Connection) -> Any:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await stream.receive_some(65536))


async def request(
    address: object, method: str, target: str, *, headers: dict[str, str] | None = None, body: bytes = b""
) -> Reply:
    """One request to `address` (host:port) and its whole reply."""
    host, port = str(address).rsplit(":", 1)
    with trio.fail_after(WAIT_LIMIT):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            connection = h11.Connection(h11.CLIENT)
            await stream.send_all(_request_bytes(connection, str(address), method, target, headers or {}, body))
            response = await _next_event(stream, connection)
            content = bytearray()
            while not isinstance(event := await _next_event(stream, connection), h11.EndOfMessage):
                content += event.data
    fields = {name.decode().lower(): value.decode() for name, value in response.headers}
    return Reply(response.status_code, fields, bytes(content))


async def get(address: object, target: str, **kwargs: Any) -> Reply:
    return await request(address, "GET", target, **kwargs)


class EventStream:
    """A Server-Sent Events response being read: next() gives each event as (name, decoded JSON data)."""

    def __init__(self, stream: trio.SocketStream, connection: h11.Connection, status: int) -> None:
        self.stream = stream
        self.status_code = status
        self._connection = connection
        self._buffer = b""

    async def next(self) -> tuple[str, Any]:
        """The next event (comments, such as keep-alives, are skipped)."""
        with trio.fail_after(WAIT_LIMIT):
            while True:
                block, separator, rest = self._buffer.partition(b"\n\n")
                if separator:
                    self._buffer = rest
                    fields = dict(line.split(": ", 1) for line in block.decode().split("\n") if line[:1] != ":")
                    if fields:
                        return fields.get("event", "message"), json.loads(fields["data"])
                    continue
                event = await _next_event(self.stream, self._connection)
                if isinstance(event, h11.EndOfMessage):
                    raise EOFError("the event stream ended")
                self._buffer += event.data


@asynccontextmanager
async def event_stream(
    address: object, target: str, *, headers: dict[str, str] | None = None, receive_buffer: int = 0
) -> AsyncIterator[EventStream]:
    """An open event stream from `target`; closed when the block ends. `receive_buffer`: a small
    SO_RCVBUF for a reader that is meant to fall behind."""
    host, port = str(address).rsplit(":", 1)
    sock = trio.socket.socket()
    if receive_buffer:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
    await sock.connect((host, int(port)))
    async with trio.SocketStream(sock) as stream:
        connection = h11.Connection(h11.CLIENT)
        await stream.send_all(_request_bytes(connection, str(address), "GET", target, headers or {}, b""))
        with trio.fail_after(WAIT_LIMIT):
            response = await _next_event(stream, connection)
        yield EventStream(stream, connection, response.status_code)
