"""A device's own page: its state, who holds it and who waits, its counters, its settings, its last events,
and a live view of its traffic (Server-Sent Events, with a few lines of script; the rest of the page
needs none)."""

from __future__ import annotations

import ipaddress
import time
from typing import Any
from urllib.parse import quote

import attrs
import trio

from proxy.counters import REFUSAL_REASONS, ExchangeResult, Histogram
from proxy.status.html import attr, duration, escape, layout, moment, moment_from_epoch
from proxy.status.page import device_link
from proxy.status.snapshot import Entry, describe_port, device_values

# Rows the live view keeps; older ones are removed as new ones come.
TRAFFIC_ROWS = 500
# The live view: the only script of the status pages (its hash is in the page's Content-Security-Policy).
# It writes what arrives with textContent, so bytes from a device never become markup.
SCRIPT = f"""
(function () {{
  var view = document.getElementById("traffic-view");
  var body = document.querySelector("#traffic tbody");
  var note = document.getElementById("traffic-note");
  if (!view || !window.EventSource) return;
  function row(cells, css) {{
    var tr = document.createElement("tr");
    tr.className = css;
    cells.forEach(function (text) {{
      var td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }});
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > {TRAFFIC_ROWS}) body.deleteRow(-1);
  }}
  var source = new EventSource(view.getAttribute("data-src"));
  note.textContent = "Connecting to the live view...";
  source.onopen = function () {{ note.textContent = "Live: bytes appear here as they cross the link, newest first."; }};
  source.onerror = function () {{ note.textContent = "The live view was interrupted; it reconnects by itself."; }};
  source.addEventListener("traffic", function (event) {{
    var line = JSON.parse(event.data);
    var arrow = line.direction === "to_device" ? "to device" : "from device";
    row([line.at.slice(11, 23), arrow, line.client || "nobody", line.size, line.hex, line.text], line.direction);
  }});
  source.addEventListener("dropped", function (event) {{
    var count = JSON.parse(event.data).dropped;
    row(["", "", "", "", count + " lines dropped: this page did not keep up", ""], "dropped");
  }});
}})();
"""


def _setting(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex(" ") if value else '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) if value else "[]"
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return str(value) if value != "" else '""'


def _rows(pairs: list[tuple[str, str]]) -> str:
    """Table rows of (label, markup already escaped)."""
    return "".join(f"<tr><th>{escape(label)}</th><td>{markup}</td></tr>" for label, markup in pairs)


def _waits(histogram: Histogram, pooled: bool) -> str:
    observed = sum(histogram.counts)
    if not observed:
        return "none yet"
    mean = histogram.total / observed
    note = " (all devices with metrics_histograms = false together)" if pooled else ""
    return escape(f"{observed:,}, {duration(mean)} on average{note}")


def holder_page(origin: tuple[str, int], host: str, key: str) -> str:
    """The URL of a device's page at another instance (`host`), which serves its status page with this
    one's scheme and port (`origin`)."""
    scheme, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}{device_link(key)}"


def render(entry: Entry, *, logout: bool = False, origin: tuple[str, int] | None = None) -> str:
    """The page of one device; with this status server's `origin` (scheme, port), a dial-in device that
    another instance holds links to that instance's page of it."""
    device, key = entry.device, entry.key
    now, clock = time.time(), trio.current_time()
    values = device_values(device, entry.listen, key)
    counters = device.counters
    name = f' <span class="name">{escape(device.name)}</span>' if device.name != key else ""
    state = values["state"]

    holder = escape(values["holder"] or "nobody")
    held_since = device.sharing.held_since
    if values["holder"] and held_since is not None:
        holder += escape(f" (for {duration(clock - held_since)})")
    if values["holder"]:
        action = attr(f"/api/devices/{quote(key, safe='')}/disconnect")
        holder += (
            f' <form class="inline" method="post" action="{action}"><button type="submit">Disconnect it</button></form>'
        )
    waiters = device.sharing.waiters()
    waiting = (
        "<ol>"
        + "".join(f"<li>{escape(client)} (waiting {escape(duration(clock - since))})</li>" for client, since in waiters)
        + "</ol>"
        if waiters
        else "nobody"
    )
    error = escape(values["last_error"]) + " " + moment(values["last_error_at"], now) if values["last_error"] else "-"
    where = escape(values["path"] or "-")
    held = device.elsewhere() if device.elsewhere is not None else None
    if held is not None and origin is not None:
        where += f' <a href="{attr(holder_page(origin, held.address.host, key))}">its page there</a>'
    now_rows = _rows(
        [
            ("State", f'<span class="state-{attr(state)}">{escape(state)}</span>'),
            ("Last error", error),
            ("Holder", holder),
            ("Waiting", waiting),
            ("Clients connected", escape(values["clients"])),
            ("Path or peer", where),
            ("Listen", escape(", ".join(map(describe_port, values["listen"])))),
            ("Connected since", moment(values["connected_since"], now)),
            ("Last connect", moment(values["last_connect"], now)),
            ("Last disconnect", moment(values["last_disconnect"], now)),
        ]
    )

    pooled = not device.config.metrics_histograms
    counter_rows = _rows(
        [
            ("Bytes to device", f"{counters.bytes_to_device:,}"),
            ("Bytes from device", f"{counters.bytes_from_device:,}"),
            ("Unsolicited bytes (dropped)", f"{counters.unsolicited_bytes:,}"),
            ("Discarded bytes (settling)", f"{counters.discarded_bytes:,}"),
            ("Leases granted", f"{counters.leases_granted:,}"),
            ("Link opens / losses", f"{counters.link_opens:,} / {counters.link_losses:,}"),
            *((f"Exchanges {result}", f"{counters.exchanges[result]:,}") for result in ExchangeResult),
            *((f"Refused ({reason})", f"{counters.refused[reason]:,}") for reason in REFUSAL_REASONS),
            ("Waits for the device", _waits(counters.lock_wait_seconds, pooled)),
            ("Exchange durations", _waits(counters.exchange_seconds, pooled)),
        ]
    )
    settings_rows = _rows(
        [(field, escape(_setting(value))) for field, value in attrs.asdict(device.config, recurse=False).items()]
    )

    recent = device.events.recent()
    event_rows = "".join(
        "<tr>"
        f"<td>{moment_from_epoch(event.at, now)}</td><td>{escape(event.kind)}</td>"
        f"<td>{escape(event.client or '-')}</td><td>{escape(event.detail or '-')}</td>"
        f"<td>{escape(duration(event.seconds))}</td>"
        "</tr>"
        for event in reversed(recent)
    )
    if not event_rows:
        event_rows = '<tr><td colspan="5">Nothing has happened yet.</td></tr>'

    api = f"/api/devices/{quote(key, safe='')}"
    body = f"""<p><a href="/">all devices</a> · <a href="{attr(device_link(key))}">reload</a></p>
<h1>{escape(key)}{name}</h1>
<h2>Now <small>(as of {time.strftime("%H:%M:%S UTC", time.gmtime(now))}; the live traffic below streams)</small></h2>
<table class="facts">{now_rows}</table>
<h2>Live traffic</h2>
<section id="traffic-view" data-src="{attr(api + "/traffic")}">
<p id="traffic-note">The live view needs JavaScript; without it, read the same stream with
<code>curl -N http://HOST{escape(api)}/traffic</code>.</p>
<table id="traffic"><thead><tr><th>Time (UTC)</th><th>Direction</th><th>Client</th><th>Bytes</th><th>Hex</th>
<th>Text</th></tr></thead><tbody></tbody></table>
</section>
<h2>Last {len(recent)} event{"" if len(recent) == 1 else "s"} (of at most {device.events.capacity}), newest first</h2>
<table><thead><tr><th>When</th><th>Event</th><th>Client</th><th>Detail</th><th>Took</th></tr></thead>
<tbody>{event_rows}</tbody></table>
<h2>Counters</h2>
<table class="facts">{counter_rows}</table>
<h2>Settings</h2>
<table class="facts">{settings_rows}</table>
<p>JSON: <a href="{attr(api)}">{escape(api)}</a>, <a href="{attr(api + "/events")}">events</a>,
<a href="{attr(api + "/traffic")}">live traffic (Server-Sent Events)</a>.</p>"""
    # Without scripts the page reloads itself; with them it stays, so that the live view keeps its rows.
    return layout(f"devproxy: {key}", body, refresh=-10, script=SCRIPT, logout=logout)
