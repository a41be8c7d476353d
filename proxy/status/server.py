"""The status server's HTTP/1.1 side, on h11: routes, bearer token, limits; no HTTP parsed by hand."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11
import trio
from loguru import logger

from proxy import accept, wire
from proxy.device import Device
from proxy.status import metrics, page
from proxy.status.snapshot import FIELDS, device_snapshot

# A request whose head or body is larger than this is refused: the API takes no real bodies.
MAX_REQUEST = 16 * 1024
# A client gets this long to send each request; a slow or stuck one is dropped, and nobody else waits.
REQUEST_TIMEOUT = 10.0
# A client that takes no byte of its response for this long is dropped: it must not keep a descriptor.
RESPONSE_TIMEOUT = 10.0
# Status clients at once (a browser or two, a scraper): more are closed at once, so that they can never
# take the descriptors the devices need.
MAX_CONNECTIONS = 64
READ_SIZE = 16 * 1024
JSON = "application/json"


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, value: object) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n")


def _error(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return Response(status, json.dumps({"error": message}).encode() + b"\n", JSON, headers)


class StatusServer:
    """Answers HTTP requests about the devices that `devices()` returns, with their listen addresses."""

    def __init__(self, devices: Callable[[], dict[str, tuple[Device, list]]], token: str) -> None:
        self._devices = devices
        self._token = f"Bearer {token}".encode() if token else b""
        self._connections = 0
        self._refusing = False

    async def serve(
        self, listeners: list[trio.SocketListener], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serves until cancelled. Error handling: one client's trouble is logged and ends that client only;
        a failure of the server itself (a bug) is logged and ends the status server, not the proxy."""
        try:
            await accept.serve_listeners(self._connection, listeners, task_status=task_status)
        except Exception:
            logger.exception("status: the status server failed; the devices keep running without it")

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._connections >= MAX_CONNECTIONS:
                if not self._refusing:
                    logger.warning("status: {} connections open; closing new ones until some end", MAX_CONNECTIONS)
                self._refusing = True
                return
            self._refusing = False
            self._connections += 1
            try:
                await self._serve_connection(stream)
            finally:
                self._connections -= 1

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            await self._requests(stream, connection)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except h11.LocalProtocolError as exc:
            logger.debug("status: cannot answer a client: {}", exc)
        except Exception:
            # Containment: one HTTP client's trouble ends its connection, never the status server.
            logger.exception("status: a client's connection failed")

    async def _requests(self, stream: trio.SocketStream, connection: h11.Connection) -> None:
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT) as timer:
                try:
                    request = await self._read_request(stream, connection)
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    await self._send(stream, connection, _error(status, f"bad request: {exc}"), close=True)
                    return
            if timer.cancelled_caught:
                # Too slow: a client whose request head arrived is told so; the others are just closed.
                await self._send(stream, connection, _error(408, "request timeout"), close=True)
                return
            if request is None:
                return
            method, target, headers, body = request
            try:
                response = self.route(method, target, headers, body)
            except Exception:
                # A bug in one page must not cost the proxy anything: this request gets a 500.
                logger.exception("status: {} {} failed", method, target[:200])
                response = _error(500, "internal error; the proxy's log has the details")
            await self._send(stream, connection, response, close=False)
            if connection.our_state is h11.MUST_CLOSE or connection.their_state is h11.MUST_CLOSE:
                return
            connection.start_next_cycle()

    async def _read_request(
        self, stream: trio.SocketStream, connection: h11.Connection
    ) -> tuple[str, str, dict[str, str], bytes] | None:
        """The next complete request, or None when the client closed between requests."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(READ_SIZE)
                connection.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                request = event
                head = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if head > MAX_REQUEST:
                    # h11 bounds a head that arrives in pieces; this bounds one that arrived whole.
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > MAX_REQUEST:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REQUEST:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
                return request.method.decode("ascii"), request.target.decode("latin-1"), headers, bytes(body)

    async def _send(
        self, stream: trio.SocketStream, connection: h11.Connection, response: Response, *, close: bool
    ) -> None:
        if connection.our_state is not h11.SEND_RESPONSE and connection.their_state is not h11.ERROR:
            return
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("cache-control", "no-store"),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        reason = HTTPStatus(response.status).phrase.encode()
        data = connection.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        data += connection.send(h11.Data(data=response.body)) + connection.send(h11.EndOfMessage())
        if close:
            await wire.finish(stream, data)
            return
        with trio.move_on_after(RESPONSE_TIMEOUT) as timer:
            await stream.send_all(data)
        if timer.cancelled_caught:
            logger.debug("status: dropped a client that took no byte of its response for {:g} s", RESPONSE_TIMEOUT)
            raise trio.BrokenResourceError("the client took no byte of its response")

    # -- routes ----------------------------------------------------------------------------------

    def route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        """The response to one request."""
        try:
            url = urlsplit(target)
        except ValueError as exc:
            return _error(400, f"bad request target: {exc}")
        # Split before decoding: a device name may hold a "/" (a dial-in id), sent as %2F.
        parts = [unquote(part) for part in url.path.split("/")]
        path = "/".join(parts)
        if path == "/healthz":
            return Response(200, b"ok\n", "text/plain; charset=utf-8") if method == "GET" else _not_allowed("GET")
        if self._token and not hmac.compare_digest(headers.get("authorization", "").encode(), self._token):
            return _error(401, "this status server wants Authorization: Bearer TOKEN", ("www-authenticate", "Bearer"))
        devices = self._devices()
        if path == "/":
            if method != "GET":
                return _not_allowed("GET")
            hidden = set(parse_qs(url.query).get("hide", [])) & set(FIELDS)
            snapshots = [device_snapshot(device, listen) for device, listen in devices.values()]
            return Response(200, page.render(snapshots, hidden).encode(), "text/html; charset=utf-8")
        if path == "/metrics":
            if method != "GET":
                return _not_allowed("GET")
            return Response(200, metrics.exposition(lambda: [d for d, _ in devices.values()]), metrics.CONTENT_TYPE)
        if path == "/api/devices":
            if method != "GET":
                return _not_allowed("GET")
            return _json(200, [device_snapshot(device, listen) for device, listen in devices.values()])
        if len(parts) in (4, 5) and parts[:3] == ["", "api", "devices"] and parts[3]:
            name = parts[3]
            if name not in devices:
                return _error(404, f"no device {name!r}")
            device, listen = devices[name]
            if len(parts) == 4:
                return _json(200, device_snapshot(device, listen)) if method == "GET" else _not_allowed("GET")
            if parts[4] == "disconnect":
                return self._disconnect(device) if method == "POST" else _not_allowed("POST")
        return _error(404, f"no such page: {path}")

    def _disconnect(self, device: Device) -> Response:
        holder = device.sharing.disconnect_holder()
        if holder is None:
            return _error(409, f"no client holds {device.name}")
        logger.info("{}: status API disconnected {}", device.name, holder)
        return _json(200, {"disconnected": holder})


def _not_allowed(allowed: str) -> Response:
    return _error(405, f"method not allowed here; use {allowed}", ("allow", allowed))
