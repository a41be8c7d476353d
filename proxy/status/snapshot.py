"""What the status page, the JSON API and `devproxy status` say about a device: one dict of plain values."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from proxy.config import Address
from proxy.counters import ExchangeResult
from proxy.device import UP_STATES, Device

FIELDS = (
    "name",
    "type",
    "path",
    "protocol",
    "sharing",
    "state",
    "listen",
    "holder",
    "waiting",
    "clients",
    "bytes_to_device",
    "bytes_from_device",
    "exchanges",
    "refused",
    "connected_since",
    "last_connect",
    "last_disconnect",
)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def _where(device: Device) -> str | None:
    """The serial path or TCP address; for a dial-in device, the address it last connected from."""
    if device.config.type == "simulator":
        return None
    if device.dialin is not None:
        return device.peer
    return device.config.path


def device_snapshot(device: Device, listen: list[Address]) -> dict[str, Any]:
    """The device's fields, named as in FIELDS; times in ISO 8601 UTC or None."""
    config, counters = device.config, device.counters
    up = device.state in UP_STATES
    return {
        "name": device.name,
        "type": config.type,
        "path": _where(device),
        "protocol": config.protocol,
        "sharing": config.sharing,
        "state": str(device.state),
        "listen": [str(address) for address in listen],
        "holder": device.holder,
        "waiting": device.waiting,
        "clients": device.clients,
        "bytes_to_device": counters.bytes_to_device,
        "bytes_from_device": counters.bytes_from_device,
        "exchanges": sum(count for result, count in counters.exchanges.items() if result != ExchangeResult.REFUSED),
        "refused": sum(counters.refused.values()),
        "connected_since": _iso(counters.last_connect) if up else None,
        "last_connect": _iso(counters.last_connect),
        "last_disconnect": _iso(counters.last_disconnect),
    }
