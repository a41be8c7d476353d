"""What the status page, the JSON API and `devproxy status` say about a device: one dict of plain values;
and the key each device goes by in URLs and metric labels (a dial-in device's id, else its name)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import attrs

from proxy.config import Address, Port
from proxy.counters import ExchangeResult
from proxy.device import UP_STATES, Device, State
from proxy.events import Event, TrafficLine

FIELDS = (
    "id",
    "name",
    "type",
    "path",
    "protocol",
    "sharing",
    "state",
    "listen",
    "listen_tls",
    "listen_rfc2217",
    "holder",
    "waiting",
    "clients",
    "bytes_to_device",
    "bytes_from_device",
    "exchanges",
    "refused",
    "last_error",
    "last_error_at",
    "connected_since",
    "last_connect",
    "last_disconnect",
)
# The fields that hold a time.
TIMES = ("last_error_at", "connected_since", "last_connect", "last_disconnect")


# Bytes as text in a traffic line: printable ASCII as is, '.' for the rest (as `hexdump -C` shows them),
# which is how the ASCII protocols (IEC 61107, COGES) are read.
_TEXT_TABLE = bytes(byte if 0x20 <= byte < 0x7F else 0x2E for byte in range(256))


@attrs.frozen
class Entry:
    """A device as the status server lists it: `key` names it in URLs, the API and metric labels."""

    key: str
    device: Device
    listen: list[Address]


def entries(devices: Iterable[tuple[Device, list[Address]]]) -> dict[str, Entry]:
    """The devices by key: a dial-in device goes by its id (its name, from `devices add --name`, is shown
    beside it), any other by its name. A dial-in id that is also a configured device's name leaves that
    name to the configured device, and the dial-in device goes by its own (unique) name."""
    found: dict[str, Entry] = {}
    dialin = []
    for device, listen in devices:
        if device.dialin is None:
            found[device.name] = Entry(device.name, device, listen)
        else:
            dialin.append((device, listen))
    for device, listen in dialin:
        key = device.config.path if device.config.path not in found else device.name
        found[key] = Entry(key, device, listen)
    return found


def find(listed: dict[str, Entry], name: str) -> Entry | None:
    """The device `name` names: its key, or else a dial-in device's name ("/devices/Meter 1" works too)."""
    entry = listed.get(name)
    if entry is not None:
        return entry
    return next((entry for entry in listed.values() if entry.device.name == name), None)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, or None."""
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def iso_from_epoch(seconds: float | None) -> str | None:
    """iso() of a time in seconds since the epoch (an event's, a traffic line's)."""
    return iso(datetime.fromtimestamp(seconds, UTC)) if seconds is not None else None


def is_up(state: State) -> bool:
    """devproxy_device_up: the link is open, or it is closed on purpose until a client wants it
    (release_port; a device whose last open failed is offline instead)."""
    return state in UP_STATES or state == State.CLOSED


def _where(device: Device) -> str | None:
    """The serial path or TCP address; for a dial-in device, the address it last connected from, or the
    instance that holds it (a shared registry)."""
    if device.config.type == "simulator":
        return None
    if device.dialin is not None:
        held = device.elsewhere() if device.elsewhere is not None else None
        return f"held by instance {held.instance} ({held.address})" if held is not None else device.peer
    return device.config.path


def device_snapshot(device: Device, listen: list[Address], key: str | None = None) -> dict[str, Any]:
    """The device's fields, named as in FIELDS; times in ISO 8601 UTC or None. `key` is the one entries()
    gave it (by default its dial-in id, else its name)."""
    values = device_values(device, listen, key)
    for field in TIMES:
        values[field] = iso(values[field])
    for field in ("listen", "listen_tls", "listen_rfc2217"):
        values[field] = [str(address) for address in values[field]]
    return values


def port_kind(address: Address) -> str:
    """What a listening address's clients speak: "plain", "tls" or "rfc2217" (Port.kind)."""
    return address.kind if isinstance(address, Port) else "plain"


def describe_port(address: Address) -> str:
    """The address with what it speaks, for people: "127.0.0.1:8443 (TLS)"."""
    return address.describe() if isinstance(address, Port) else str(address)


def device_values(device: Device, listen: list[Address], key: str | None = None) -> dict[str, Any]:
    """As device_snapshot(), with the times as datetimes (UTC) and the listen addresses as Addresses, for
    the page to write as it likes."""
    config, counters = device.config, device.counters
    up = device.state in UP_STATES
    error_at, error = device.last_error or (None, None)
    return {
        "id": key or (device.config.path if device.dialin is not None else device.name),
        "name": device.name,
        "type": config.type,
        "path": _where(device),
        "protocol": config.protocol,
        "sharing": config.sharing,
        "state": str(device.state),
        "listen": listen,
        # Which of them speak TLS or RFC 2217 (Port.kind; an address that is no Port speaks plain bytes).
        "listen_tls": [address for address in listen if port_kind(address) == "tls"],
        "listen_rfc2217": [address for address in listen if port_kind(address) == "rfc2217"],
        "holder": device.holder,
        "waiting": device.waiting,
        "clients": device.clients,
        "bytes_to_device": counters.bytes_to_device,
        "bytes_from_device": counters.bytes_from_device,
        "exchanges": sum(count for result, count in counters.exchanges.items() if result != ExchangeResult.REFUSED),
        "refused": sum(counters.refused.values()),
        "last_error": error,
        "last_error_at": datetime.fromtimestamp(error_at, UTC) if error_at is not None else None,
        "connected_since": counters.last_connect if up else None,
        "last_connect": counters.last_connect,
        "last_disconnect": counters.last_disconnect,
    }


def event_snapshot(event: Event) -> dict[str, Any]:
    """One event of the device's ring as the API gives it."""
    return {
        "at": iso_from_epoch(event.at),
        "event": str(event.kind),
        "client": event.client,
        "detail": event.detail,
        "seconds": round(event.seconds, 6) if event.seconds is not None else None,
    }


def traffic_snapshot(line: TrafficLine) -> dict[str, Any]:
    """One chunk of live traffic: hex and text of its first bytes, and its full size."""
    return {
        "at": iso_from_epoch(line.at),
        "direction": str(line.direction),
        "client": line.client,
        "size": line.size,
        "hex": line.data.hex(" "),
        "text": line.data.translate(_TEXT_TABLE).decode("ascii"),
    }
