"""`devproxy devices`: list, add, remove, and import a CE NetConnection export (CSV and XLSX)."""

from __future__ import annotations

import json
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
