"""The status page: the device list with its summary line, search, filters, sort and paging, all in the
query string and worked out on the server (proxy.status.listing), so that it needs no JavaScript; and the
login form."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from proxy.config import PORT_KINDS, Address
from proxy.status.html import ago, attr, count, escape, layout, moment
from proxy.status.listing import ONLINE, PAGE_SIZES, STATES, Listing, Query
from proxy.status.snapshot import FIELDS, describe_port, device_values, port_kind

# Soft hyphens (\u00ad) let long headings break over two lines, so that every column fits 1,400 px.
TITLES = {
    "id": "Device",
    "type": "Type",
    "path": "Path or peer",
    "protocol": "Proto\u00adcol",
    "sharing": "Shar\u00ading",
    "state": "State",
    "listen": "Listen",
    "holder": "Holder",
    "waiting": "Wait\u00ading",
    "clients": "Cli\u00adents",
    "bytes_to_device": "To device",
    "bytes_from_device": "From device",
    "exchanges": "Ex\u00adchanges",
    "refused": "Re\u00adfused",
    "last_error": "Last error",
    "connected_since": "Connected since",
    "last_connect": "Last connect",
    "last_disconnect": "Last disconnect",
}
# The page's columns: the name is shown beside the id, and the last error's time on hover.
COLUMNS = tuple(field for field in FIELDS if field in TITLES)
NUMBERS = frozenset(("waiting", "clients", "bytes_to_device", "bytes_from_device", "exchanges", "refused"))
TIMES = frozenset(("connected_since", "last_connect", "last_disconnect"))


def device_link(key: str) -> str:
    """The URL of a device's page; a key may hold a '/' (a dial-in id), written %2F."""
    return "/devices/" + quote(key, safe="")


def _cell(field: str, values: dict[str, Any], now: float) -> str:
    value = values[field]
    if field == "id":
        name = values["name"]
        beside = f' <span class="name">{escape(name)}</span>' if name != value else ""
        return f'<td><a href="{attr(device_link(value))}">{escape(value)}</a>{beside}</td>'
    if field == "state":
        return f'<td class="state-{attr(value)}">{escape(value)}</td>'
    if field in NUMBERS:
        return f'<td class="num">{count(value)}</td>'
    if field in TIMES:
        return f"<td>{moment(value, now)}</td>"
    if field == "last_error":
        if value is None:
            return "<td>-</td>"
        # Red while it keeps the device offline, grey once the device is back.
        css = "error" if values["state"] == "offline" else "stale"
        at = values["last_error_at"]
        title = f"{value} ({ago(now - at.timestamp())}, {at.strftime('%Y-%m-%d %H:%M:%S UTC')})"
        return f'<td class="{css}"><span class="cut" title="{attr(title)}">{escape(value)}</span></td>'
    if field == "listen":
        # The ports: the column stays narrow; the whole addresses on hover.
        ports = ", ".join(_port_cell(address) for address in value)
        return f'<td title="{attr(", ".join(map(describe_port, value)))}">{escape(ports)}</td>'
    if value is None:
        return "<td>-</td>"
    text = ", ".join(value) if isinstance(value, list) else str(value)
    if field == "path":
        return f'<td><span class="cut" title="{attr(text)}">{escape(text)}</span></td>'
    return f"<td>{escape(text)}</td>"


def _port_cell(address: Address) -> str:
    """A port in the list's narrow column: ":8000", ":8443 TLS", ":8100 RFC 2217"."""
    label = PORT_KINDS[port_kind(address)]
    return f":{address.port} {label}" if label else f":{address.port}"


def _summary(listing: Listing) -> str:
    summary, query = listing.summary, listing.query

    def link(state: str, label: str, number: int) -> str:
        return f'<a href="{attr(query.link(state=state, page=1))}">{label} {number:,}</a>'

    states = summary.states
    parts = [
        link(ONLINE, "online", summary.online)
        + " ("
        + ", ".join(link(state, state, states[state]) for state in ("idle", "busy", "settling"))
        + ")",
        *(link(state, state, states[state]) for state in ("connecting", "offline", "closed")),
        f"refusals in the last hour: {summary.refusals_last_hour:,}",
    ]
    return f'<p class="summary"><b>{summary.devices:,} devices</b>: ' + " · ".join(parts) + "</p>"


def _choice(name: str, label: str, options: list[str], chosen: str) -> str:
    items = "".join(
        f'<option value="{attr(option)}"{" selected" if option == chosen else ""}>{escape(option)}</option>'
        for option in options
    )
    return f'<label>{label} <select name="{name}"><option value="">any</option>{items}</select></label>'


def _filters(listing: Listing) -> str:
    query = listing.query
    sizes = "".join(
        f'<option value="{size}"{" selected" if size == query.per_page else ""}>{size}</option>' for size in PAGE_SIZES
    )
    hidden = _keep(query, FILTERS)
    return (
        '<form method="get" action="/" class="filters">'
        f'<label>Search <input type="search" name="q" value="{attr(query.search)}" placeholder="name, ID or path">'
        "</label>"
        + _choice("state", "State", [ONLINE, *STATES], query.state)
        + _choice("type", "Type", listing.types, query.type)
        + _choice("protocol", "Protocol", listing.protocols, query.protocol)
        + _choice("sharing", "Sharing", listing.sharings, query.sharing)
        + f'<label>Per page <select name="per">{sizes}</select></label>{hidden}'
        '<button type="submit">Show</button> <a href="/">reset</a></form>'
    )


# What the filter form itself sets (a new search starts at page 1).
FILTERS = ("q", "state", "type", "protocol", "sharing", "per", "page")


def _keep(query: Query, replaced: tuple[str, ...]) -> str:
    """Hidden inputs that carry the rest of the query through a form that sets `replaced`."""
    return "".join(
        f'<input type="hidden" name="{name}" value="{attr(value)}">'
        for name, value in query.pairs()
        if name not in replaced
    )


def _pager(listing: Listing) -> str:
    query, page, pages = listing.query, listing.page, listing.pages
    if listing.matched == 0:
        return '<p class="pager">No device matches.</p>'
    first = (page - 1) * query.per_page + 1
    last = first + len(listing.rows) - 1
    links = []
    if page > 1:
        links.append(f'<a href="{attr(query.link(page=1))}" rel="first">first</a>')
        links.append(f'<a href="{attr(query.link(page=page - 1))}" rel="prev">previous</a>')
    links.append(f"page {page} of {pages}")
    if page < pages:
        links.append(f'<a href="{attr(query.link(page=page + 1))}" rel="next">next</a>')
        links.append(f'<a href="{attr(query.link(page=pages))}" rel="last">last</a>')
    return f'<p class="pager">Devices {first:,} to {last:,} of {listing.matched:,} · ' + " ".join(links) + "</p>"


def _header(field: str, query: Query) -> str:
    if field == query.sort:
        arrow = " ▼" if query.descending else " ▲"
        target = query.link(descending=not query.descending, page=1)
    else:
        arrow = ""
        target = query.link(sort=field, descending=False, page=1)
    return f'<th><a href="{attr(target)}">{escape(TITLES[field])}</a>{arrow}</th>'


def render(listing: Listing, *, logout: bool = False) -> str:
    """The device list page for `listing`; `logout`: a session is logged in (a Log out button)."""
    query = listing.query
    now = time.time()
    shown = [field for field in COLUMNS if field not in query.hidden]
    header = "".join(_header(field, query) for field in shown)
    rows = []
    for entry in listing.rows:
        values = device_values(entry.device, entry.listen, entry.key)
        cells = "".join(_cell(field, values, now) for field in shown)
        rows.append(f'<tr id="device-{attr(entry.key)}">{cells}</tr>')
    if not rows:
        empty = "No device matches." if listing.summary.devices else "No devices configured."
        rows.append(f'<tr><td colspan="{len(shown)}">{empty}</td></tr>')
    boxes = "".join(
        f'<label><input type="checkbox" name="hide" value="{field}"{" checked" if field in query.hidden else ""}>'
        f"{escape(TITLES[field])}</label>"
        for field in COLUMNS
        if field != "id"
    )
    keep = _keep(query, ("hide", "cols", "page")) + '<input type="hidden" name="cols" value="1">'
    if query.refresh:
        refresh = f'Refreshes every {query.refresh} s (<a href="{attr(query.link(refresh=0))}">stop</a>).'
    else:
        refresh = f'Not refreshing (<a href="{attr(query.link(refresh=5))}">refresh every 5 s</a>).'
    body = f"""<h1>devproxy</h1>
{_summary(listing)}
{_filters(listing)}
{_pager(listing)}
<table><thead><tr>{header}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
{_pager(listing) if len(listing.rows) > 20 else ""}
<form method="get" action="/">Hide columns: {boxes}{keep} <button type="submit">Apply</button></form>
<p>{refresh} JSON: <a href="/api/devices">/api/devices</a>, metrics: <a href="/metrics">/metrics</a>.</p>"""
    return layout("devproxy", body, refresh=query.refresh, logout=logout)


def login(target: str, *, failed: bool) -> str:
    """The login form; after it the browser goes to `target` (a path of this server)."""
    error = '<p class="error">That is not the status token.</p>' if failed else ""
    body = f"""<h1>devproxy</h1>
<p>This status server wants its token (<code>status_token</code> in the proxy's settings).</p>
{error}<form method="post" action="/login">
<label>Status token <input type="password" name="token" autocomplete="current-password" autofocus required></label>
<input type="hidden" name="next" value="{attr(target)}">
<button type="submit">Log in</button></form>"""
    return layout("devproxy: log in", body)
