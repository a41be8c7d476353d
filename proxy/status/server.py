"""The status server's HTTP/1.1 side, on h11: routes, logins, limits, and the live traffic stream (Server-
Sent Events); no HTTP parsed by hand."""

from __future__ import annotations

import ast
import contextlib
import gzip
import json
import re
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import attrs
import h11
import trio
from loguru import logger

from proxy import accept, events, tls, wire
from proxy.clients import peer_name
from proxy.config import Address
from proxy.device import Device
from proxy.events import TrafficLine
from proxy.status import auth, device_page, metrics, page
from proxy.status.html import content_security_policy
from proxy.status.listing import Query, ordered, select
from proxy.status.snapshot import Entry, device_snapshot, entries, event_snapshot, find, traffic_snapshot

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
HTML = "text/html; charset=utf-8"
# Live traffic views open at once, of all devices: each holds a connection for as long as its page is
# open, and the page and the API must keep connections to answer with.
MAX_STREAMS = 16
# A live view with nothing to say sends a comment this often, so that a browser that went away without
# closing is found (its write fails) and its view ends.
# A live view sends what came at most this often.
BATCH_INTERVAL = 0.05
KEEPALIVE = 15.0

Send = Callable[[bytes], Awaitable[None]]
STREAM_HEADERS = (
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("connection", "close"),
)


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    # A response that goes on (Server-Sent Events): called with a function that sends a piece of it, after
    # the head; when it returns, the response ends and the connection closes.
    stream: Callable[[Send], Awaitable[None]] | None = None
    # What the response holds until it ends (a live view's place under the caps): called once, when the
    # request is done with, however it ends.
    release: Callable[[], None] | None = None


def _json(status: int, value: object) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n")


def _error(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return Response(status, json.dumps({"error": message}).encode() + b"\n", JSON, headers)


def _plain(message: str) -> str:
    """An error message without Python's reprs: h11 says `bytearray(b'GET x')` for the bytes `GET x`."""

    def text(match: re.Match[str]) -> str:
        try:
            value = ast.literal_eval(match.group(1) or match.group(2))
        except (ValueError, SyntaxError):
            return match.group(0)
        return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value.decode("latin-1"))

    return _BYTES_REPR.sub(text, message)[:300]


_BYTES = r"""(?<!\w)b'(?:[^'\\]|\\.)*'|(?<!\w)b"(?:[^"\\]|\\.)*\""""
_BYTES_REPR = re.compile(rf"bytearray\(({_BYTES})\)|({_BYTES})")


def _page(text: str, status: int = 200, *headers: tuple[str, str], script: str = "") -> Response:
    """An HTML page, with the policy that allows only its own style and script."""
    policy = ("content-security-policy", content_security_policy(script))
    return Response(status, text.encode(), HTML, (policy, ("referrer-policy", "same-origin"), *headers))


def _redirect(location: str, *headers: tuple[str, str]) -> Response:
    """See other: the browser GETs `location` (after a form, or to the login form)."""
    return Response(303, b"", "text/plain; charset=utf-8", (("location", location), *headers))


class StatusServer:
    """Answers HTTP requests about the devices that `devices()` returns, with their listen addresses."""

    def __init__(
        self,
        devices: Callable[[], dict[str, tuple[Device, list[Address]]]],
        token: str,
        host: str = "",
        origin: tuple[str, int] = ("http", 0),
    ) -> None:
        """`host`: the host of [proxy] status, a name this server goes by (see auth.own_host). `origin`:
        this server's scheme and port, which the other instances on a shared registry serve too: a page
        of a device another instance holds links to that instance's page of it."""
        self._devices = devices
        self._origin = origin
        self._sessions = auth.Sessions(token)
        self._logins = auth.LoginThrottle()
        self._host = host
        self._connections = 0
        self._refusing = False
        self._streams = 0

    async def serve(
        self, listeners: list[trio.SocketListener], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serves until cancelled. Error handling: one client's trouble is logged and ends that client only;
        a failure of the server itself (a bug) is logged and ends the status server, not the proxy."""
        try:
            await accept.serve_listeners(self._connection, listeners, task_status=task_status)
        except Exception:
            logger.exception("status: the status server failed; the devices keep running without it")

    async def _connection(self, stream: trio.abc.Stream) -> None:
        """One HTTP client (HTTPS: its handshake counts among the connections and has its own timeout)."""
        try:
            if self._connections >= MAX_CONNECTIONS:
                if not self._refusing:
                    logger.warning("status: {} connections open; closing new ones until some end", MAX_CONNECTIONS)
                self._refusing = True
                return
            self._refusing = False
            self._connections += 1
            try:
                if isinstance(stream, trio.SSLStream):
                    await tls.handshake(stream)
                await self._serve_connection(stream)
            except tls.HandshakeFailed as exc:
                logger.info("status: {} refused: TLS handshake failed: {}", peer_name(stream), exc, event="refused")
            finally:
                self._connections -= 1
        finally:
            await tls.aclose(stream)

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
                    await self._send(stream, connection, _error(status, f"bad request: {_plain(str(exc))}"), close=True)
                    return
            if timer.cancelled_caught:
                # Too slow: a client whose request head arrived is told so; the others are just closed.
                await self._send(stream, connection, _error(408, "request timeout"), close=True)
                return
            if request is None:
                return
            method, target, headers, body = request
            # HEAD is a GET without the body (h11 sends none), with the GET's status and headers.
            head = method == "HEAD"
            try:
                response = self.route("GET" if head else method, target, headers, body, peer_name(stream))
            except Exception:
                # A bug in one page must not cost the proxy anything: this request gets a 500.
                logger.exception("status: {} {} failed", method, target[:200])
                response = _error(500, "internal error; the proxy's log has the details")
            try:
                if response.stream is not None:
                    if head:
                        data = connection.send(h11.Response(status_code=200, headers=STREAM_HEADERS, reason=b"OK"))
                        await wire.finish(stream, data + connection.send(h11.EndOfMessage()))
                    else:
                        await self._stream(stream, connection, response.stream)
                    return
            finally:
                if response.release is not None:
                    response.release()
            # A 400 may be a request the server read otherwise than a proxy in front of it (RFC 9112 6.3):
            # nothing more is read from this connection.
            close = response.status == 400
            await self._send(stream, connection, response, close=close, head=head)
            if close or connection.our_state is h11.MUST_CLOSE or connection.their_state is h11.MUST_CLOSE:
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
                fields = dict(event.headers)
                if b"content-length" in fields and b"transfer-encoding" in fields:
                    # RFC 9112 6.3: a possible request smuggling; answered with 400, and the connection closes.
                    raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", error_status_hint=400)
                length = fields.get(b"content-length")
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
        self,
        stream: trio.SocketStream,
        connection: h11.Connection,
        response: Response,
        *,
        close: bool,
        head: bool = False,
    ) -> None:
        """Sends `response`; without its body when it answers a HEAD (`head`)."""
        if connection.our_state is not h11.SEND_RESPONSE and connection.their_state is not h11.ERROR:
            return
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        reason = HTTPStatus(response.status).phrase.encode()
        data = connection.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if response.body and not head:
            data += connection.send(h11.Data(data=response.body))
        data += connection.send(h11.EndOfMessage())
        if close:
            await wire.finish(stream, data)
            return
        await _send_in_time(stream, data)

    async def _stream(
        self, stream: trio.SocketStream, connection: h11.Connection, body: Callable[[Send], Awaitable[None]]
    ) -> None:
        """A response that goes on until `body` returns, the client leaves, or the server stops.

        Error handling: a client that resets its connection, or takes no byte for RESPONSE_TIMEOUT, has
        left: a DEBUG line, and the connection ends.
        """
        # No content-length: h11 sends the body chunked (HTTP/1.1) or until the close (HTTP/1.0).
        head = h11.Response(status_code=200, headers=STREAM_HEADERS, reason=b"OK")
        await _send_in_time(stream, connection.send(head))

        async def send(data: bytes) -> None:
            await _send_in_time(stream, connection.send(h11.Data(data=data)))

        left = False

        async def until_closed() -> None:
            # A browser that leaves closes the connection: the view ends now, not at its next write.
            # What a client sends on an event stream means nothing; a reset ends the connection.
            nonlocal left
            while await stream.receive_some(READ_SIZE):
                pass
            left = True
            nursery.cancel_scope.cancel()

        gone: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_closed)
                await body(send)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            # A viewer that resets its connection or stops reading leaves like any other (trio groups the
            # error of the nursery's task); anything else in the group is a bug, and goes on up.
            gone = group.exceptions[0]
        if gone is not None:
            logger.debug("status: a live view's client left: {}", _plain(str(gone)) or type(gone).__name__)
            return
        if not left:
            await _send_in_time(stream, connection.send(h11.EndOfMessage()))

    # -- routes ----------------------------------------------------------------------------------

    def route(self, method: str, target: str, headers: dict[str, str], body: bytes, peer: str = "") -> Response:
        """The response to one request from `peer`."""
        try:
            url = urlsplit(target)
        except ValueError as exc:
            return _error(400, f"bad request target: {exc}")
        # Split before decoding: a device name may hold a "/" (a dial-in id), sent as %2F.
        parts = [unquote(part) for part in url.path.split("/")]
        path = "/".join(parts)
        if path == "/healthz":
            return Response(200, b"ok\n", "text/plain; charset=utf-8") if method == "GET" else _not_allowed("GET")
        if not self._sessions.required and not auth.own_host(headers.get("host"), self._host):
            # /healthz says nothing but ok, to monitors by any name. Without a token, the only guard against
            # a DNS rebinding (another site's name that now resolves here, whose pages would read this server
            # as their own) is the name the request uses.
            logger.debug("status: refused a request for Host {!r} from {}", headers.get("host", "")[:200], peer)
            return _error(
                421,
                "refused: this status server answers to its IP address, localhost or its [proxy] status host "
                "only; to reach it by another name, set status_token",
            )
        if method == "POST" and (why := auth.cross_site(headers)) is not None:
            logger.info("status: refused a POST to {} from {}: {}", path[:200], peer, why)
            return _error(403, f"refused: this request comes from another site ({why})")
        if path == "/login":
            return self._login(method, url.query, headers, body, peer)
        if path == "/logout":
            if method != "POST":
                return _not_allowed("POST")
            self._sessions.end(headers)
            return _redirect("/login" if self._sessions.required else "/", ("set-cookie", auth.expired_cookie()))
        if not self._sessions.authorized(headers):
            if method == "GET" and (path == "/" or parts[:2] == ["", "devices"]):
                return _redirect("/login?" + urlencode({"next": target}))
            return _error(
                401,
                "this status server wants Authorization: Bearer TOKEN (or a login at /login)",
                ("www-authenticate", "Bearer"),
            )
        logout = self._sessions.required and self._sessions.session(headers) is not None
        listed = entries(self._devices().values())
        if path == "/":
            if method != "GET":
                return _not_allowed("GET")
            listing = select(list(listed.values()), Query.parse(url.query))
            return _page(page.render(listing, logout=logout))
        if path == "/metrics":
            if method != "GET":
                return _not_allowed("GET")
            exposed = metrics.exposition(lambda: list(listed.values()))
            if not _accepts_gzip(headers):
                return Response(200, exposed, metrics.CONTENT_TYPE)
            # Prometheus asks for gzip: thousands of devices' series shrink about tenfold for a few ms.
            compressed = gzip.compress(exposed, compresslevel=1)
            encoding = (("content-encoding", "gzip"), ("vary", "accept-encoding"))
            return Response(200, compressed, metrics.CONTENT_TYPE, encoding)
        if path == "/api/devices":
            if method != "GET":
                return _not_allowed("GET")
            chosen = ordered(list(listed.values()), Query.parse(url.query))
            return _json(200, [device_snapshot(entry.device, entry.listen, entry.key) for entry in chosen])
        if len(parts) == 3 and parts[:2] == ["", "devices"] and parts[2]:
            entry = find(listed, parts[2])
            if entry is None:
                return _error(404, f"no device {parts[2]!r}")
            if method != "GET":
                return _not_allowed("GET")
            return _page(device_page.render(entry, logout=logout, origin=self._origin), script=device_page.SCRIPT)
        if len(parts) in (4, 5) and parts[:3] == ["", "api", "devices"] and parts[3]:
            entry = find(listed, parts[3])
            if entry is None:
                return _error(404, f"no device {parts[3]!r}")
            return self._device_api(method, entry, parts[4] if len(parts) == 5 else "", headers)
        return _error(404, f"no such page: {path}")

    def _device_api(self, method: str, entry: Entry, what: str, headers: dict[str, str]) -> Response:
        """/api/devices/KEY and what is under it."""
        device = entry.device
        if what == "disconnect":
            if method != "POST":
                return _not_allowed("POST")
            response = self._disconnect(device)
            if "text/html" in headers.get("accept", ""):
                # The device page's button: back to the page, which shows what happened.
                return _redirect(page.device_link(entry.key))
            return response
        if method != "GET":
            return _not_allowed("GET")
        if what == "":
            return _json(200, device_snapshot(device, entry.listen, entry.key))
        if what == "events":
            return _json(200, [event_snapshot(event) for event in device.events.recent()])
        if what == "traffic":
            if self._streams >= MAX_STREAMS:
                return _error(503, f"{MAX_STREAMS} live traffic views are open; close one first")
            # Admitted here, before any await: requests that arrive together cannot all pass the caps.
            view = contextlib.ExitStack()
            try:
                subscriber = view.enter_context(events.subscribed(device))
            except events.TooManySubscribers:
                return _error(503, f"{events.MAX_SUBSCRIBERS} live views of {entry.key} are open; close one first")
            self._streams += 1
            view.callback(self._view_ended)
            return Response(200, b"", stream=lambda send: self._traffic(device, subscriber, send), release=view.close)
        return _error(404, f"no such page under /api/devices/{entry.key}")

    def _view_ended(self) -> None:
        self._streams -= 1

    def _login(self, method: str, query: str, headers: dict[str, str], body: bytes, peer: str) -> Response:
        """The login form (GET) and its answer (POST): a session cookie, then back to where the browser was
        going."""
        sessions = self._sessions
        if method == "GET":
            target = auth.local_path(_field(query, "next"))
            if not sessions.required or sessions.session(headers) is not None:
                return _redirect(target)
            return _page(page.login(target, failed=False))
        if method != "POST":
            return _not_allowed("GET, POST")
        form = body.decode("utf-8", "replace")
        target = auth.local_path(_field(form, "next"))
        if not sessions.required:
            return _redirect(target)
        now = time.monotonic()
        if wait := self._logins.refused_for(now):
            return _error(
                429,
                f"too many failed logins; try again in {auth.retry_after(wait)} s",
                ("retry-after", auth.retry_after(wait)),
            )
        if not sessions.token_matches(_field(form, "token")):
            logger.info("status: a login from {} failed (not the status token)", peer)
            if self._logins.failed(now):
                logger.warning(
                    "status: {} failed logins within {:g} s; refusing logins for the rest of it",
                    auth.MAX_FAILED_LOGINS,
                    auth.LOGIN_WINDOW,
                )
            return _page(page.login(target, failed=True), 401)
        logger.info("status: {} logged in", peer)
        return _redirect(target, ("set-cookie", auth.session_cookie(sessions.start())))

    def _disconnect(self, device: Device) -> Response:
        holder = device.sharing.disconnect_holder()
        if holder is None:
            return _error(409, f"no client holds {device.name}")
        logger.info("{}: status API disconnected {}", device.name, holder)
        return _json(200, {"disconnected": holder})

    async def _traffic(self, device: Device, subscriber: events.Subscriber, send: Send) -> None:
        """Streams `device`'s traffic as Server-Sent Events until the client leaves or the device is
        stopped: "traffic" events (hex and text of each chunk, its direction and client), and "dropped"
        events saying how many lines a slow client missed. The device's bytes never wait for it."""
        await send(b": devproxy live traffic\n\n")
        while True:
            taken = None
            with trio.move_on_after(KEEPALIVE):
                taken = await subscriber.take()
            if taken is not None:
                await send(_events(*taken))
                # The lines of a busy device are sent in batches: a wake-up and a write per chunk for
                # every viewer would slow the device's own traffic (100-byte round trips took 3x as long
                # with one viewer). Meanwhile the lines wait in the viewer's bounded queue.
                await trio.sleep(BATCH_INTERVAL)
                continue
            if not any(running is device for running, _ in self._devices().values()):
                return  # stopped (a reload removed or changed it): nothing more will come
            await send(b": keepalive\n\n")


def _events(lines: list[TrafficLine], dropped: int) -> bytes:
    """Traffic lines as Server-Sent Events; the lines dropped came after these, so they are said last."""
    text = "".join(f"event: traffic\ndata: {json.dumps(traffic_snapshot(line))}\n\n" for line in lines)
    if dropped:
        text += f"event: dropped\ndata: {json.dumps({'dropped': dropped})}\n\n"
    return text.encode()


def _accepts_gzip(headers: dict[str, str]) -> bool:
    """The client takes a gzip body (Accept-Encoding names gzip, and not with q=0)."""
    for part in headers.get("accept-encoding", "").split(","):
        coding, _, parameters = part.partition(";")
        if coding.strip().lower() == "gzip":
            return parameters.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _field(form: str, name: str) -> str:
    """A field of a query string or a form body (the last one given), or ""."""
    try:
        values = parse_qs(form, max_num_fields=20).get(name)
    except ValueError:  # more fields than any form of ours has
        return ""
    return values[-1] if values else ""


async def _send_in_time(stream: trio.SocketStream, data: bytes) -> None:
    """Sends `data`; a client that takes no byte of it for RESPONSE_TIMEOUT is dropped
    (trio.BrokenResourceError): it must not keep a descriptor."""
    with trio.move_on_after(RESPONSE_TIMEOUT) as timer:
        await stream.send_all(data)
    if timer.cancelled_caught:
        logger.debug("status: dropped a client that took no byte of its response for {:g} s", RESPONSE_TIMEOUT)
        raise trio.BrokenResourceError("the client took no byte of its response")


def _not_allowed(allowed: str) -> Response:
    return _error(405, f"method not allowed here; use {allowed}", ("allow", allowed))
