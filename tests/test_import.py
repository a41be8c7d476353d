"""`devproxy import ecrservice`: the seed's config.xml, and the settings it cannot map."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load
from proxy.importers import ImportFailed, import_cencn, import_ecrservice

DATA = Path(__file__).parent / "data"
PROXY = [sys.executable, "-m", "proxy"]


def test_the_seed_config_becomes_an_exchange_sharing_custom_device(tmp_path):
    imported = import_ecrservice(DATA / "ecrservice-config.xml")
    output = tmp_path / "settings.toml"
    output.write_text(imported.toml())
    settings = load(output)
    (device,) = settings.devices
    assert (device.name, device.type, device.path, device.baudrate) == ("ecr0", "serial", "COM22", 115200)
    assert (device.protocol, device.sharing, device.release_port, device.reconnect_interval) == (
        "custom",
        "exchange",
        False,
        2.0,
    )
    assert [str(a) for a in device.listen] == ["0.0.0.0:8000"]
    assert settings.proxy.log_level == "DEBUG"
    assert imported.unmapped == [
        "EarlyAckDelayMs '5': devproxy forwards an ACK the moment it arrives",
        "Debug 'true': devproxy has no debug mode; use log_level",
        "Connection Id=0 Path 'COM22:115200': COM22 is a Windows port name, kept as it is; set path to the "
        "Linux device (e.g. /dev/ttyUSB0 or /dev/serial/by-id/...)",
    ]


def test_network_connections_unknown_settings_and_a_second_register(tmp_path):
    source = tmp_path / "config.xml"
    source.write_text(
        "<Configuration><ListeningPort>9000</ListeningPort><LogLevel>Loud</LogLevel><Colour>red</Colour>"
        '<Connections><Connection Id="0" Type="Network" Path="192.168.0.89:9100" ReleasePort="true" Reconnect="0"/>'
        '<Connection Id="1" Type="Serial" Path="/dev/ttyUSB1:9600" Parity="E"/></Connections></Configuration>'
    )
    imported = import_ecrservice(source)
    first, second = imported.settings["device"]
    assert (first["type"], first["path"], first["release_port"], first["reconnect_interval"]) == (
        "tcp",
        "192.168.0.89:9100",
        True,
        0.0,
    )
    assert (second["path"], second["baudrate"], second["listen"]) == ("/dev/ttyUSB1", 9600, ["0.0.0.0:9001"])
    assert "LogLevel 'Loud': not one of verbose, debug, information, warning, error, fatal" in imported.unmapped
    assert "Colour 'red': not a setting devproxy knows" in imported.unmapped
    assert "Connection Id=1 Parity 'E': not a setting devproxy knows" in imported.unmapped
    assert any("this device listens on 9001" in line for line in imported.unmapped)


@pytest.mark.parametrize(
    ("text", "message"),
    [("<Configuration><ListeningPort>", "cannot read"), ("<Configuration/>", "no <Connection>")],
)
def test_files_that_cannot_be_imported_say_why(tmp_path, text, message):
    source = tmp_path / "config.xml"
    source.write_text(text)
    with pytest.raises(ImportFailed, match=message):
        import_ecrservice(source)


def test_the_command_writes_the_file_lists_the_unmapped_and_never_overwrites(tmp_path):
    output = tmp_path / "settings.toml"
    command = [*PROXY, "import", "ecrservice", str(DATA / "ecrservice-config.xml"), "-o", str(output)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and first.stderr.count("not mapped: ") == 3
    again = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert again.returncode == 1 and "exists; use --force" in again.stderr
    checked = subprocess.run([*PROXY, "check", "-c", str(output)], capture_output=True, text=True, timeout=20)
    assert checked.returncode == 0, checked.stderr


def test_cencn_settings_become_a_dialin_table_with_every_unmapped_key_listed(tmp_path):
    imported = import_cencn(DATA / "cencn-appsettings.json")
    output = tmp_path / "settings.toml"
    output.write_text(imported.toml())
    settings = load(output)
    dialin = settings.dialin
    assert [str(a) for a in dialin.listen] == ["0.0.0.0:11001", "0.0.0.0:11002"]
    assert (dialin.max_devices, dialin.autoregister, dialin.identify_timeout) == (65000, True, 300)
    assert (dialin.disconnect_after, dialin.idle_after, dialin.ping_after) == (3600, 60, 0)
    assert dialin.direct_ports == (7500, 8599)
    proxy = settings.proxy
    assert (proxy.log_level, proxy.log_file, proxy.log_rotation, proxy.log_retention) == (
        "WARNING",
        "LOGS/devproxy.log",
        "10240 B",
        2,
    )
    unmapped = {line.split(" = ")[0]: line for line in imported.unmapped}
    assert "CENC's ping packet is not public" in unmapped["CENC:Device:InactiveToPingSeconds"]
    assert "stop below port 8600 ([proxy] status)" in unmapped["CENC:Device:DirectAccess:MinimalPortNumber"]
    assert "does not speak the CENC protocol" in unmapped["CENC:AMR:ServerPort"]
    assert "does not set meters' clocks" in unmapped["CENC:Device:TymeSync:LastTimeSyncMinutesForTimeCorrection"]
    assert "registry in SQLite" in unmapped["ConnectionStrings:Default"]
    assert "one log level" in unmapped["DaemonLoggin:AMRMinLevel"]
    mapped = {
        "CENC:Device:ServerPort",
        "CENC:Device:MaxConnections",
        "CENC:Device:AutoregistrationEnabled",
        "CENC:Device:InactiveDisconnectionTimeoutSeconds",
        "CENC:Device:InactiveToIdleTimeoutSeconds",
        "CENC:Device:RegistrationTimeoutSeconds",
        "DaemonLoggin:DeviceMinLevel",
        "DaemonLoggin:LogFileDirectoryPath",
    }
    assert not mapped & set(unmapped)


def test_cencn_values_of_the_wrong_kind_keep_the_default_and_say_so(tmp_path):
    source = tmp_path / "appsettings.json"
    source.write_text('{"CENC": {"Device": {"ServerPort": "eleven", "Colour": "red"}}}')
    imported = import_cencn(source)
    assert imported.settings["dialin"]["listen"] == ["0.0.0.0:11001"]
    assert "CENC:Device:ServerPort = 'eleven': not int; the default is used" in imported.unmapped
    assert "CENC:Device:Colour = 'red': not a setting devproxy knows" in imported.unmapped
    source.write_text("[1, 2]")
    with pytest.raises(ImportFailed, match="not a JSON object"):
        import_cencn(source)
