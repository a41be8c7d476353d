"""The status page in a real browser: headless Chromium renders each device's row and state."""

from __future__ import annotations

import shutil

import pytest
import trio

from proxy.device import State

from helpers import connect, running_proxy, settings_for, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
async def test_headless_chromium_shows_every_device_row_and_state(tmp_path):
    settings = settings_for(
        {"name": "register", "type": "simulator", "protocol": "custom", "acquire_timeout": 30},
        {"name": "meter", "type": "serial", "path": str(tmp_path / "absent"), "reconnect_interval": 60},
        status="127.0.0.1:0",
    )
    async with running_proxy(settings) as running:
        register = running.devices["register"]
        async with await connect(running, "register"):
            await wait_for(register, lambda: register.state == State.BUSY)
            browser = await trio.run_process(
                [
                    CHROMIUM,
                    *FLAGS,
                    f"--user-data-dir={tmp_path / 'profile'}",
                    "--dump-dom",
                    f"http://{running.status}/",
                ],
                capture_stdout=True,
                capture_stderr=True,
            )
    dom = browser.stdout.decode()
    assert '<tr id="device-register">' in dom and '<tr id="device-meter">' in dom
    register_row = dom.split('<tr id="device-register">')[1].split("</tr>")[0]
    meter_row = dom.split('<tr id="device-meter">')[1].split("</tr>")[0]
    assert 'class="state-busy">busy<' in register_row
    assert 'class="state-offline">offline<' in meter_row
