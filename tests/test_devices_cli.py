"""`devproxy devices`: list, add, remove, and import a CE NetConnection export (CSV and XLSX)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import trio
from openpyxl import Workbook

from proxy.dialin.registry import RESERVE_AHEAD, Registry

PROXY = [sys.executable, "-m", "proxy"]
HEADER = [
    "Тип устройства",
    "Серийный номер",
    "Примечание",
    "Пользовательское",
    "Системный адрес",
    "TCP порт",
    "Дата изменения",
    "IP адрес (1)",
    "IP адрес (2)",
]
ROWS = [
    ["CE308", "009218046950", "", "", "46950", "7600", "2024-01-01", "", ""],
    ["CE208", "009218000001", "", "", "1", "7601", "2024-01-01", "", ""],
    ["CE308", "009218046950", "", "", "46950", "7602", "", "", ""],  # duplicate serial
    ["CE308", "", "", "", "5", "7603", "", "", ""],  # no serial
    ["CE308", "009218000009", "", "", "9", "port", "", "", ""],  # malformed port
    ["CE102", "009218000010", "", "", "10", "7600", "", "", ""],  # port taken
]


@pytest.fixture
def config(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text(
        f'[proxy]\nstatus = ""\n\n[dialin]\nlisten = ["127.0.0.1:0"]\nregistry = "{tmp_path / "reg.sqlite3"}"\n'
        'direct_ports = "7500-7999"\nping_after = 0\n'
    )
    return settings


def devices(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PROXY, "devices", "-c", str(config), *args], capture_output=True, text=True, timeout=20)


def test_add_list_and_remove(config):
    assert devices(config, "add", "METER1").stdout == "added METER1 with direct port 7500\n"
    assert devices(config, "add", "METER2", "--port", "7777", "--name", "north").returncode == 0
    taken = devices(config, "add", "METER3", "--port", "7777")
    assert taken.returncode == 1 and "port 7777 belongs to another device" in taken.stderr
    again = devices(config, "add", "METER1")
    assert again.returncode == 1 and "METER1 is already registered" in again.stderr
    listing = devices(config, "list")
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "STATE", "PORT"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["METER1", "-", "offline", "7500"],
        ["METER2", "north", "offline", "7777"],
    ]
    rows = json.loads(devices(config, "list", "--json").stdout)
    assert rows[1]["name"] == "north" and rows[1]["port"] == 7777
    assert devices(config, "remove", "METER1").stdout == "removed METER1\n"
    missing = devices(config, "remove", "METER1")
    assert missing.returncode == 1 and "METER1 is not registered" in missing.stderr


def test_add_skips_ports_held_back_after_a_crash_and_gives_one_when_asked(config, tmp_path):
    registry = Registry(tmp_path / "reg.sqlite3", (7500, 7999))
    lost = trio.run(registry.register, "LOST")
    registry.close()  # the proxy died before it wrote LOST's row
    first_free = 7500 + RESERVE_AHEAD
    assert devices(config, "add", "OTHER").stdout == f"added OTHER with direct port {first_free}\n"
    assert devices(config, "add", "LOST", "--port", str(lost.direct_port)).returncode == 0
    rows = json.loads(devices(config, "list", "--json").stdout)
    assert [(row["id"], row["port"]) for row in rows] == [("LOST", 7500), ("OTHER", first_free)]


def expect_import(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "added row 2: 009218046950 on port 7600\n" in out and "added row 3: 009218000001 on port 7601\n" in out
    assert "skipped row 4: 009218046950 is already registered" in out
    assert "skipped row 5: no serial number" in out
    assert "skipped row 6: 009218000009: TCP port 'port' is not a port number" in out
    assert "skipped row 7: 009218000010: port 7600 belongs to another device" in out
    assert out.rstrip().endswith("2 added, 4 skipped")


def test_import_a_csv_export(config, tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("\n".join(";".join(row) for row in [HEADER, *ROWS]) + "\n", encoding="utf-8-sig")
    expect_import(devices(config, "import", str(export)))
    rows = json.loads(devices(config, "list", "--json").stdout)
    assert rows[0]["note"] == "CE308, system address 46950"


def test_import_an_xlsx_export(config, tmp_path):
    export = tmp_path / "export.xlsx"
    book = Workbook()
    book.active.append(HEADER)
    for row in ROWS:
        book.active.append([int(cell) if cell.isdigit() and len(cell) < 6 else cell for cell in row])
    book.save(export)
    expect_import(devices(config, "import", str(export)))


def test_an_export_without_the_needed_columns_says_which(config, tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("Meter,Port\n1,2\n")
    result = devices(config, "import", str(export))
    assert result.returncode == 1
    assert "the header has no column 'серийный номер' or 'serial number'" in result.stderr


def test_an_english_export_in_any_case_gives_rows_with_no_port_one_from_the_range(config, tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("DEVICE TYPE,Serial Number,tcp port\nCE308,A1,7700\nCE308,A2,\n")
    result = devices(config, "import", str(export))
    assert result.returncode == 0, result.stderr
    assert "added row 2: A1 on port 7700\n" in result.stdout
    assert "added row 3: A2 on port 7500 (no port in the file: the lowest free one of direct_ports)" in result.stdout


def test_add_refuses_a_port_outside_the_range_or_where_a_listener_is(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text(
        f'[proxy]\nstatus = "127.0.0.1:18600"\n\n[dialin]\nlisten = ["127.0.0.1:0"]\n'
        f'registry = "{tmp_path / "reg.sqlite3"}"\ndirect_ports = "any"\n'
    )
    on_status = devices(settings, "add", "M1", "--port", "18600")
    assert on_status.returncode == 1 and "port 18600 is where [proxy] status listens" in on_status.stderr


def test_add_and_check_refuse_a_port_outside_direct_ports(config):
    outside = devices(config, "add", "M1", "--port", "9000")
    assert outside.returncode == 1 and "port 9000 is outside direct_ports 7500-7999" in outside.stderr
    assert devices(config, "add", "M2", "--port", "7990").returncode == 0
    config.write_text(config.read_text().replace("7500-7999", "7500-7899"))
    check = subprocess.run([*PROXY, "check", "-c", str(config)], capture_output=True, text=True, timeout=20)
    assert check.returncode == 2
    assert "M2: direct port 7990 is outside direct_ports 7500-7899" in check.stderr


def test_devices_needs_a_dialin_table(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text('[proxy]\nstatus = ""\n')
    result = devices(settings, "list")
    assert result.returncode == 2 and "has no [dialin] table" in result.stderr


@pytest.mark.parametrize(
    "device_id", ["", " ", "tab\tid", "line\nbreak", "x" * 5000, "\x1b]0;pwned\x07", "\x1b[31mred", "ок"]
)
def test_add_refuses_an_id_no_device_could_identify_with_in_one_line(config, device_id):
    result = devices(config, "add", "--", device_id)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert "is no device id (1-64 printable characters" in result.stderr
    assert "\x1b" not in result.stderr and len(result.stderr) < 300
    assert json.loads(devices(config, "list", "--json").stdout) == []


def test_import_skips_rows_whose_serial_is_no_device_id_naming_the_row(config, tmp_path):
    export = tmp_path / "export.csv"
    rows = ["GOOD-1,7600", '"has space",', '"line\nbreak",', "L" * 5000 + ",", "\x1b[31mred,", "nul\x00x,"]
    export.write_text("Serial,Port\n" + "\n".join(rows) + "\n")
    result = devices(config, "import", str(export))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "added row 2: GOOD-1 on port 7600"
    assert lines[1] == "skipped row 3: 'has space' is no device id (1-64 printable characters, as a device identifies)"
    assert lines[2].startswith("skipped row 4: 'line\\nbreak' is no device id")
    assert lines[3].startswith("skipped row 5: 'LLLL") and "... (5000 characters) is no device id" in lines[3]
    assert lines[4].startswith("skipped row 6: '\\x1b[31mred' is no device id")
    assert lines[5].startswith("skipped row 7: 'nul\\x00x' is no device id")
    assert lines[6] == "1 added, 5 skipped" and "\x1b" not in result.stdout


def test_list_escapes_control_characters_an_older_registry_holds(config, tmp_path):
    assert devices(config, "add", "PLAIN").returncode == 0
    db = sqlite3.connect(tmp_path / "reg.sqlite3")  # as a registry from before ids were checked
    with db:
        db.execute("UPDATE devices SET id = ?", ("\x1b]0;pwned\x07",))
    db.close()
    listing = devices(config, "list")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[1].split()[0] == "\\x1b]0;pwned\\x07"
    assert "\x1b" not in listing.stdout and "\x07" not in listing.stdout
    assert json.loads(devices(config, "list", "--json").stdout)[0]["id"] == "\x1b]0;pwned\x07"


def test_import_prefers_the_most_specific_column_name(config, tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("Serial Number,Serial,Port\nREAL-1,MODEM-9,7600\n")
    result = devices(config, "import", str(export))
    assert result.stdout == "added row 2: REAL-1 on port 7600\n1 added, 0 skipped\n", result.stderr


def test_import_of_a_one_column_export_falls_back_to_commas(config, tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("Serial\nA1\n")
    result = devices(config, "import", str(export))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("added row 2: A1 on port 7500")


def test_import_skips_a_port_of_non_ascii_digits(config, tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("serial,port\nP1,\u00b2\nP2,\u0667\u0666\u0660\u0660\n")  # superscript 2, Arabic-Indic 7600
    result = devices(config, "import", str(export))
    assert result.returncode == 0, result.stderr
    assert "skipped row 2: P1: TCP port '\u00b2' is not a port number" in result.stdout
    assert "skipped row 3: P2: TCP port" in result.stdout and result.stdout.endswith("0 added, 2 skipped\n")


def test_import_of_a_field_over_the_csv_limit_fails_naming_the_row(config, tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("serial,port\nA1,7600\n" + "Z" * 200_000 + ",\n")
    result = devices(config, "import", str(export))
    assert result.returncode == 1
    assert result.stderr == f"error: {export}: row 3: field larger than field limit (131072)\n"


def test_import_refuses_what_is_not_a_regular_file_or_too_large(config, tmp_path):
    fifo = tmp_path / "export.csv"
    os.mkfifo(fifo)  # no writer: reading it would wait forever
    sparse = tmp_path / "big.csv"
    with sparse.open("wb") as file:
        file.truncate(64 * 1024 * 1024 + 1)
    expected = {
        fifo: "not a regular file",
        tmp_path: "not a regular file",
        "/dev/zero": "not a regular file",
        sparse: "67108865 bytes is too large for an export (at most 67108864)",
    }
    for path, message in expected.items():
        result = devices(config, "import", str(path))
        assert result.returncode == 1, path
        assert result.stderr.startswith(f"error: {path}: {message}"), result.stderr
        assert len(result.stderr.splitlines()) == 1
