"""The status page: one HTML table row per device, refreshed by the browser, columns hideable, no script."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import urlencode

from proxy.status.snapshot import FIELDS

REFRESH_SECONDS = 5
TITLES = {
    "name": "Device",
    "type": "Type",
    "path": "Path or peer",
    "protocol": "Protocol",
    "sharing": "Sharing",
    "state": "State",
    "listen": "Listen",
    "holder": "Holder",
    "waiting": "Waiting",
    "clients": "Clients",
    "bytes_to_device": "Bytes to device",
    "bytes_from_device": "Bytes from device",
    "exchanges": "Exchanges",
    "refused": "Refused",
    "connected_since": "Connected since",
    "last_connect": "Last connect",
    "last_disconnect": "Last disconnect",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f2f2f2; }
td.state-idle { background: #e3f6e3; } td.state-busy { background: #fff3cd; }
td.state-offline { background: #f8d7da; } td.state-connecting { background: #e2e3f3; }
td.state-settling { background: #ffe5b4; }
form { margin: 1em 0; font-size: 0.85em; } label { margin-right: 0.8em; white-space: nowrap; }
"""


def _cell(name: str, value: Any) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, list):
        text = ", ".join(value)
    else:
        text = str(value)
    css = f' class="state-{escape(text)}"' if name == "state" else ""
    return f"<td{css}>{escape(text)}</td>"


def render(devices: list[dict[str, Any]], hidden: set[str]) -> str:
    """The page, with the columns in `hidden` left out; the hide form keeps its choice across refreshes."""
    shown = [field for field in FIELDS if field not in hidden]
    header = "".join(f"<th>{escape(TITLES[field])}</th>" for field in shown)
    rows = "\n".join(
        f'<tr id="device-{escape(device["name"])}">' + "".join(_cell(f, device[f]) for f in shown) + "</tr>"
        for device in devices
    )
    boxes = "".join(
        f'<label><input type="checkbox" name="hide" value="{field}"{" checked" if field in hidden else ""}>'
        f"{escape(TITLES[field])}</label>"
        for field in FIELDS
        if field != "name"
    )
    query = urlencode([("hide", field) for field in sorted(hidden)])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}; url=/{"?" + query if query else ""}">
<title>devproxy</title><style>{STYLE}</style></head>
<body><h1>devproxy</h1>
<table><thead><tr>{header}</tr></thead>
<tbody>
{rows or f'<tr><td colspan="{len(shown)}">No devices configured.</td></tr>'}
</tbody></table>
<form method="get" action="/">Hide columns: {boxes} <button type="submit">Apply</button></form>
<p>Refreshes every {REFRESH_SECONDS} s. JSON: <a href="/api/devices">/api/devices</a>,
metrics: <a href="/metrics">/metrics</a>.</p>
</body></html>
"""
