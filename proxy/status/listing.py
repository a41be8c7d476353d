"""The device list as the status page asks for it in its query string: search, filters, sort, paging and
the summary line, worked out on the server so that the page needs no JavaScript.

Only the rows of the page shown are turned into snapshots: filtering, sorting and counting read the
devices' attributes directly, which keeps a page of 5,000 devices well inside 100 ms (bench/status.py).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlencode

import attrs

from proxy.counters import ExchangeResult
from proxy.device import UP_STATES, State
from proxy.status.snapshot import FIELDS, Entry, port_kind

PAGE_SIZES = (50, 100, 200, 500)
DEFAULT_PAGE_SIZE = 100
# Seconds between the page's own reloads; 0 = never (refresh=0 in the query).
DEFAULT_REFRESH = 5
# The summary's pseudo-state for the filter: every state with an open link.
ONLINE = "online"
STATES = tuple(str(state) for state in State)
# Columns hidden until the page is asked otherwise: while a device is up, its last connect is its
# "connected since", and the page must fit 1,400 px.
DEFAULT_HIDDEN = frozenset({"last_connect"})
# A search longer than this is cut: it cannot match anything longer anyway, and it is echoed in the page.
MAX_SEARCH = 200


def _exchanges(entry: Entry) -> int:
    exchanges = entry.device.counters.exchanges
    return sum(exchanges.values()) - exchanges[ExchangeResult.REFUSED]


def _where(entry: Entry) -> str | None:
    device = entry.device
    if device.config.type == "simulator":
        return None
    return device.peer if device.dialin is not None else device.config.path


def _error(entry: Entry) -> str | None:
    error = entry.device.last_error
    return error[1].casefold() if error is not None else None


def _since(entry: Entry) -> float | None:
    device = entry.device
    moment = device.counters.last_connect
    return moment.timestamp() if moment is not None and device.state in UP_STATES else None


def _moment(name: str) -> Callable[[Entry], float | None]:
    def key(entry: Entry) -> float | None:
        moment = getattr(entry.device.counters, name)
        return moment.timestamp() if moment is not None else None

    return key


def _first_port(entry: Entry, kind: str) -> str | None:
    """The device's first port of this kind ("tls", "rfc2217"), or None."""
    return next((str(address) for address in entry.listen if port_kind(address) == kind), None)


# How each column sorts; None sorts last either way.
SORT_KEYS: dict[str, Callable[[Entry], Any]] = {
    "id": lambda entry: entry.key.casefold(),
    "name": lambda entry: entry.device.name.casefold(),
    "type": lambda entry: entry.device.config.type,
    "path": _where,
    "protocol": lambda entry: entry.device.config.protocol,
    "sharing": lambda entry: entry.device.config.sharing,
    "state": lambda entry: str(entry.device.state),
    "listen": lambda entry: str(entry.listen[0]) if entry.listen else None,
    "listen_tls": lambda entry: _first_port(entry, "tls"),
    "listen_rfc2217": lambda entry: _first_port(entry, "rfc2217"),
    "holder": lambda entry: entry.device.holder,
    "waiting": lambda entry: entry.device.waiting,
    "clients": lambda entry: entry.device.clients,
    "bytes_to_device": lambda entry: entry.device.counters.bytes_to_device,
    "bytes_from_device": lambda entry: entry.device.counters.bytes_from_device,
    "exchanges": _exchanges,
    "refused": lambda entry: sum(entry.device.counters.refused.values()),
    "last_error": _error,
    "last_error_at": lambda entry: entry.device.last_error[0] if entry.device.last_error else None,
    "connected_since": _since,
    "last_connect": _moment("last_connect"),
    "last_disconnect": _moment("last_disconnect"),
}


def _one(values: dict[str, list[str]], name: str, choices: tuple[str, ...] | None = None) -> str:
    """The query's value for `name` (the last one given), or "" when it is absent or not a choice."""
    given = values.get(name)
    if not given:
        return ""
    value = given[-1].strip()
    return value if choices is None or value in choices else ""


def _number(values: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    text = _one(values, name)
    return min(max(int(text), low), high) if text.isdigit() and len(text) < 10 else default


@attrs.frozen
class Query:
    """What the page was asked to show. Any value it does not know is taken as its default: a stale
    bookmark still shows a page."""

    search: str = ""
    state: str = ""
    type: str = ""
    protocol: str = ""
    sharing: str = ""
    # "": as the proxy lists them (the configured devices in their order, then the dial-in devices).
    sort: str = ""
    descending: bool = False
    page: int = 1
    per_page: int = DEFAULT_PAGE_SIZE
    hidden: frozenset[str] = DEFAULT_HIDDEN
    refresh: int = DEFAULT_REFRESH

    @classmethod
    def parse(cls, query: str) -> Query:
        """The Query of a URL's query string."""
        try:
            values = parse_qs(query, keep_blank_values=True, max_num_fields=100)
        except ValueError:  # more fields than any link of ours has
            values = {}
        per_page = _number(values, "per", DEFAULT_PAGE_SIZE, 1, max(PAGE_SIZES))
        # "cols" says the hide list is given, even when empty (every column shown).
        hidden = DEFAULT_HIDDEN
        if "hide" in values or "cols" in values:
            hidden = frozenset(values.get("hide", ())) & frozenset(FIELDS) - {"id"}
        return cls(
            search=_one(values, "q")[:MAX_SEARCH],
            state=_one(values, "state", (*STATES, ONLINE)),
            type=_one(values, "type"),
            protocol=_one(values, "protocol"),
            sharing=_one(values, "sharing"),
            sort=_one(values, "sort", tuple(SORT_KEYS)),
            descending=_one(values, "desc") == "1",
            page=_number(values, "page", 1, 1, 1_000_000),
            per_page=per_page if per_page in PAGE_SIZES else DEFAULT_PAGE_SIZE,
            hidden=hidden,
            refresh=_number(values, "refresh", DEFAULT_REFRESH, 0, 3600),
        )

    def link(self, **changes: Any) -> str:
        """The query string ("?..." or "?") of this query with `changes`."""
        text = urlencode(self.pairs(**changes))
        return f"?{text}" if text else "?"

    def pairs(self, **changes: Any) -> list[tuple[str, str]]:
        """This query with `changes` as (name, value) pairs; defaults are left out, so that links stay
        short."""
        query = attrs.evolve(self, **changes)
        pairs = [
            ("q", query.search),
            ("state", query.state),
            ("type", query.type),
            ("protocol", query.protocol),
            ("sharing", query.sharing),
            ("sort", query.sort),
            ("desc", "1" if query.descending else ""),
            ("page", "" if query.page == 1 else str(query.page)),
            ("per", "" if query.per_page == DEFAULT_PAGE_SIZE else str(query.per_page)),
            ("refresh", "" if query.refresh == DEFAULT_REFRESH else str(query.refresh)),
        ]
        if query.hidden != DEFAULT_HIDDEN:
            pairs += [("hide", field) for field in FIELDS if field in query.hidden] or [("cols", "1")]
        return [(name, value) for name, value in pairs if value]

    def matches(self, entry: Entry) -> bool:
        device = entry.device
        config = device.config
        if self.state == ONLINE:
            if device.state not in UP_STATES:
                return False
        elif self.state and device.state != self.state:
            return False
        if self.type and config.type != self.type:
            return False
        if self.protocol and config.protocol != self.protocol:
            return False
        if self.sharing and config.sharing != self.sharing:
            return False
        if self.search:
            wanted = self.search.casefold()
            where = _where(entry) or ""
            return wanted in entry.key.casefold() or wanted in device.name.casefold() or wanted in where.casefold()
        return True


@attrs.frozen
class Summary:
    """The summary line: devices by state (all devices, whatever the filters) and recent refusals."""

    devices: int
    states: dict[str, int]
    online: int
    refusals_last_hour: int


@attrs.frozen
class Listing:
    """One page of the device list."""

    query: Query
    summary: Summary
    # Devices that pass the search and filters, and the page's share of them, in order.
    matched: int
    rows: list[Entry]
    page: int
    pages: int
    # What the filters offer: the values the devices have.
    types: list[str]
    protocols: list[str]
    sharings: list[str]


def summarize(listed: list[Entry], now: float | None = None) -> Summary:
    """Counts every device by state, and the refusals of the last hour (to the minute)."""
    now = time.time() if now is None else now
    states = Counter(str(entry.device.state) for entry in listed)
    refusals = 0
    for entry in listed:
        recent = entry.device.counters.recent_refusals
        if recent is not None:
            refusals += recent.total(now)
    online = sum(states[str(state)] for state in UP_STATES)
    return Summary(len(listed), {state: states[state] for state in STATES}, online, refusals)


def ordered(listed: list[Entry], query: Query) -> list[Entry]:
    """The devices that match `query`, sorted as it says (ties in the proxy's order; devices without a
    value last)."""
    matched = [entry for entry in listed if query.matches(entry)]
    if not query.sort:
        if query.descending:
            matched.reverse()
        return matched
    key = SORT_KEYS[query.sort]
    valued = [(key(entry), entry) for entry in matched]
    present = [pair for pair in valued if pair[0] is not None]
    present.sort(key=lambda pair: pair[0], reverse=query.descending)
    return [entry for _, entry in present] + [entry for value, entry in valued if value is None]


def select(listed: list[Entry], query: Query) -> Listing:
    """The page of the device list that `query` asks for."""
    matched = ordered(listed, query)
    pages = max(1, math.ceil(len(matched) / query.per_page))
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    return Listing(
        query=query,
        summary=summarize(listed),
        matched=len(matched),
        rows=matched[start : start + query.per_page],
        page=page,
        pages=pages,
        types=sorted({entry.device.config.type for entry in listed}),
        protocols=sorted({entry.device.config.protocol for entry in listed}),
        sharings=sorted({entry.device.config.sharing for entry in listed}),
    )
