"""`devproxy devices`: the registry of dial-in devices from the command line, and CE NetConnection imports."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from proxy.dialin.registry import Record, Registry, RegistryError

# The columns of a CE NetConnection 4.x device export that devproxy uses (the header row names them).
SERIAL, KIND, ADDRESS, PORT = "Серийный номер", "Тип устройства", "Системный адрес", "TCP порт"


class ImportFailed(Exception):
    """The export cannot be read at all; the message says why."""


def state(record: Record) -> str:
    """online while the last connect is later than the last disconnect."""
    if record.last_connect and (record.last_disconnect is None or record.last_connect > record.last_disconnect):
        return "online"
    return "offline"


def as_row(record: Record) -> dict[str, object]:
    return {
        "id": record.id,
        "state": state(record),
        "port": record.direct_port,
        "name": record.name,
        "note": record.note,
        "last_seen": record.last_seen,
        "peer": record.last_peer,
        "bytes_to_device": record.bytes_to_device,
        "bytes_from_device": record.bytes_from_device,
    }


def table(records: list[Record]) -> str:
    rows = [["ID", "STATE", "PORT", "LAST SEEN", "PEER", "TO DEVICE", "FROM DEVICE"]]
    for record in records:
        row = as_row(record)
        rows.append(
            [
                str(row[key] if row[key] is not None else "-")
                for key in ("id", "state", "port", "last_seen", "peer", "bytes_to_device", "bytes_from_device")
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row by header name) of a CSV or XLSX export; the first row is the header."""
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook

        try:
            sheet = load_workbook(path, read_only=True, data_only=True).active
        except Exception as exc:  # openpyxl raises many kinds for a broken file
            raise ImportFailed(f"{path}: not a readable XLSX file: {exc}") from None
        lines = [
            ["" if cell is None else str(cell).strip() for cell in row] for row in sheet.iter_rows(values_only=True)
        ]
    else:
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ImportFailed(f"{path}: cannot read it as UTF-8 text: {exc}") from None
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else ",", delimiters=",;\t")
        lines = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text), dialect)]
    if not lines:
        raise ImportFailed(f"{path}: the file is empty")
    header = lines[0]
    for needed in (SERIAL, PORT):
        if needed not in header:
            raise ImportFailed(f"{path}: the header has no column {needed!r} (it has: {', '.join(header)})")
    for number, line in enumerate(lines[1:], start=2):
        if any(line):
            yield number, dict(zip(header, line + [""] * (len(header) - len(line)), strict=False))


def import_export(registry: Registry, path: Path) -> tuple[list[str], list[str]]:
    """Registers the devices of a CE NetConnection export: (what was added, what was skipped and why)."""
    added, skipped = [], []
    for number, row in _rows(path):
        serial, port_text = row.get(SERIAL, ""), row.get(PORT, "").removesuffix(".0")
        where = f"row {number}"
        if not serial:
            skipped.append(f"{where}: no serial number")
            continue
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            skipped.append(f"{where}: {serial}: TCP port {port_text!r} is not a port number")
            continue
        note = ", ".join(
            part for part in (row.get(KIND, ""), f"system address {row[ADDRESS]}" if row.get(ADDRESS) else "") if part
        )
        try:
            registry.add(serial, int(port_text), note=note)
        except RegistryError as exc:
            skipped.append(f"{where}: {exc}")
            continue
        added.append(f"{serial} on port {port_text}")
    return added, skipped
