"""Who may read the status server when status_token is set: the bearer token (scripts, Prometheus), or a
login session of the page (browsers); and the check that keeps other sites' pages from POSTing to it.

A session is a random id kept in this process's memory with its expiry, not an HMAC of the token: logging
out ends it for good (an HMAC would stay valid until the token changed), a cookie that leaks says nothing
about the token and dies at logout, expiry or restart, and a new token at restart ends every session. The
price is a new login after a restart.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import secrets
import time
from collections import deque
from urllib.parse import quote, urlsplit

COOKIE = "devproxy_session"
# A login lasts a working day.
SESSION_SECONDS = 12 * 3600
# Sessions kept at most; past it the oldest is dropped, so logins in a loop cannot fill the memory.
MAX_SESSIONS = 256
# Failed logins (from any address) within LOGIN_WINDOW seconds after which every login is refused until the
# window of the first of them ends: guessing the token runs at 5 tries a minute, not thousands a second.
MAX_FAILED_LOGINS = 5
LOGIN_WINDOW = 60.0


class Sessions:
    """The token, and the sessions of the browsers that logged in with it."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._bearer = f"Bearer {token}".encode()
        # Session id -> when it expires (time.monotonic()); dicts keep insertion order: oldest first.
        self._sessions: dict[str, float] = {}

    @property
    def required(self) -> bool:
        """True when a token is set: every request but /healthz and the login form needs it."""
        return bool(self._token)

    def token_matches(self, offered: str) -> bool:
        """The login form's token, compared in constant time."""
        return hmac.compare_digest(offered.encode(), self._token)

    def authorized(self, headers: dict[str, str]) -> bool:
        """The request carries the bearer token (compared in constant time) or a live session cookie."""
        if not self.required:
            return True
        bearer = headers.get("authorization")
        if bearer is not None:
            return hmac.compare_digest(bearer.encode(), self._bearer)
        return self.session(headers) is not None

    def session(self, headers: dict[str, str]) -> str | None:
        """The live session the request's cookie names, or None."""
        session = cookie(headers, COOKIE)
        if session is None:
            return None
        expires = self._sessions.get(session)
        if expires is None:
            return None
        if expires <= time.monotonic():
            del self._sessions[session]
            return None
        return session

    def start(self) -> str:
        """A new session; returns its id, for the cookie."""
        now = time.monotonic()
        for session, expires in list(self._sessions.items()):
            if expires <= now:
                del self._sessions[session]
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + SESSION_SECONDS
        return session

    def end(self, headers: dict[str, str]) -> None:
        """Logs out the session the request's cookie names, if any."""
        session = cookie(headers, COOKIE)
        if session is not None:
            self._sessions.pop(session, None)


class LoginThrottle:
    """The failed logins of the last LOGIN_WINDOW seconds. `now` is time.monotonic()."""

    def __init__(self) -> None:
        self._failures: deque[float] = deque(maxlen=MAX_FAILED_LOGINS)

    def refused_for(self, now: float) -> float:
        """Seconds until logins are taken again; 0 when they are taken now."""
        if len(self._failures) < MAX_FAILED_LOGINS:
            return 0.0
        left = self._failures[0] + LOGIN_WINDOW - now
        if left <= 0:
            self._failures.clear()
            return 0.0
        return left

    def failed(self, now: float) -> bool:
        """Counts a failed login; True when it is the one past which logins are refused."""
        self._failures.append(now)
        return self.refused_for(now) > 0


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, rounded up."""
    return str(max(1, math.ceil(seconds)))


def own_host(host: str | None, configured: str) -> bool:
    """The Host header names this server: an IP address (v4 or [v6], with or without a port), `localhost`,
    or `configured` (the host of [proxy] status), or there is none (only HTTP/1.0 may omit it; browsers
    always send it). Another name may be a DNS rebinding: another site's name that now resolves here, so
    that its pages read this server as their own."""
    if host is None:
        return True
    name = host.strip().lower()
    if name.startswith("["):
        literal, bracket, port = name[1:].partition("]")
        if not bracket or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return False
        name = literal
    elif name.count(":") == 1:
        name, _, port = name.partition(":")
        if not port.isdigit():
            return False
    if name in ("localhost", configured.lower()) and name:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cookie(headers: dict[str, str], name: str) -> str | None:
    """The value of cookie `name` in the request's Cookie header."""
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


def session_cookie(session: str) -> str:
    """The Set-Cookie value of a new session: not readable by scripts, and never sent with a request that
    another site starts (SameSite=Strict). No Secure flag: the status server speaks plain HTTP."""
    return f"{COOKIE}={session}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict"


def expired_cookie() -> str:
    """The Set-Cookie value that makes the browser forget its session (logout)."""
    return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"


def cross_site(headers: dict[str, str]) -> str | None:
    """Why a POST looks started by another site's page, or None.

    Browsers say where a request comes from (Sec-Fetch-Site; Origin on every POST); a script with the
    bearer token sends neither, and needs no such check: no browser adds that header on its own.
    """
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {site!r}"
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:  # not a URL at all
            netloc = ""
        if origin == "null" or netloc.lower() != host.lower():
            return f"Origin {origin!r} is not this server ({host!r})"
    return None


def local_path(target: str) -> str:
    """Where a login may send the browser next: a path of this server, else "/" (no open redirect).
    Characters a Location header cannot carry (a device named "касса-1") are percent-encoded."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or any(c < " " for c in target):
        return "/"
    return quote(target, safe="/?&=%#:@!$'()*+,;~-._")
