"""settings.toml: frozen attrs classes for every table, and load(), which reports every problem at once."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from proxy.protocols import MAX_MESSAGE, NAMES

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
DEVICE_TYPES = ("serial", "tcp", "simulator")
PROTOCOLS = NAMES
# Protocols with a simulated device (raw has none: it has no protocol to follow).
SIMULATED_PROTOCOLS = PROTOCOLS[1:]
SHARING_MODES = ("session", "exchange")
# busy_reply = "auto": the protocol's own busy answer to the refused request (exchange sharing).
AUTO = "auto"
PARITIES = ("N", "E", "O", "M", "S")
STOPBITS = (1, 1.5, 2)
# dtr and rts: raised, dropped, or as the port's open leaves them.
MODEM_LINE_SETTINGS = ("on", "off", "keep")
# Unicode letters and digits ("касса-1" is a fine name), '-' and '_'.
NAME_PATTERN = re.compile(r"[\w-]+")
# A settings file is a few KB; one far larger is a mistake (or not a settings file at all).
MAX_FILE_SIZE = 1024 * 1024
# raw protocol: the longest max_message allowed (the default is the protocol's MAX_MESSAGE).
MAX_MESSAGE_LIMIT = 16 * 1024 * 1024
# record_max_bytes: the default, and the least (a file smaller than a few records would rotate at each).
RECORD_MAX_BYTES = 10 * 1024 * 1024
RECORD_MIN_BYTES = 4096
# Where a dial-in device's id goes in [dialin] record.
RECORD_ID = "{id}"
SIZE_PATTERN = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)", re.IGNORECASE)


class ConfigError(Exception):
    """settings.toml cannot be used; `problems` lists every reason, each naming its table, key and value."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


@attrs.define(frozen=True)
class Address:
    """A TCP address; port 0 asks the system for any free port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::", "")

    def overlaps(self, other: Address) -> bool:
        """True when both cannot be bound at once (same port, and same host or either a wildcard)."""
        if self.port == 0 or self.port != other.port:
            return False
        return self.host == other.host or self.is_wildcard or other.is_wildcard


@attrs.define(frozen=True)
class Port(Address):
    """A bound client port and what its clients speak: PLAIN bytes, TLS or RFC 2217 (PORT_KINDS)."""

    kind: str = "plain"

    def describe(self) -> str:
        """The address with what it speaks, for people: "127.0.0.1:8443 (TLS)"; a plain port as it is."""
        label = PORT_KINDS[self.kind]
        return f"{self} ({label})" if label else str(self)


# A port's kind -> how a person reads it beside the address ("" for plain bytes).
PORT_KINDS = {"plain": "", "tls": "TLS", "rfc2217": "RFC 2217"}


def parse_address(text: str) -> Address:
    """'HOST:PORT' or '[IPv6]:PORT' -> Address; ValueError says what is wrong."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text)
    if not match:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is not in 0-65535")
    return Address(host, port)


@attrs.define(frozen=True)
class TlsFiles:
    """What a TLS listener serves (PEM files) and whom it lets in: clients with a certificate signed by
    client_ca ("" = no client certificate asked), named in client_names (empty = any of them)."""

    cert: str
    key: str
    client_ca: str = ""
    client_names: tuple[str, ...] = ()


@attrs.define(frozen=True)
class ProxyConfig:
    """The [proxy] table: logging and the status server."""

    log_level: str = "INFO"
    log_file: str = ""
    log_rotation: str = "10 MB"
    log_retention: int = 5
    log_json: bool = False
    status: Address | None = Address("127.0.0.1", 8600)
    status_token: str = ""
    # With status_tls_cert and status_tls_key, the status server speaks only HTTPS (see TlsFiles).
    status_tls_cert: str = ""
    status_tls_key: str = ""
    status_tls_client_ca: str = ""
    status_tls_client_names: tuple[str, ...] = ()
    # Every TLS listener's clients get this long for their handshake.
    tls_handshake_timeout: float = 10.0

    @property
    def status_tls(self) -> TlsFiles | None:
        if not self.status_tls_cert:
            return None
        return TlsFiles(
            self.status_tls_cert, self.status_tls_key, self.status_tls_client_ca, self.status_tls_client_names
        )


@attrs.define(frozen=True)
class DeviceConfig:
    """One [[device]] table: how to reach the device and how clients share it."""

    name: str
    type: str = "serial"
    path: str = ""
    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    protocol: str = "raw"
    listen: tuple[Address, ...] = ()
    sharing: str = "session"
    acquire_timeout: float = 5.0
    busy_reply: bytes | str = b""
    response_timeout: float = 5.0
    exchange_timeout: float = 30.0
    frame_gap: float = 0.05
    reconnect_interval: float = 2.0
    release_port: bool = False
    idle_timeout: float = 0.0
    max_clients: int = 32
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    client_write_timeout: float = 10.0
    max_message: int = MAX_MESSAGE
    # iec61107 on a serial device: sessions start at this rate and follow the option select's.
    iec_signon_baudrate: int = 300
    iec_baud_switch: bool = True
    # Serial line control, applied at open and after every reconnect: flow control, and DTR and RTS
    # ("keep": as the open leaves them). An RFC 2217 client holding the device may change them for its lease.
    rtscts: bool = False
    xonxoff: bool = False
    dtr: str = "keep"
    rts: str = "keep"
    # Client ports that speak Telnet with the COM-PORT-OPTION (RFC 2217); they queue with `listen`'s.
    listen_rfc2217: tuple[Address, ...] = ()
    # type = "simulator": a fault script for the simulated device (proxy.simulators.script), "" = none.
    fault_script: str = ""
    # Wait and exchange histograms of this device's own on /metrics (else it adds to the pooled ones).
    metrics_histograms: bool = True
    # This device's lines below it are dropped; "" = [proxy] log_level.
    log_level: str = ""
    # Every exchange as a JSON line in this file ("" = none), rotated at record_max_bytes, record_keep old
    # files kept; bytes matching record_redact are masked (proxy.recording).
    record: str = ""
    record_max_bytes: int = RECORD_MAX_BYTES
    record_keep: int = 3
    record_redact: tuple[str, ...] = ()
    # Client ports that speak TLS, serving tls_cert and tls_key (see TlsFiles); they queue with `listen`'s.
    listen_tls: tuple[Address, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_client_names: tuple[str, ...] = ()
    # type = "tcp": the device speaks TLS, its certificate checked against tls_ca ("" = the system's CAs);
    # tls_cert and tls_key are then the proxy's client certificate toward it.
    tls: bool = False
    tls_ca: str = ""

    @property
    def server_tls(self) -> TlsFiles | None:
        """What the listen_tls ports serve, or None when the device has none."""
        if not self.listen_tls:
            return None
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_client_names)

    @property
    def switches_baud(self) -> bool:
        """True when the line follows IEC 61107 mode C: sign-on rate, then the agreed one."""
        return self.type == "serial" and self.protocol == "iec61107" and self.iec_baud_switch

    @property
    def line_baudrate(self) -> int:
        """The rate the serial line opens at (and returns to after an IEC session)."""
        return self.iec_signon_baudrate if self.switches_baud else self.baudrate

    def describe(self) -> str:
        """Where the device is, for log lines: the serial path, the TCP peer, or the simulated protocol."""
        if self.type == "simulator":
            return f"simulated {self.protocol} device"
        if self.type == "dialin":
            return f"dial-in device {self.path}"
        return self.path


IDENTIFY_METHODS = ("line", "regex", "fixed", "iec61107")
# direct_ports = "any": each new device gets a free port the system chooses.
ANY_PORT = "any"
# ping_after when ping_bytes are set and ping_after is not: a ping needs both, so giving the bytes alone
# asks for a ping, after the two minutes of silence that were the default before ping_bytes had none.
PING_AFTER_WITH_BYTES = 120.0
# The [[device]] keys that [dialin] takes too, applied to every dial-in device.
DIALIN_SHARING_KEYS = (
    "acquire_timeout",
    "busy_reply",
    "response_timeout",
    "exchange_timeout",
    "frame_gap",
    "idle_timeout",
    "max_clients",
    "allow",
    "client_write_timeout",
    "max_message",
    "log_level",
)


@attrs.define(frozen=True)
class DialinConfig:
    """The [dialin] table: devices with no fixed address that connect in and say who they are."""

    listen: tuple[Address, ...] = (Address("0.0.0.0", 11001),)
    identify: str = "line"
    identify_pattern: str = ""
    identify_length: int = 0
    identify_timeout: float = 30.0
    autoregister: bool = True
    registry: str = "devproxy.sqlite3"
    # With a PostgreSQL registry (several instances): this instance's name ("" = the host name), the host
    # the others reach its direct ports at ("" = the direct ports' host, or the host name for a
    # wildcard), how long a silent instance keeps its claims, and how many registry writes wait in
    # memory while the registry cannot be written.
    instance: str = ""
    advertise: str = ""
    claim_timeout: float = 30.0
    max_pending_writes: int = 100_000
    # A range, or None: "any", a free port chosen by the system at registration (kept across restarts
    # while it stays free).
    direct_ports: tuple[int, int] | None = (7500, 7999)
    protocol: str = "raw"
    sharing: str = "session"
    idle_after: float = 60.0
    disconnect_after: float = 3600.0
    # No ping unless ping_bytes are given; see PING_AFTER_WITH_BYTES.
    ping_after: float = 0.0
    ping_bytes: bytes = b""
    max_devices: int = 65000
    acquire_timeout: float = 5.0
    busy_reply: bytes | str = b""
    response_timeout: float = 5.0
    exchange_timeout: float = 30.0
    frame_gap: float = 0.05
    idle_timeout: float = 0.0
    max_clients: int = 32
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    client_write_timeout: float = 10.0
    max_message: int = MAX_MESSAGE
    # Off: every dial-in device adds its waits and exchanges to one pooled histogram, which keeps
    # /metrics small for thousands of devices.
    metrics_histograms: bool = False
    # Every dial-in device's lines below it are dropped; "" = [proxy] log_level.
    log_level: str = ""
    # Each dial-in device records its exchanges in this file, "{id}" replaced by its id ("" = none).
    record: str = ""
    record_max_bytes: int = RECORD_MAX_BYTES
    record_keep: int = 3
    record_redact: tuple[str, ...] = ()
    # Dial-in ports that speak TLS, serving tls_cert and tls_key to the devices; tls_client_ca and
    # tls_client_names say which devices may connect (see TlsFiles).
    listen_tls: tuple[Address, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_client_names: tuple[str, ...] = ()
    # Direct ports speak TLS too, with tls_cert and tls_key; their clients (metering software, not
    # modems) are let in by a CA and names of their own.
    direct_tls: bool = False
    direct_tls_client_ca: str = ""
    direct_tls_client_names: tuple[str, ...] = ()
    # Direct ports speak RFC 2217 instead of plain bytes (a dial-in device's line cannot be changed, but
    # a virtual COM port driver can reach it).
    direct_rfc2217: bool = False

    @property
    def direct_host(self) -> str:
        """Direct ports listen on the host of the first dial-in address."""
        first = self.listen or self.listen_tls
        return first[0].host if first else "0.0.0.0"

    @property
    def dialin_tls(self) -> TlsFiles | None:
        """What the listen_tls ports serve to devices, or None when there are none."""
        if not self.listen_tls:
            return None
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_client_names)

    def _direct_port(self, port: int) -> dict[str, Any]:
        """A direct port's [[device]] keys: a plain listen port, or a TLS one (direct_tls)."""
        address = (Address(self.direct_host, port),)
        if self.direct_rfc2217:
            return {"listen": (), "listen_rfc2217": address}
        if not self.direct_tls:
            return {"listen": address}
        return {
            "listen_tls": address,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "tls_client_ca": self.direct_tls_client_ca,
            "tls_client_names": self.direct_tls_client_names,
        }

    def device_config(self, device_id: str, name: str, port: int) -> DeviceConfig:
        """The [[device]] settings of one registered dial-in device."""
        shared = {key: getattr(self, key) for key in DIALIN_SHARING_KEYS}
        return DeviceConfig(
            name=name,
            type="dialin",
            path=device_id,
            protocol=self.protocol,
            sharing=self.sharing,
            reconnect_interval=0.0,
            metrics_histograms=self.metrics_histograms,
            record=recording_path(self.record, device_id),
            record_max_bytes=self.record_max_bytes,
            record_keep=self.record_keep,
            record_redact=self.record_redact,
            **self._direct_port(port),
            **shared,
        )


def recording_path(template: str, device_id: str) -> str:
    """[dialin] record for one device: "{id}" replaced by its id, quoted so that it stays one file name
    ('/' and a name of dots are escaped)."""
    if not template:
        return ""
    quoted = urllib.parse.quote(device_id, safe="")
    if quoted.strip(".") == "":
        quoted = quoted.replace(".", "%2E")
    return template.replace(RECORD_ID, quoted)


@attrs.define(frozen=True)
class Settings:
    """The whole settings.toml."""

    proxy: ProxyConfig = ProxyConfig()
    devices: tuple[DeviceConfig, ...] = ()
    source: str = "<defaults>"
    dialin: DialinConfig | None = None

    def listener_ports(self) -> dict[int, str]:
        """The TCP ports the proxy listens on for clients, dial-in devices and the status page, with what
        each serves: a dial-in device's direct port must be none of them."""
        ports = {address.port: "[proxy] status" for address in (self.proxy.status,) if address is not None}
        for address in self.dialin.listen if self.dialin is not None else ():
            ports[address.port] = "[dialin] listen"
        for address in self.dialin.listen_tls if self.dialin is not None else ():
            ports[address.port] = "[dialin] listen_tls"
        for device in self.devices:
            for address in device.listen + device.listen_tls + device.listen_rfc2217:
                ports[address.port] = f"device {device.name!r}"
        return ports


class _Problems:
    """Collects the problems of one table so that load() reports them all at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


class _Table:
    """Reads typed keys out of one TOML table, recording every problem under the table's name."""

    def __init__(self, where: str, raw: dict[str, Any], problems: _Problems) -> None:
        self.where = where
        self.raw = raw
        self.problems = problems
        self.values: dict[str, Any] = {}

    def fail(self, key: str, message: str) -> None:
        self.problems.add(self.where, f"{key} {message}")

    def take(self, key: str, check: Callable[[Any], bool], expected: str, convert=lambda v: v) -> None:
        if key not in self.raw:
            return
        value = self.raw[key]
        if not check(value):
            self.fail(key, f"{value!r} is {_kind(value)}, expected {expected}")
            return
        try:
            self.values[key] = convert(value)
        except ValueError as exc:
            self.fail(key, str(exc))

    def string(self, key: str, choices: Iterable[str] | None = None) -> None:
        def convert(value: str) -> str:
            if choices is not None and value not in choices:
                raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
            return value

        self.take(key, lambda v: isinstance(v, str), "a string", convert)

    def boolean(self, key: str) -> None:
        self.take(key, lambda v: isinstance(v, bool), "true or false")

    def integer(self, key: str, minimum: int, maximum: int | None = None) -> None:
        def convert(value: int) -> int:
            if value < minimum or (maximum is not None and value > maximum):
                bound = f"in {minimum}-{maximum}" if maximum is not None else f">= {minimum}"
                raise ValueError(f"{value} is not {bound}")
            return value

        self.take(key, _is_int, "an integer", convert)

    def seconds(self, key: str, *, positive: bool) -> None:
        def convert(value: float) -> float:
            if not math.isfinite(value):
                raise ValueError(f"{value} is not a number of seconds: give a finite number such as 5.0")
            if value < 0 or (positive and value == 0):
                raise ValueError(f"{value} must be {'> 0' if positive else '>= 0'} seconds")
            return float(value)

        self.take(key, lambda v: _is_int(v) or isinstance(v, float), "a number of seconds", convert)

    def unknown_keys(self, known: Iterable[str]) -> None:
        for key in sorted(set(self.raw) - set(known)):
            hint = _MISPLACED.get((self.where.split(" ")[0], key), "")
            self.problems.add(self.where, f"unknown key {key!r} = {self.raw[key]!r}" + (f" ({hint})" if hint else ""))


_LINE_KEYS_IN_DIALIN = "a dial-in device's line is its modem's and cannot be set; this is a serial [[device]]'s key"
_STATUS_TLS_IN = "the status server's TLS keys are status_tls_cert, status_tls_key, status_tls_client_ca and ..._names"
# Keys of one table given in another, by (the table as a problem names it, key): what the operator meant.
_MISPLACED = {
    ("[dialin]", "listen_rfc2217"): "direct ports speak RFC 2217 with direct_rfc2217 = true",
    **{("[dialin]", key): _LINE_KEYS_IN_DIALIN for key in ("rtscts", "xonxoff", "dtr", "rts")},
    **{("[proxy]", key): _STATUS_TLS_IN for key in ("tls_cert", "tls_key", "tls_client_ca", "tls_client_names")},
    **{("device", key): "a [proxy] key" for key in ("status_tls_cert", "status_tls_key", "tls_handshake_timeout")},
    **{("device", key): "a [dialin] key" for key in ("direct_tls", "direct_rfc2217", "direct_ports")},
}


def _parse_hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f'{text!r} is not hex bytes (e.g. "15" or "01 02 0a")') from None


def _parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'{text!r} is not a network in CIDR form (e.g. "192.168.1.0/24")') from None


def _list_of(convert: Callable[[str], Any]) -> Callable[[list], tuple]:
    def convert_all(values: list) -> tuple:
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{values!r} must be a list of strings")
        return tuple(convert(v) for v in values)

    return convert_all


def _proxy_table(raw: dict[str, Any], problems: _Problems) -> ProxyConfig:
    table = _Table("[proxy]", raw, problems)
    table.unknown_keys(attrs.fields_dict(ProxyConfig))
    table.string("log_level", LOG_LEVELS)
    table.take("log_file", lambda v: isinstance(v, str), "a string", _check_log_file)
    table.take("log_rotation", lambda v: isinstance(v, str), "a string", _check_rotation)
    table.integer("log_retention", 0)
    table.boolean("log_json")
    table.take("status", lambda v: isinstance(v, str), "a string", lambda v: parse_address(v) if v else None)
    table.string("status_token")
    _tls_keys(table, "status_")
    table.seconds("tls_handshake_timeout", positive=True)
    config = ProxyConfig(**table.values)
    _check_server_tls(table, config.status_tls, "status_", config.status is not None, "status")
    return config


def _check_log_file(value: str) -> str:
    """A file the proxy can create or append to (missing directories are created), not a directory."""
    if not value:
        return value
    try:
        return _check_log_path(value)
    except OSError as exc:
        raise ValueError(f"{value[:80]!r} cannot be a file: {exc.strerror or exc}") from None


def _check_log_path(value: str) -> str:
    path = Path(value)
    if path.is_dir():
        raise ValueError(f"{value!r} is a directory; give a file in it, e.g. {str(path / 'devproxy.log')!r}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{value!r} cannot be written by this user")
        return value
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{value!r} cannot be created: {str(ancestor)!r} is not a directory this user can write")
    return value


def _check_rotation(value: str) -> str:
    if not SIZE_PATTERN.fullmatch(value.strip()):
        raise ValueError(f'{value!r} is not a size such as "10 MB"')
    return value


def _device_table(index: int, raw: dict[str, Any], problems: _Problems) -> DeviceConfig | None:
    name = raw.get("name")
    where = f"device {name!r}" if isinstance(name, str) and name else f"[[device]] #{index + 1}"
    table = _Table(where, raw, problems)
    table.unknown_keys(attrs.fields_dict(DeviceConfig))
    if "name" not in raw:
        table.fail("name", "is missing")
    table.take("name", lambda v: isinstance(v, str), "a string", _check_name)
    table.string("type", DEVICE_TYPES)
    table.string("path")
    table.integer("baudrate", 1)
    table.integer("bytesize", 5, 8)
    table.string("parity", PARITIES)
    table.take("stopbits", lambda v: _is_number(v) and v in STOPBITS, "1, 1.5 or 2", float)
    table.string("protocol", PROTOCOLS)
    table.take("listen", lambda v: isinstance(v, list), 'a list of "HOST:PORT"', _list_of(parse_address))
    table.string("sharing", SHARING_MODES)
    table.seconds("acquire_timeout", positive=False)
    table.take("busy_reply", lambda v: isinstance(v, str), "hex bytes", _parse_busy_reply)
    table.seconds("response_timeout", positive=True)
    table.seconds("exchange_timeout", positive=True)
    table.seconds("frame_gap", positive=True)
    table.seconds("reconnect_interval", positive=False)
    table.boolean("release_port")
    table.seconds("idle_timeout", positive=False)
    table.integer("max_clients", 1)
    table.take("allow", lambda v: isinstance(v, list), "a list of networks", _list_of(_parse_network))
    table.seconds("client_write_timeout", positive=True)
    table.integer("max_message", 1, MAX_MESSAGE_LIMIT)
    table.integer("iec_signon_baudrate", 1)
    table.boolean("iec_baud_switch")
    table.boolean("rtscts")
    table.boolean("xonxoff")
    table.string("dtr", MODEM_LINE_SETTINGS)
    table.string("rts", MODEM_LINE_SETTINGS)
    table.take("listen_rfc2217", lambda v: isinstance(v, list), 'a list of "HOST:PORT"', _list_of(parse_address))
    table.take("fault_script", lambda v: isinstance(v, str), "a file path")
    table.boolean("metrics_histograms")
    table.string("log_level", LOG_LEVELS)
    _take_record_keys(table, "a file path", _check_log_file)
    table.take("listen_tls", lambda v: isinstance(v, list), 'a list of "HOST:PORT"', _list_of(parse_address))
    _tls_keys(table)
    table.boolean("tls")
    table.take("tls_ca", lambda v: isinstance(v, str), "a file path")
    config = DeviceConfig(**{"name": "", **table.values})
    _check_device(table, config)
    return config if config.name else None


def _check_name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} may hold only letters, digits, '-' and '_' (no spaces or other signs)")
    return value


def _check_redaction(value: str) -> str:
    from proxy.recording import compile_redaction

    compile_redaction(value)  # RedactError is a ValueError: reported with the table and key
    return value


def _parse_busy_reply(value: str) -> bytes | str:
    return AUTO if value == AUTO else _parse_hex(value)


def _check_device(table: _Table, config: DeviceConfig) -> None:
    """Checks that need several keys of one device."""
    raw = table.raw
    if config.type in ("serial", "tcp") and "path" not in raw:
        table.fail("path", f"is missing (a {config.type} device needs one)")
    if config.type in ("serial", "tcp") and "path" in raw and not config.path:
        example = "/dev/ttyUSB0" if config.type == "serial" else "192.168.0.89:9100"
        table.fail("path", f"is empty (a {config.type} device needs one, e.g. {example})")
    if config.type == "tcp" and config.path:
        try:
            address = parse_address(config.path)
        except ValueError as exc:
            table.fail("path", str(exc))
        else:
            if address.port == 0:
                table.fail("path", f"{config.path!r}: a device's port cannot be 0")
    # raw, the default protocol, has nothing to simulate: a simulator's table must name its protocol (an
    # unknown one is reported by its own check).
    if config.type == "simulator" and "protocol" not in raw:
        table.fail("protocol", f"is missing (a simulator plays one of {', '.join(SIMULATED_PROTOCOLS)})")
    elif config.type == "simulator" and raw["protocol"] in PROTOCOLS and raw["protocol"] not in SIMULATED_PROTOCOLS:
        table.fail("protocol", f"{config.protocol!r} has no simulator (simulated: {', '.join(SIMULATED_PROTOCOLS)})")
    if config.fault_script and config.type != "simulator":
        table.fail("fault_script", 'is for type = "simulator" devices')
    elif config.fault_script and config.protocol in SIMULATED_PROTOCOLS:
        _check_fault_script(table, config)
    if "listen" in table.values and not config.listen and not config.listen_tls and not config.listen_rfc2217:
        table.fail("listen", "is empty: no client could reach this device")
    elif "listen" not in raw and "listen_tls" not in raw and "listen_rfc2217" not in raw:
        table.fail("listen", "is missing: no client could reach this device")
    if config.busy_reply == AUTO and config.sharing != "exchange":
        table.fail("busy_reply", "'auto' answers a refused request, so it needs sharing = 'exchange'")
    _check_record_keys(table, raw, config.record)
    _check_device_tls(table, config)
    _check_line_control(table, config)


def _check_line_control(table: _Table, config: DeviceConfig) -> None:
    """The line control keys are for a local serial port: elsewhere they would silently do nothing."""
    if config.type != "serial":
        for key in ("rtscts", "xonxoff", "dtr", "rts"):
            if key in table.raw:
                table.fail(key, f'= {table.raw[key]!r} is for type = "serial" devices, not {config.type!r}')


def _take_record_keys(table: _Table, expected: str, check_record: Callable[[str], str]) -> None:
    """record (its file, checked by `check_record`), record_max_bytes, record_keep and record_redact."""
    table.take("record", lambda v: isinstance(v, str), expected, check_record)
    table.integer("record_max_bytes", RECORD_MIN_BYTES)
    table.integer("record_keep", 0, 1000)
    table.take("record_redact", lambda v: isinstance(v, list), "a list of patterns", _list_of(_check_redaction))


def _check_record_keys(table: _Table, raw: dict[str, Any], record: str) -> None:
    if not record:
        for key in ("record_max_bytes", "record_keep", "record_redact"):
            if key in raw:
                table.fail(key, f"= {raw[key]!r} has no effect: record (the file) is not set")


def _dialin_table(raw: dict[str, Any], problems: _Problems) -> DialinConfig:
    table = _Table("[dialin]", raw, problems)
    table.unknown_keys(attrs.fields_dict(DialinConfig))
    table.take("listen", lambda v: isinstance(v, list), 'a list of "HOST:PORT"', _list_of(parse_address))
    table.string("identify", IDENTIFY_METHODS)
    table.take("identify_pattern", lambda v: isinstance(v, str), "a regular expression", _check_pattern)
    table.integer("identify_length", 0, 1024)
    table.seconds("identify_timeout", positive=True)
    table.boolean("autoregister")
    table.take(
        "registry", lambda v: isinstance(v, str) and v != "", "a file path or a postgresql:// URL", _check_registry
    )
    table.take("instance", lambda v: isinstance(v, str), "a name", _check_instance)
    table.take("advertise", lambda v: isinstance(v, str), "a host name or address", _check_advertise)
    table.seconds("claim_timeout", positive=True)
    table.integer("max_pending_writes", 1)
    table.take("direct_ports", lambda v: isinstance(v, str), 'a range such as "7500-7999", or "any"', _parse_port_range)
    table.string("protocol", PROTOCOLS)
    table.string("sharing", SHARING_MODES)
    table.seconds("idle_after", positive=True)
    table.seconds("disconnect_after", positive=True)
    table.seconds("ping_after", positive=False)
    table.take("ping_bytes", lambda v: isinstance(v, str), "hex bytes", _parse_hex)
    table.integer("max_devices", 1)
    table.seconds("acquire_timeout", positive=False)
    table.take("busy_reply", lambda v: isinstance(v, str), "hex bytes", _parse_busy_reply)
    table.seconds("response_timeout", positive=True)
    table.seconds("exchange_timeout", positive=True)
    table.seconds("frame_gap", positive=True)
    table.seconds("idle_timeout", positive=False)
    table.integer("max_clients", 1)
    table.take("allow", lambda v: isinstance(v, list), "a list of networks", _list_of(_parse_network))
    table.seconds("client_write_timeout", positive=True)
    table.integer("max_message", 1, MAX_MESSAGE_LIMIT)
    table.boolean("metrics_histograms")
    table.string("log_level", LOG_LEVELS)
    _take_record_keys(table, 'a file path with "{id}"', _check_recording_template)
    table.take("listen_tls", lambda v: isinstance(v, list), 'a list of "HOST:PORT"', _list_of(parse_address))
    _tls_keys(table)
    table.boolean("direct_tls")
    table.take("direct_tls_client_ca", lambda v: isinstance(v, str), "a file path")
    table.take("direct_tls_client_names", lambda v: isinstance(v, list), "a list of names", _list_of(str))
    table.boolean("direct_rfc2217")
    if table.values.get("direct_rfc2217") and table.values.get("direct_tls"):
        table.fail("direct_rfc2217", "cannot be used with direct_tls = true: a direct port speaks one or the other")
    if "ping_after" not in table.values and table.values.get("ping_bytes"):
        table.values["ping_after"] = PING_AFTER_WITH_BYTES
    if "listen_tls" in raw and "listen" not in raw:
        # TLS ports alone: the default plain port would let devices in around them.
        table.values["listen"] = ()
    config = DialinConfig(**table.values)
    if not config.listen and not config.listen_tls:
        table.fail("listen", "is empty: no device could connect")
    _check_dialin_tls(table, config)
    if config.identify == "regex" and not raw.get("identify_pattern"):
        table.fail("identify_pattern", "is missing: identify = 'regex' needs a pattern with a group for the id")
    if config.identify == "fixed" and config.identify_length == 0:
        table.fail("identify_length", "is 0: identify = 'fixed' needs the number of bytes that form the id")
    if config.ping_after and not config.ping_bytes:
        table.fail("ping_bytes", f"is empty but ping_after = {config.ping_after:g}; set ping_after = 0 for no ping")
    if config.busy_reply == AUTO and config.sharing != "exchange":
        table.fail("busy_reply", "'auto' answers a refused request, so it needs sharing = 'exchange'")
    _check_record_keys(table, raw, config.record)
    return config


def _check_recording_template(value: str) -> str:
    """A [dialin] record template: one file per device, so "{id}" in its file name."""
    if value and RECORD_ID not in Path(value).name:
        raise ValueError(f'{value!r} has no "{RECORD_ID}" in its file name: every device would write one file')
    _check_log_file(value.replace(RECORD_ID, "id"))
    return value


def _tls_keys(table: _Table, prefix: str = "") -> None:
    """The four keys of a TLS listener (TlsFiles), named with `prefix` ("status_" in [proxy])."""
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        table.take(prefix + key, lambda v: isinstance(v, str), "a file path")
    table.take(prefix + "tls_client_names", lambda v: isinstance(v, list), "a list of names", _list_of(str))


def _check_server_tls(table: _Table, files: TlsFiles | None, prefix: str, serving: bool, ports: str) -> None:
    """A TLS listener's keys fit together and its files load; `serving`: the table has TLS ports
    (named `ports`) for them. Keys that would do nothing are errors, not silently ignored."""
    raw, cert, key = table.raw, f"{prefix}tls_cert", f"{prefix}tls_key"
    if files is None or not serving:
        for name in (cert, key, f"{prefix}tls_client_ca", f"{prefix}tls_client_names"):
            if raw.get(name):
                table.fail(name, f"= {raw[name]!r} has no effect: {ports} is not set")
        return
    _check_tls_files(table, files, prefix, cert, key)


def _check_tls_files(table: _Table, files: TlsFiles, prefix: str, cert: str, key: str) -> None:
    from proxy.tls import TlsError, server_context

    if not files.cert or not files.key:
        table.fail(cert if not files.cert else key, "is missing: a TLS port needs a certificate and its key")
        return
    if files.client_names and not files.client_ca:
        names, ca = f"{prefix}tls_client_names", f"{prefix}tls_client_ca"
        table.fail(names, f"needs {ca}: only the names of a certificate it verified count")
        return
    try:
        server_context(files, 1.0)
    except TlsError as exc:
        by_file = {files.key: key, files.client_ca: f"{prefix}tls_client_ca"}
        table.fail(by_file.get(exc.path, cert) if exc.path else cert, f"does not load: {exc}")


def _check_device_tls(table: _Table, config: DeviceConfig) -> None:
    """listen_tls's keys, or (type = "tcp", tls = true) the TLS toward the device."""
    from proxy.tls import TlsError, client_context

    raw = table.raw
    if config.tls and config.type != "tcp":
        table.fail("tls", 'is for type = "tcp" devices (a TLS-terminating gateway)')
    if not config.tls:
        if raw.get("tls_ca"):
            table.fail("tls_ca", f"= {raw['tls_ca']!r} has no effect: tls is not true")
        _check_server_tls(table, config.server_tls, "", bool(config.listen_tls), "listen_tls")
        return
    if config.listen_tls:
        table.fail(
            "listen_tls",
            "cannot be used on a device with tls = true: its tls_cert and tls_key are the proxy's client "
            "certificate toward the device",
        )
    for name in ("tls_client_ca", "tls_client_names"):
        if raw.get(name):
            table.fail(name, f"= {raw[name]!r} has no effect: listen_tls is not set")
    if bool(config.tls_cert) != bool(config.tls_key):
        table.fail("tls_key" if config.tls_cert else "tls_cert", "is missing: a client certificate needs both")
        return
    for key, files in (("tls_ca", (config.tls_ca,)), ("tls_cert", ("", config.tls_cert, config.tls_key))):
        try:
            client_context(*files)
        except TlsError as exc:
            table.fail(key, f"does not load: {exc}")


def _check_dialin_tls(table: _Table, config: DialinConfig) -> None:
    """listen_tls's keys, and direct_tls's, which serve the same certificate to other clients."""
    raw = table.raw
    _check_server_tls(table, config.dialin_tls, "", bool(config.listen_tls), "listen_tls")
    if not config.direct_tls:
        for name in ("direct_tls_client_ca", "direct_tls_client_names"):
            if raw.get(name):
                table.fail(name, f"= {raw[name]!r} has no effect: direct_tls is not true")
        return
    if config.listen_tls and not (config.tls_cert and config.tls_key):
        return  # the missing key is reported already
    direct = TlsFiles(config.tls_cert, config.tls_key, config.direct_tls_client_ca, config.direct_tls_client_names)
    _check_tls_files(table, direct, "direct_", "tls_cert", "tls_key")


def _check_registry(value: str) -> str:
    """A SQLite file path, or a postgresql:// URL that can be taken apart (its password never shown)."""
    if value.startswith(("postgresql://", "postgres://")):
        try:
            urllib.parse.urlsplit(value)
        except ValueError as exc:
            hidden = re.sub(r"//.*@", "//***@", value)
            raise ValueError(f"{hidden!r} is not a postgresql:// URL ({exc})") from None
    return value


def _check_instance(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
        raise ValueError(f"{value!r} is not an instance name (letters, digits, '.', '-', '_'; at most 63)")
    return value


def _check_advertise(value: str) -> str:
    if not value:
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", value):
            raise ValueError(
                f"{value!r} is not a host name or IP address (with no port: the direct ports keep their numbers)"
            ) from None
    return value


def _check_pattern(value: str) -> str:
    try:
        compiled = re.compile(value.encode("latin-1"))
    except (re.error, UnicodeEncodeError) as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
    if value and compiled.groups < 1:
        raise ValueError(f"{value!r} has no group: group 1 must capture the device id")
    return value


def _parse_port_range(value: str) -> tuple[int, int] | None:
    if value.strip() == ANY_PORT:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)) <= 65535:
        raise ValueError(f'{value!r} is not a port range such as "7500-7999", or "any"')
    return int(match.group(1)), int(match.group(2))


def _check_fault_script(table: _Table, config: DeviceConfig) -> None:
    """The script loads and fits the protocol; its problem is reported under fault_script."""
    from proxy.simulators.script import ScriptError, load_script

    try:
        load_script(config.fault_script).check(config.protocol)
    except ScriptError as exc:
        table.fail("fault_script", str(exc))


def _check_clashes(settings: Settings, problems: _Problems) -> None:
    """Names and listening addresses must be unique across the whole file."""
    seen_names: set[str] = set()
    bound: list[tuple[str, Address]] = []
    if settings.proxy.status is not None:
        bound.append(("[proxy] status", settings.proxy.status))
    dialin = settings.dialin
    if dialin is not None:
        for key, address in _keyed(("listen", dialin.listen), ("listen_tls", dialin.listen_tls)):
            for owner, other in bound:
                if address.overlaps(other):
                    problems.add("[dialin]", f"{key} {str(address)!r} clashes with {str(other)!r} of {owner}")
            bound.append((f"[dialin] {key}", address))
        if dialin.direct_ports is not None:
            low, high = dialin.direct_ports
            for owner, other in list(bound):
                if low <= other.port <= high:
                    problems.add("[dialin]", f"direct_ports {low}-{high} holds port {other.port} of {owner}")
    for device in settings.devices:
        where = f"device {device.name!r}"
        if device.name in seen_names:
            problems.add(where, f"name {device.name!r} is used by another device")
        seen_names.add(device.name)
        listeners = (
            ("listen", device.listen),
            ("listen_tls", device.listen_tls),
            ("listen_rfc2217", device.listen_rfc2217),
        )
        for key, address in _keyed(*listeners):
            for owner, other in bound:
                if address.overlaps(other):
                    problems.add(where, f"{key} {str(address)!r} clashes with {str(other)!r} of {owner}")
            ports = dialin.direct_ports if dialin is not None else None
            if ports is not None and ports[0] <= address.port <= ports[1]:
                problems.add(where, f"{key} {str(address)!r} is in [dialin] direct_ports")
            bound.append((f"{where} {key}", address))


def _keyed(*keys: tuple[str, tuple[Address, ...]]) -> list[tuple[str, Address]]:
    """(key, address) for every address of every listening key given as (key, addresses)."""
    return [(key, address) for key, addresses in keys for address in addresses]


def parse(raw: dict[str, Any], source: str = "<string>") -> Settings:
    """Turns a decoded TOML document into Settings, or raises ConfigError with every problem found."""
    problems = _Problems()
    for key in sorted(set(raw) - {"proxy", "device", "dialin"}):
        problems.add(source, f"unknown table or key [{key}]")
    dialin = None
    if "dialin" in raw:
        if isinstance(raw["dialin"], dict):
            dialin = _dialin_table(raw["dialin"], problems)
        else:
            problems.add("[dialin]", "must be a table")
    proxy_raw = raw.get("proxy", {})
    proxy = ProxyConfig()
    if isinstance(proxy_raw, dict):
        proxy = _proxy_table(proxy_raw, problems)
    else:
        problems.add("[proxy]", "must be a table")
    devices: list[DeviceConfig] = []
    device_raw = raw.get("device", [])
    if not isinstance(device_raw, list) or not all(isinstance(d, dict) for d in device_raw):
        problems.add("[[device]]", "must be an array of tables ([[device]] ... )")
    else:
        for index, table in enumerate(device_raw):
            device = _device_table(index, table, problems)
            if device is not None:
                devices.append(device)
    settings = Settings(proxy, tuple(devices), source, dialin)
    _check_clashes(settings, problems)
    if problems.items:
        raise ConfigError(source, problems.items)
    return settings


def load(path: str | Path) -> Settings:
    """Reads and validates settings.toml; ConfigError lists every problem, including an unreadable file.

    Only a regular file of at most MAX_FILE_SIZE is read: a FIFO or a device would block or never end.
    """
    source = str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(source, ["is not a regular file"])
        if info.st_size > MAX_FILE_SIZE:
            raise ConfigError(source, [f"is {info.st_size} bytes; a settings file is at most {MAX_FILE_SIZE}"])
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"is not UTF-8 text: {exc}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"is not valid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError(source, ["is not valid TOML: arrays or tables nested too deeply"]) from None
    return parse(raw, source)
