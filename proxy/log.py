"""Logging: loguru set up from [proxy], and the hex form of bytes on the wire."""

from __future__ import annotations

import sys

from loguru import logger

from proxy.config import ProxyConfig

LINE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"


class LogFileError(Exception):
    """log_file cannot be opened; the message names the file and the reason."""


def setup(config: ProxyConfig) -> None:
    """Sends log lines to stderr and, when log_file is set, to a rotated file; replaces earlier set-ups.

    Sinks write directly (no enqueue): enqueue costs ~290 us a line and blocks Trio on complete().
    Error handling: LogFileError when log_file cannot be opened; logging then goes to stderr alone.
    """
    logger.remove()
    logger.add(sys.stderr, level=config.log_level, format=LINE_FORMAT, serialize=config.log_json)
    if config.log_file:
        try:
            logger.add(
                config.log_file,
                level=config.log_level,
                format=LINE_FORMAT,
                serialize=config.log_json,
                rotation=config.log_rotation,
                retention=config.log_retention,
            )
        except (OSError, ValueError) as exc:
            raise LogFileError(f"log_file {config.log_file!r} cannot be opened: {exc}") from None
    global _tracing, _debugging
    _tracing = config.log_level == "TRACE"
    _debugging = config.log_level in ("TRACE", "DEBUG")


_tracing = False
_debugging = True


def tracing() -> bool:
    """True when TRACE lines are wanted: the byte path asks this before formatting any hex."""
    return _tracing


def debugging() -> bool:
    """True when DEBUG lines may be wanted (until setup() says otherwise): a line per exchange asks this
    first, since even a lazy loguru call costs more than the rest of its bookkeeping."""
    return _debugging


def hexdump(data: bytes, limit: int = 256) -> str:
    """Bytes as spaced hex, cut after `limit` bytes with the full length noted."""
    if len(data) <= limit:
        return data.hex(" ")
    return f"{data[:limit].hex(' ')} ... ({len(data)} bytes)"
