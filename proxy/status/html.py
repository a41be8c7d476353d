"""What the status server's HTML pages share: the layout with its style sheet, the Content-Security-Policy
that allows exactly that style and the device page's one script, and the way values are written.

Everything a device, a client or a peer can choose (names, ids, addresses, error texts, bytes) reaches the
page through escape() or attr(), never as markup.
"""

from __future__ import annotations

import base64
import hashlib
import html
from datetime import UTC, datetime
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0.2em 0 0.4em; } h2 { font-size: 1.1em; margin: 1.4em 0 0.4em; }
a { color: #0645ad; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.35em; text-align: left; white-space: nowrap; }
th { background: #f2f2f2; vertical-align: bottom; } th a { color: inherit; }
thead th { white-space: normal; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state-idle { background: #e3f6e3; } .state-busy { background: #fff3cd; }
.state-offline { background: #f8d7da; } .state-connecting { background: #e2e3f3; }
.state-settling { background: #ffe5b4; } .state-closed { background: #eceff1; }
.cut { display: inline-block; max-width: 10em; overflow: hidden; text-overflow: ellipsis; vertical-align: bottom; }
.name { color: #555; } .stale { color: #888; } .error { color: #a00; }
.summary { margin: 0.3em 0 0.8em; } .pager a { margin: 0 0.15em; }
form { margin: 0.6em 0; font-size: 0.9em; } label { margin-right: 0.8em; white-space: nowrap; }
form.inline { display: inline; margin: 0; } .top { float: right; }
table.facts th { width: 12em; } code { font-family: ui-monospace, monospace; }
#traffic td { font-family: ui-monospace, monospace; white-space: pre; }
tr.to_device td { background: #f3f8ff; } tr.dropped td { color: #a00; }
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(script: str = "") -> str:
    """The policy of a page: its own style sheet and `script`, nothing inline beside them, nothing from
    elsewhere, no framing by other sites (clickjacking), forms and event streams to this server only."""
    scripts = _hash(script) if script else "'none'"
    return (
        f"default-src 'none'; style-src {_hash(STYLE)}; script-src {scripts}; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def escape(value: Any) -> str:
    """Text for an element's content: markup in it shows as text."""
    return html.escape(str(value), quote=False)


def attr(value: Any) -> str:
    """Text for a quoted attribute value."""
    return html.escape(str(value), quote=True)


def layout(title: str, body: str, *, refresh: int = 0, script: str = "", logout: bool = False) -> str:
    """A whole page: `body` under a heading bar, with a Log out button while a session is logged in, and
    a reload every `refresh` seconds (0: none; -1: only where scripts do not run)."""
    meta = ""
    if refresh > 0:
        meta = f'<meta http-equiv="refresh" content="{refresh}">'
    elif refresh < 0:
        meta = f'<noscript><meta http-equiv="refresh" content="{-refresh}"></noscript>'
    logout_form = (
        '<form class="inline top" method="post" action="/logout"><button type="submit">Log out</button></form>'
        if logout
        else ""
    )
    scripts = f"<script>{script}</script>" if script else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{meta}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}</style></head>
<body>{logout_form}
{body}
{scripts}</body></html>
"""


def ago(seconds: float) -> str:
    """A time span in an operator's words: "just now", "42 s ago", "3 min ago", "5 h ago", "2 d ago"."""
    if seconds < 0:
        return "in the future"
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600:.0f} h ago"
    return f"{seconds // 86400:.0f} d ago"


def moment(when: datetime | None, now: float) -> str:
    """A time as "3 min ago", with the exact UTC time on hover; "-" for none."""
    if when is None:
        return "-"
    when = when.astimezone(UTC)
    exact = when.strftime("%Y-%m-%d %H:%M:%S UTC")
    machine = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return f'<time datetime="{machine}" title="{exact}">{ago(now - when.timestamp())}</time>'


def moment_from_epoch(seconds: float | None, now: float) -> str:
    """moment() of a time in seconds since the epoch (an event's)."""
    return moment(datetime.fromtimestamp(seconds, UTC) if seconds is not None else None, now)


def duration(seconds: float | None) -> str:
    """A duration: milliseconds below a second, then seconds, minutes, hours."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def count(number: int) -> str:
    """A count that fits a narrow column: 12345 -> "12.3 k", with the exact number on hover."""
    if number < 10_000:
        return str(number)
    for divisor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= divisor:
            return f'<span title="{number:,}">{number / divisor:.1f} {unit}</span>'
    return str(number)
