"""`devproxy import`: another gateway's configuration turned into settings.toml, with what could not be mapped."""

from __future__ import annotations

import json
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


CENC_LOG_LEVELS = {
    "TRACE": "TRACE",
    "IN": "TRACE",
    "OUT": "TRACE",
    "CON": "INFO",
    "DIS": "INFO",
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARN": "WARNING",
    "ERROR": "ERROR",
    "FATAL": "CRITICAL",
    "OFF": "CRITICAL",
}
# Direct ports stay below Linux's ephemeral ports, which outgoing connections take.
EPHEMERAL_START = 32768
CENC_UNMAPPED = {
    "CENC:ConnectionLifetimeSeconds": "it times CENC sessions with metering software (devproxy does not speak CENC)",
    "CENC:Device:ServerAuthKey": "CENC's server authentication is not public; devproxy does not take part in it",
    "CENC:Device:CheckIsActiveIntervalSeconds": "devproxy checks every device's silence continuously",
    "CENC:Device:DirectAccess:Enabled": "devproxy always opens a direct port per device",
    "CENC:Device:TimeSync": "devproxy does not set meters' clocks",
    "CENC:Device:TymeSync": "devproxy does not set meters' clocks",
    "CENC:AMR": "devproxy does not speak the CENC protocol to metering software (not public): use the direct ports",
    "DaemonLoggin:StartMinLevel": "devproxy has one log level (log_level, from DeviceMinLevel)",
    "DaemonLoggin:ConfigMinLevel": "devproxy has one log level (log_level, from DeviceMinLevel)",
    "DaemonLoggin:AMRMinLevel": "devproxy has one log level (log_level, from DeviceMinLevel)",
    "DaemonLoggin:ErrorsMinLevel": "devproxy has one log level (log_level, from DeviceMinLevel)",
    "DaemonLoggin:UseConsole": "devproxy always logs to stderr",
    "DaemonLoggin:UseSqlite": "devproxy logs to stderr and log_file, not to SQLite",
    "DaemonLoggin:SqliteConnectionString": "devproxy logs to stderr and log_file, not to SQLite",
    "ConnectionStrings": "devproxy keeps its device registry in SQLite ([dialin] registry)",
}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"A": {"B": 1}} -> {"A:B": 1}, as .NET configuration names its keys."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat.update(_flatten(inner, f"{prefix}:{key}" if prefix else str(key)))
    return flat


def _unmapped_reason(key: str) -> str:
    for prefix, reason in CENC_UNMAPPED.items():
        if key == prefix or key.startswith(prefix + ":"):
            return reason
    return "not a setting devproxy knows"


def import_cencn(path: Path) -> Imported:
    """CENCn's appsettings.json (the keys of its manual's settings table) as a [dialin] table and logging."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise ImportFailed(f"{path}: cannot read CENCn's appsettings.json: {exc}") from None
    if not isinstance(raw, dict):
        raise ImportFailed(f"{path}: not a JSON object of settings")
    flat = _flatten(raw)
    dialin: dict[str, Any] = {"protocol": "raw", "sharing": "session"}
    proxy: dict[str, Any] = {"status": "127.0.0.1:8600"}
    imported = Imported({"proxy": proxy, "dialin": dialin})
    used: set[str] = set()

    def take(key: str, kind: type | tuple[type, ...]) -> Any:
        value = flat.get(key)
        if value is None:
            return None
        used.add(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            imported.unmapped.append(f"{key} = {value!r}: not {getattr(kind, '__name__', kind)}; the default is used")
            return None
        return value

    port = take("CENC:Device:ServerPort", int) or 11001
    extra = flat.get("CENC:Device:AdditionalPorts") or []
    used.add("CENC:Device:AdditionalPorts")
    for index in range(len(extra) if isinstance(extra, list) else 0):
        used.add(f"CENC:Device:AdditionalPorts:{index}")
    additional = [p for p in extra if isinstance(p, int) and not isinstance(p, bool)] if isinstance(extra, list) else []
    dialin["listen"] = [f"0.0.0.0:{p}" for p in [port, *additional]]
    maximum = take("CENC:Device:MaxConnections", int)
    if maximum is not None:
        dialin["max_devices"] = max(1, maximum)
    autoregister = take("CENC:Device:AutoregistrationEnabled", bool)
    if autoregister is not None:
        dialin["autoregister"] = autoregister
    for key, setting in (
        ("CENC:Device:InactiveDisconnectionTimeoutSeconds", "disconnect_after"),
        ("CENC:Device:InactiveToIdleTimeoutSeconds", "idle_after"),
        ("CENC:Device:RegistrationTimeoutSeconds", "identify_timeout"),
    ):
        value = take(key, int)
        if value is not None:
            dialin[setting] = max(1, value)
    ping = take("CENC:Device:InactiveToPingSeconds", int)
    dialin["ping_after"] = 0
    if ping is not None:
        imported.unmapped.append(
            f"CENC:Device:InactiveToPingSeconds = {ping}: CENC's ping packet is not public; "
            f"set ping_bytes to what your modems answer and ping_after = {ping}"
        )
    low = take("CENC:Device:DirectAccess:MinimalPortNumber", int) or 7500
    # CENCn hands out ports upward from the minimum, skipping taken ones; devproxy wants one free range,
    # so it ends below the first port that is taken, or that Linux gives outgoing connections.
    high = min(65535, low + dialin.get("max_devices", 65000) - 1)
    stops = {int(address.rsplit(":", 1)[1]): "a [dialin] listen port" for address in dialin["listen"]}
    stops[8600] = "[proxy] status"
    stops[EPHEMERAL_START] = "the first port Linux gives outgoing connections"
    inside = sorted(port for port in stops if low <= port <= high)
    if inside:
        high = inside[0] - 1
        imported.unmapped.append(
            f"CENC:Device:DirectAccess:MinimalPortNumber = {low}: direct_ports {low}-{high} stop below port "
            f"{inside[0]} ({stops[inside[0]]}); widen the range if you have more devices"
        )
    dialin["direct_ports"] = f"{low}-{high}"
    level = take("DaemonLoggin:DeviceMinLevel", str)
    if level is not None:
        if level.upper() in CENC_LOG_LEVELS:
            proxy["log_level"] = CENC_LOG_LEVELS[level.upper()]
        else:
            imported.unmapped.append(f"DaemonLoggin:DeviceMinLevel = {level!r}: not a CENCn log level")
    use_file = take("DaemonLoggin:UseFile", bool)
    directory = take("DaemonLoggin:LogFileDirectoryPath", str)
    if use_file is not False and directory:
        proxy["log_file"] = f"{directory.rstrip('/')}/devproxy.log"
    size = take("DaemonLoggin:LogFileSizeLimitBytes", int)
    if size is not None:
        proxy["log_rotation"] = f"{max(1, size)} B"
    copies = take("DaemonLoggin:LogFileMaxCopies", int)
    if copies is not None:
        proxy["log_retention"] = max(0, copies)
    for key in sorted(set(flat) - used):
        if key.startswith("CENC:Device:AdditionalPorts"):
            continue
        imported.unmapped.append(f"{key} = {flat[key]!r}: {_unmapped_reason(key)}")
    try:
        parse(imported.settings, str(path))
    except ConfigError as exc:
        raise ImportFailed(f"the imported settings are not valid:\n{exc}") from None
    return imported
