"""Logging: loguru set up from [proxy] and each device's own log_level, lines as text or as one flat JSON
object, and the hex (and text) form of bytes on the wire.

Context rides in loguru's `extra`, given as keywords on the call (`logger.info("...", device=name,
client=peer, event="connect")`): no bound logger per device, which would cost each of thousands of
dial-in devices about 450 bytes.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from datetime import UTC
from typing import Any

from loguru import logger

from proxy.config import LOG_LEVELS, ProxyConfig

LINE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"
# A TRACE byte dump ends with its bytes as text, as `hexdump -C` shows them: printable ASCII, '.' for the
# rest, which is how the ASCII protocols (IEC 61107, COGES) are read.
_TEXT_LINE = LINE_FORMAT + "\n{exception}"
_BYTES_LINE = LINE_FORMAT + ": {extra[hex]}  |{extra[text]}|\n{exception}"
_CUT_BYTES_LINE = LINE_FORMAT + ": {extra[hex]} ...  |{extra[text]}| ({extra[size]} bytes)\n{exception}"
_JSON_LINE = "{extra[_json]}\n"
# A byte dump shows at most this many bytes of a chunk (a raw read takes up to 64 KiB); `size` has them all.
HEX_LIMIT = 256
# What a JSON line carries beside time, level and message, when the call gave it.
JSON_FIELDS = ("device", "client", "peer", "event", "reason", "direction", "size", "hex", "text")
# `direction` of a byte dump.
FROM_DEVICE = "from_device"
TO_DEVICE = "to_device"
LEVELS = {name: logger.level(name).no for name in LOG_LEVELS}
TRACE = LEVELS["TRACE"]
DEBUG = LEVELS["DEBUG"]
_TEXT_TABLE = bytes(byte if 0x20 <= byte < 0x7F else 0x2E for byte in range(256))


class LogFileError(Exception):
    """log_file cannot be opened; the message names the file and the reason."""


_config: ProxyConfig | None = None
_handlers: list[int] = []
# [proxy] log_level, for every line that names no device with a level of its own. DEBUG until setup(),
# as loguru's own stderr sink.
_level = DEBUG
# The devices with a log_level of their own, by name: wanted() drops their lines below it.
_device_levels: dict[str, int] = {}
# The sinks' level: the lowest one wanted anywhere. loguru drops a line below it before building its
# record (0.35 us instead of 7.7 here); wanted() sorts the rest. It sinks when a device asks for less and is
# worked out again by setup(); a device removed by a reload is still counted until the next start.
_floor = DEBUG


def setup(config: ProxyConfig) -> None:
    """Sends log lines to stderr and, when log_file is set, to a rotated file; replaces earlier set-ups.

    Lines are text (text_line) or, with log_json, one flat JSON object each (json_line). A device with
    a log_level of its own (device_level) logs at that level, every other line at config.log_level.
    Sinks write directly (no enqueue): enqueue costs ~290 us a line and blocks Trio on complete().
    Error handling: LogFileError when log_file cannot be opened; logging then goes to stderr alone.
    """
    global _config, _level, _floor
    logger.remove()
    _handlers.clear()
    _config, _level = config, LEVELS[config.log_level]
    _floor = min([_level, *_device_levels.values()])
    _add_sinks(config)


def _add_sinks(config: ProxyConfig) -> None:
    line = json_line if config.log_json else text_line
    _handlers.append(logger.add(sys.stderr, level=_floor, format=line, filter=wanted))
    if config.log_file:
        try:
            handler = logger.add(
                config.log_file,
                level=_floor,
                format=line,
                filter=wanted,
                rotation=config.log_rotation,
                retention=config.log_retention,
            )
        except (OSError, ValueError) as exc:
            raise LogFileError(f"log_file {config.log_file!r} cannot be opened: {exc}") from None
        _handlers.append(handler)


def device_level(name: str, level: str) -> None:
    """Device `name` logs at `level`, its own log_level ("": at [proxy]'s); a device calls this as it is made.

    A level below every other one makes the sinks take lines from it: they are added again (a log file
    is reopened). Error handling: a log file that cannot be reopened is logged; stderr goes on.
    """
    global _floor
    if not level:
        _device_levels.pop(name, None)
        return
    number = _device_levels[name] = LEVELS[level]
    if number >= _floor:
        return
    _floor = number
    if _config is None:
        return
    for handler in _handlers:
        with contextlib.suppress(ValueError):  # already removed (a test's logger.remove())
            logger.remove(handler)
    _handlers.clear()
    try:
        _add_sinks(_config)
    except LogFileError as exc:
        logger.error("{}; logging to stderr only", exc)


def wanted(record: dict[str, Any]) -> bool:
    """The sinks' filter: a line naming a device with a log_level of its own follows that level, any
    other line [proxy]'s."""
    return record["level"].no >= _device_levels.get(record["extra"].get("device"), _level)


def tracing(level: str = "") -> bool:
    """True when TRACE lines are wanted from a device logging at `level` ("": [proxy]'s log_level): the
    byte path asks this once per device (Device.tracing) and checks that before formatting any hex, so
    one device at TRACE costs the others nothing."""
    return (LEVELS[level] if level else _level) <= TRACE


def debugging(level: str = "") -> bool:
    """True when DEBUG lines are wanted from a device logging at `level` ("": [proxy]'s; until setup(),
    yes): a line per exchange asks this first (Device.debugging), since even a lazy loguru call costs
    more than the rest of its bookkeeping."""
    return (LEVELS[level] if level else _level) <= DEBUG


def text_line(record: dict[str, Any]) -> str:
    """The text format: time, level and message; a byte dump adds its hex and its text."""
    extra = record["extra"]
    if "hex" not in extra:
        return _TEXT_LINE
    return _BYTES_LINE if extra["size"] <= HEX_LIMIT else _CUT_BYTES_LINE


def json_line(record: dict[str, Any]) -> str:
    """The log_json format: one flat object a line, with the time in UTC (ISO 8601, milliseconds), the
    level, the message, and those of JSON_FIELDS the call gave (a traceback as `exception`)."""
    extra = record["extra"]
    if "_json" not in extra:  # made once for both sinks
        stamp = record["time"].astimezone(UTC)
        line = {
            "time": f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z",
            "level": record["level"].name,
            "message": record["message"],
        }
        for key in JSON_FIELDS:
            value = extra.get(key)
            if value is not None:
                line[key] = value
        if record["exception"] is not None:
            line["exception"] = "".join(traceback.format_exception(*record["exception"])).rstrip()
        extra["_json"] = json.dumps(line, ensure_ascii=False, default=str)
    return _JSON_LINE


def wire_bytes(data: bytes) -> dict[str, Any]:
    """The context of a TRACE byte dump: `size`, and its first HEX_LIMIT bytes as `hex` and as `text`."""
    shown = data[:HEX_LIMIT]
    return {"size": len(data), "hex": shown.hex(" "), "text": printable(shown)}


def printable(data: bytes) -> str:
    """Bytes as `hexdump -C` shows them beside the hex: printable ASCII as it is, '.' for the rest."""
    return data.translate(_TEXT_TABLE).decode("ascii")


def hexdump(data: bytes, limit: int = 256) -> str:
    """Bytes as spaced hex, cut after `limit` bytes with the full length noted."""
    if len(data) <= limit:
        return data.hex(" ")
    return f"{data[:limit].hex(' ')} ... ({len(data)} bytes)"
