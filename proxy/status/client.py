"""`devproxy status`: the device table of a running proxy, read from its JSON API."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

COLUMNS = (
    ("id", "DEVICE"),
    ("state", "STATE"),
    ("holder", "HOLDER"),
    ("waiting", "WAITING"),
    ("clients", "CLIENTS"),
    ("bytes_to_device", "TO DEVICE"),
    ("bytes_from_device", "FROM DEVICE"),
    ("exchanges", "EXCHANGES"),
    ("refused", "REFUSED"),
    ("listen", "LISTEN"),
    ("last_error", "LAST ERROR"),
)


class StatusError(Exception):
    """The status server could not be read; the message says why."""


def fetch(url: str, token: str = "", timeout: float = 10.0) -> list[dict[str, Any]]:
    """The devices from `url`/api/devices."""
    request = urllib.request.Request(url.rstrip("/") + "/api/devices")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach {url}: {_one_line(reason)}") from None
    except (http.client.HTTPException, ValueError) as exc:
        # BadStatusLine, IncompleteRead, a JSON error...: something answered, but not a status server.
        raise StatusError(f"{url}: not a devproxy status server ({type(exc).__name__}: {_one_line(exc)})") from None


def _one_line(reason: object) -> str:
    """`reason` as one short line: what a peer sent may hold newlines and go on for pages."""
    text = " ".join(str(reason).split())
    return text if len(text) <= 200 else text[:200] + "..."


def _port(address: str, device: dict[str, Any]) -> str:
    """A listening address with what it speaks, as the API's listen_tls and listen_rfc2217 say."""
    if address in (device.get("listen_tls") or ()):
        return f"{address} (TLS)"
    return f"{address} (RFC 2217)" if address in (device.get("listen_rfc2217") or ()) else address


def table(devices: list[dict[str, Any]]) -> str:
    """The devices as aligned text columns."""
    rows = [[title for _, title in COLUMNS]]
    for device in devices:
        row = []
        for field, _ in COLUMNS:
            value = device.get(field)
            if field == "id":
                name = device.get("name")
                # A dial-in device's name beside its id (and a proxy older than ids shows its names).
                value = name if value is None else value if name in (None, value) else f"{value} ({name})"
            elif field == "listen" and value is not None:
                value = [_port(address, device) for address in value]
            row.append(", ".join(value) if isinstance(value, list) else "-" if value is None else str(value))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
