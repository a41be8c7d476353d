"""`devproxy import`: another gateway's configuration turned into settings.toml, with what could not be mapped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from proxy.config import ConfigError, parse

ECR_LOG_LEVELS = {
    "verbose": "TRACE",
    "debug": "DEBUG",
    "information": "INFO",
    "warning": "WARNING",
    "error": "ERROR",
    "fatal": "CRITICAL",
}
WINDOWS_PORT = re.compile(r"COM\d+", re.IGNORECASE)


class ImportFailed(Exception):
    """The file cannot be imported at all; the message says why."""


@attrs.define
class Imported:
    """The settings made from another gateway's file, and every setting left behind with the reason."""

    settings: dict[str, Any]
    unmapped: list[str] = attrs.field(factory=list)

    def toml(self) -> str:
        return tomli_w.dumps(self.settings)


def _text(element: ElementTree.Element | None) -> str | None:
    return element.text.strip() if element is not None and element.text else None


def import_ecrservice(path: Path) -> Imported:
    """ECRService's config.xml: ListeningPort, Connection Id/Type/Path/ReleasePort/Reconnect, LogLevel...

    Each Connection becomes a [[device]] of the Custom protocol in exchange sharing (ECRService's own
    behaviour), listening where ECRService did.
    """
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        raise ImportFailed(f"{path}: cannot read the ECRService config: {exc}") from None
    imported = Imported({"proxy": {"status": "127.0.0.1:8600"}, "device": []})
    known = {"FormatVersion", "ListeningPort", "Connections", "LogLevel", "Debug", "EarlyAckForwarding"}
    delay = _text(root.find("EarlyAckDelayMs"))
    if delay is not None:
        known.add("EarlyAckDelayMs")
        imported.unmapped.append(f"EarlyAckDelayMs {delay!r}: devproxy forwards an ACK the moment it arrives")
    port = _text(root.find("ListeningPort")) or "8000"
    if not port.isdigit():
        imported.unmapped.append(f"ListeningPort {port!r}: not a port number; 8000 used")
        port = "8000"
    level = _text(root.find("LogLevel"))
    if level is not None:
        if level.lower() in ECR_LOG_LEVELS:
            imported.settings["proxy"]["log_level"] = ECR_LOG_LEVELS[level.lower()]
        else:
            imported.unmapped.append(f"LogLevel {level!r}: not one of {', '.join(ECR_LOG_LEVELS)}")
    if _text(root.find("Debug")) is not None:
        imported.unmapped.append(f"Debug {_text(root.find('Debug'))!r}: devproxy has no debug mode; use log_level")
    early_ack = _text(root.find("EarlyAckForwarding"))
    if early_ack is not None and early_ack.lower() != "true":
        imported.unmapped.append(f"EarlyAckForwarding {early_ack!r}: devproxy always forwards ACK/NAK at once")
    for element in root:
        if element.tag not in known:
            imported.unmapped.append(f"{element.tag} {_text(element)!r}: not a setting devproxy knows")
    connections = root.findall("./Connections/Connection")
    if not connections:
        raise ImportFailed(f"{path}: no <Connection> in <Connections>: nothing to import")
    for index, connection in enumerate(connections):
        device = _ecr_connection(connection, imported.unmapped)
        # ECRService serves one register on its port; any further one gets the next port up.
        device["listen"] = [f"0.0.0.0:{int(port) + index}"]
        if index:
            imported.unmapped.append(
                f"Connection Id={connection.get('Id')}: ECRService shares one ListeningPort; "
                f"this device listens on {int(port) + index}"
            )
        imported.settings["device"].append(device)
    try:
        parse(imported.settings, str(path))
    except ConfigError as exc:
        raise ImportFailed(f"the imported settings are not valid:\n{exc}") from None
    return imported


def _ecr_connection(connection: ElementTree.Element, unmapped: list[str]) -> dict[str, Any]:
    ident = connection.get("Id", "0")
    device: dict[str, Any] = {
        "name": f"ecr{ident}" if re.fullmatch(r"[A-Za-z0-9_-]*", ident) else "ecr",
        "protocol": "custom",
        "sharing": "exchange",
    }
    kind, path = (connection.get("Type") or "Serial").lower(), connection.get("Path") or ""
    if kind == "network":
        device["type"], device["path"] = "tcp", path
    else:
        port, _, speed = path.partition(":")
        device["type"], device["path"] = "serial", port
        if speed.isdigit():
            device["baudrate"] = int(speed)
        elif speed:
            unmapped.append(f"Connection Id={ident} Path {path!r}: speed {speed!r} is not a number; 115200 used")
        if WINDOWS_PORT.fullmatch(port):
            unmapped.append(
                f"Connection Id={ident} Path {path!r}: {port} is a Windows port name, kept as it is; "
                "set path to the Linux device (e.g. /dev/ttyUSB0 or /dev/serial/by-id/...)"
            )
    release = (connection.get("ReleasePort") or "false").lower()
    device["release_port"] = release == "true"
    reconnect = connection.get("Reconnect")
    if reconnect is not None:
        try:
            device["reconnect_interval"] = float(reconnect)
        except ValueError:
            unmapped.append(f"Connection Id={ident} Reconnect {reconnect!r}: not a number of seconds; 2 used")
    for name, value in connection.attrib.items():
        if name not in ("Id", "Type", "Path", "ReleasePort", "Reconnect"):
            unmapped.append(f"Connection Id={ident} {name} {value!r}: not a setting devproxy knows")
    return device
