"""Reloading settings: added devices start, removed ones stop, changed ones restart, the rest run on."""

from __future__ import annotations

import signal
import socket
import subprocess

from test_cli import LIMIT, spawn, wait_for_line

from proxy import log
from proxy.config import parse
from proxy.device import State

from helpers import connect, receive_exactly, receive_until_closed, running_proxy, settings_for, wait_for

BEEP = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")
BEEP_ANSWER = bytes.fromhex("06 01 04 00 13 00 00 63 7A")


def register(name: str, **keys) -> dict:
    return {"name": name, "type": "simulator", "protocol": "custom", "acquire_timeout": 30, **keys}


async def test_reload_adds_removes_restarts_and_leaves_the_untouched_device_and_its_client_alone():
    settings = settings_for(register("kept"), register("dropped"), register("changed"))
    async with running_proxy(settings) as running:
        kept = running.devices["kept"]
        async with await connect(running, "kept") as holder, await connect(running, "changed") as old_client:
            await wait_for(kept, lambda: kept.state == State.BUSY)
            dropped_client = await connect(running, "dropped")
            await wait_for(running.devices["dropped"], lambda: running.devices["dropped"].clients == 1)
            # The kept device's port was 0 in the settings; with its bound port written out it would
            # count as changed, so the new settings keep the old table as it was.
            new = parse(
                {
                    "proxy": {"status": ""},
                    "device": [
                        {**register("kept"), "listen": ["127.0.0.1:0"]},
                        register("changed", acquire_timeout=7, listen=["127.0.0.1:0"]),
                        register("added", listen=["127.0.0.1:0"]),
                    ],
                }
            )
            await running.reload(new)
            assert set(running.devices) == {"kept", "changed", "added"}
            assert running.devices["kept"] is kept and kept.holder is not None
            assert running.devices["changed"].config.acquire_timeout == 7
            assert await receive_until_closed(old_client) == b""
            assert await receive_until_closed(dropped_client) == b""
            await dropped_client.aclose()
            await holder.send_all(BEEP)
            assert await receive_exactly(holder, 9) == BEEP_ANSWER
            async with await connect(running, "added") as added_client:
                await added_client.send_all(BEEP)
                assert await receive_exactly(added_client, 9) == BEEP_ANSWER


async def test_a_new_log_level_alone_keeps_the_device_and_its_client():
    settings = settings_for(register("meter"))
    async with running_proxy(settings) as running:
        device = running.devices["meter"]
        async with await connect(running, "meter") as holder:
            await wait_for(device, lambda: device.state == State.BUSY)
            new = parse(
                {
                    "proxy": {"status": ""},
                    "device": [{**register("meter"), "listen": ["127.0.0.1:0"], "log_level": "TRACE"}],
                }
            )
            await running.reload(new)
            assert running.devices["meter"] is device and device.tracing
            await holder.send_all(BEEP)
            assert await receive_exactly(holder, 9) == BEEP_ANSWER


async def test_a_changed_device_whose_new_port_is_taken_keeps_its_old_settings():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        settings = settings_for(register("dev"))
        async with running_proxy(settings) as running:
            old_device = running.devices["dev"]
            new = parse({"proxy": {"status": ""}, "device": [register("dev", listen=[f"127.0.0.1:{busy_port}"])]})
            await running.reload(new)
            restarted = running.devices["dev"]
            assert restarted is not old_device and restarted.config == old_device.config
            async with await connect(running, "dev") as client:
                await client.send_all(BEEP)
                assert await receive_exactly(client, 9) == BEEP_ANSWER


def test_sighup_reloads_the_file_and_a_broken_file_changes_nothing(tmp_path):
    settings = tmp_path / "settings.toml"
    device = '\n[[device]]\nname = "{}"\ntype = "simulator"\nprotocol = "custom"\nlisten = ["127.0.0.1:0"]\n'
    first = '[proxy]\nstatus = ""\n' + device.format("one")
    settings.write_text(first)
    with spawn("run", "-c", str(settings), stderr=subprocess.PIPE) as proxy:
        wait_for_line(proxy.stderr, r"one: .* on 127\.0\.0\.1:\d+")
        settings.write_text(
            first + '\n[[device]]\nname = "two"\ntype = "simulator"\nprotocol = "custom"\nlisten = ["127.0.0.1:0"]\n'
        )
        proxy.send_signal(signal.SIGHUP)
        wait_for_line(proxy.stderr, r"two: .* on 127\.0\.0\.1:\d+")
        wait_for_line(proxy.stderr, r"settings reloaded: 2 device\(s\)")
        settings.write_text("[proxy\nbroken")
        proxy.send_signal(signal.SIGHUP)
        wait_for_line(proxy.stderr, r"SIGHUP: the new settings are not used")
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(LIMIT) == 0


async def test_a_log_file_that_cannot_be_opened_at_reload_keeps_the_previous_logging(tmp_path, monkeypatch):
    settings = settings_for(register("kept"))
    async with running_proxy(settings) as running:
        setup = log.setup

        def refuse_the_new_file(config):
            if config.log_file:
                raise log.LogFileError(f"log_file {config.log_file!r} cannot be opened: disk full")
            setup(config)

        monkeypatch.setattr(log, "setup", refuse_the_new_file)
        proxy = {"status": "", "log_file": str(tmp_path / "devproxy.log")}
        new = parse({"proxy": proxy, "device": [register("kept", listen=["127.0.0.1:0"])]})
        await running.reload(new)
        assert running.settings.proxy.log_file == ""
        async with await connect(running, "kept") as client:
            await client.send_all(BEEP)
            assert await receive_exactly(client, 9) == BEEP_ANSWER
