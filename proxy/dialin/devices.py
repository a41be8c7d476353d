"""`devproxy devices`: the registry of dial-in devices from the command line, and CE NetConnection imports."""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from proxy.dialin.identify import ID_RULE, is_device_id, shown
from proxy.dialin.postgres import PostgresRegistry
from proxy.dialin.registry import Record, Registry, RegistryError

# The columns of a CE NetConnection 4.x device export that devproxy uses, found by the header row's
# names in the Russian or the English interface, in any case.
SERIAL, KIND, ADDRESS, PORT = "serial", "kind", "address", "port"
HEADERS = {
    SERIAL: ("серийный номер", "serial number", "serial"),
    KIND: ("тип устройства", "device type", "type"),
    ADDRESS: ("системный адрес", "system address", "address"),
    PORT: ("tcp порт", "tcp port", "port"),
}
# An export larger than this is no device list: refused before it is read.
MAX_EXPORT_BYTES = 64 * 1024 * 1024


class ImportFailed(Exception):
    """The export cannot be read at all; the message says why."""


def state(record: Record) -> str:
    """online while the last connect is later than the last disconnect."""
    if record.last_connect and (record.last_disconnect is None or record.last_connect > record.last_disconnect):
        return "online"
    return "offline"


def holders(registry: Registry | PostgresRegistry) -> dict[str, str] | None:
    """{id: instance} of the devices a live instance holds, with a shared registry; None with SQLite."""
    return registry.holders() if isinstance(registry, PostgresRegistry) else None


def as_row(record: Record, holders: dict[str, str] | None = None) -> dict[str, object]:
    """A device for `devices list`; with a shared registry (`holders` given), the instance holding it."""
    held = {} if holders is None else {"holder": holders.get(record.id)}
    return {
        "id": record.id,
        "state": state(record),
        **held,
        "port": record.direct_port,
        "name": record.name,
        "note": record.note,
        "last_seen": record.last_seen,
        "peer": record.last_peer,
        "bytes_to_device": record.bytes_to_device,
        "bytes_from_device": record.bytes_from_device,
    }


def table(records: list[Record], holders: dict[str, str] | None = None) -> str:
    rows = [["ID", "NAME", "STATE", "PORT", "LAST SEEN", "PEER", "TO DEVICE", "FROM DEVICE"]]
    keys: tuple[str, ...] = ("id", "name", "state", "port", "last_seen", "peer", "bytes_to_device", "bytes_from_device")
    if holders is not None:
        rows[0].insert(3, "HOLDER")
        keys = (*keys[:3], "holder", *keys[3:])
    for record in records:
        row = as_row(record, holders)
        rows.append([_printable(str(row[key])) if row[key] not in (None, "") else "-" for key in keys])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _printable(text: str) -> str:
    """`text` with control and other unprintable characters escaped (\\x1b, \\t...), for a terminal: a
    registry written before ids were checked may hold them."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _read(path: Path) -> bytes:
    """The bytes of the export: a regular file of at most MAX_EXPORT_BYTES, else ImportFailed.

    Opened without blocking and checked before reading, so /dev/zero or a FIFO is refused rather than
    read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ImportFailed(f"{path}: cannot open it: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImportFailed(f"{path}: not a regular file (an export is a .csv or .xlsx file)")
    with os.fdopen(fd, "rb") as file:
        if info.st_size > MAX_EXPORT_BYTES:
            raise ImportFailed(f"{path}: {info.st_size} bytes is too large for an export (at most {MAX_EXPORT_BYTES})")
        try:
            data = file.read(MAX_EXPORT_BYTES + 1)
        except OSError as exc:
            raise ImportFailed(f"{path}: cannot read it: {exc.strerror}") from None
    if len(data) > MAX_EXPORT_BYTES:  # it grew since
        raise ImportFailed(f"{path}: too large for an export (at most {MAX_EXPORT_BYTES} bytes)")
    return data


def _csv_lines(path: Path, text: str) -> list[list[str]]:
    """The rows of a CSV export, its delimiter (comma, semicolon or tab) found from the header."""
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
            text.splitlines()[0] if text else ",", delimiters=",;\t"
        )
    except csv.Error:  # a header of one column has no delimiter to find
        dialect = csv.excel
    lines: list[list[str]] = []
    try:
        for row in csv.reader(io.StringIO(text), dialect):
            lines.append([cell.strip() for cell in row])
    except csv.Error as exc:  # a field over csv.field_size_limit(), say
        raise ImportFailed(f"{path}: row {len(lines) + 1}: {exc}") from None
    return lines


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row by header name) of a CSV or XLSX export; the first row is the header."""
    data = _read(path)
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook

        try:
            sheet = load_workbook(io.BytesIO(data), read_only=True, data_only=True).active
            lines = [
                ["" if cell is None else str(cell).strip() for cell in row] for row in sheet.iter_rows(values_only=True)
            ]
        except Exception as exc:  # openpyxl raises many kinds for a broken file
            raise ImportFailed(f"{path}: not a readable XLSX file: {exc}") from None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ImportFailed(f"{path}: cannot read it as UTF-8 text: {exc}") from None
        lines = _csv_lines(path, text)
    if not lines:
        raise ImportFailed(f"{path}: the file is empty")
    columns = _columns(path, lines[0])
    for number, line in enumerate(lines[1:], start=2):
        if any(line):
            yield number, {field: line[index] if index < len(line) else "" for field, index in columns.items()}


def _columns(path: Path, header: list[str]) -> dict[str, int]:
    """Where each field is in the header; ImportFailed when the serial number has no column."""
    names = [name.casefold() for name in header]
    columns = {}
    for field, aliases in HEADERS.items():
        # The most specific name first: a header with both "Serial Number" and "Serial" means the former.
        found = [alias for alias in aliases if alias in names]
        if found:
            columns[field] = names.index(found[0])
    if SERIAL not in columns:
        wanted = " or ".join(repr(alias) for alias in HEADERS[SERIAL][:2])
        raise ImportFailed(f"{path}: the header has no column {wanted} (it has: {', '.join(header)})")
    return columns


def add(registry: Registry, device_id: str, port: int | None, listeners: dict[int, str], **fields: str) -> Record:
    """Registers a device for `devices add` and imports: on `port`, or the lowest free one of the range.

    Error handling: RegistryError for an ID identification would never register (identify.is_device_id),
    a port the proxy listens on (Settings.listener_ports()), outside direct_ports or another device's,
    and for an ID already registered.
    """
    if not is_device_id(device_id):
        raise RegistryError(f"{shown(device_id)} is no device id ({ID_RULE}, as a device identifies)")
    if port is not None and port in listeners:
        raise RegistryError(f"port {port} is where {listeners[port]} listens")
    return registry.add(device_id, port, **fields)


def import_export(registry: Registry, path: Path, listeners: dict[int, str]) -> tuple[list[str], list[str]]:
    """Registers the devices of a CE NetConnection export: (what was added, what was skipped and why),
    a line per row. A row with no TCP port gets the lowest free port of the range."""
    added, skipped = [], []
    for number, row in _rows(path):
        serial, port_text = row.get(SERIAL, ""), row.get(PORT, "").removesuffix(".0")
        where = f"row {number}"
        if not serial:
            skipped.append(f"{where}: no serial number")
            continue
        if not is_device_id(serial):
            skipped.append(f"{where}: {shown(serial)} is no device id ({ID_RULE}, as a device identifies)")
            continue
        if port_text and (not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535):
            skipped.append(f"{where}: {serial}: TCP port {shown(port_text)} is not a port number")
            continue
        note = ", ".join(
            part for part in (row.get(KIND, ""), f"system address {row[ADDRESS]}" if row.get(ADDRESS) else "") if part
        )
        try:
            record = add(registry, serial, int(port_text) if port_text else None, listeners, note=note)
        except RegistryError as exc:
            skipped.append(f"{where}: {exc}" if serial in str(exc) else f"{where}: {serial}: {exc}")
            continue
        origin = "" if port_text else " (no port in the file: the lowest free one of direct_ports)"
        added.append(f"{where}: {serial} on port {record.direct_port}{origin}")
    return added, skipped


def misplaced(registry: Registry, listeners: dict[int, str]) -> list[str]:
    """Registered devices whose direct port the proxy could not open: outside direct_ports (the range
    changed since) or where a listener is. `check` reports them."""
    problems = []
    for record in registry.all():
        port, ports = record.direct_port, registry.direct_ports
        if port in listeners:
            problems.append(f"{record.id}: direct port {port} is where {listeners[port]} listens")
        elif ports is not None and not ports[0] <= port <= ports[1]:
            problems.append(f"{record.id}: direct port {port} is outside direct_ports {ports[0]}-{ports[1]}")
    return problems


def migrate(source: Registry, target: PostgresRegistry) -> tuple[list[Record], list[str]]:
    """Copies every device of a SQLite registry, with its port and history, into PostgreSQL: (those
    copied, a line for each skipped and why). Ports the SQLite file holds back after a crash are not
    copied: they belong to no device."""
    return target.copy(source.all())
