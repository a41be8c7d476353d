"""The status page in a real browser: headless Chromium renders each device's row and state, and an
operator logs in, searches, filters, pages, sorts and watches a device's live traffic."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from http_client import request

from proxy.device import State

from helpers import BEEP, BEEP_ANSWER, connect, receive_exactly, running_proxy, settings_for, wait_for

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


# -- the console in a real browser, driven through chromedriver (W3C WebDriver over HTTP) ----------------

CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
TOKEN = "br0wser-t0ken"
# More devices than a page of 50 holds: 52 release_port devices (closed; nothing runs for them), a
# simulated register and an absent serial port.
FLEET = [
    *({"name": f"rp-{n:02d}", "type": "tcp", "path": "127.0.0.1:1", "release_port": True} for n in range(52)),
    {"name": "register", "type": "simulator", "protocol": "custom", "acquire_timeout": 30},
    {"name": "meter", "type": "serial", "path": "/nonexistent/ttyMETER", "reconnect_interval": 3600},
]


class Browser:
    """One headless Chromium session, driven with chromedriver's W3C WebDriver commands."""

    def __init__(self, address: str, session: str) -> None:
        self.address = address
        self.session = session

    async def command(self, method: str, path: str, payload: dict | None = None) -> object:
        body = json.dumps(payload if payload is not None else {}).encode() if method == "POST" else b""
        headers = {"content-type": "application/json"} if body else {}
        reply = await request(self.address, method, f"/session/{self.session}{path}", headers=headers, body=body)
        value = reply.json()["value"]
        assert reply.status_code == 200, value
        return value

    async def go(self, url: str) -> None:
        await self.command("POST", "/url", {"url": url})

    async def url(self) -> str:
        return await self.command("GET", "/url")

    async def find(self, css: str) -> str:
        """The first element `css` selects, waiting for it (the session's implicit wait)."""
        return (await self.command("POST", "/element", {"using": "css selector", "value": css}))[ELEMENT]

    async def type_into(self, css: str, text: str) -> None:
        await self.command("POST", f"/element/{await self.find(css)}/value", {"text": text})

    async def click(self, css: str) -> None:
        await self.command("POST", f"/element/{await self.find(css)}/click")

    async def follow(self, css: str) -> None:
        """Clicks a link or a form's button and waits for the page it leads to (a new document)."""
        await self.run("document.body.setAttribute('data-left', '');")
        await self.click(css)
        await self.find("body:not([data-left])")

    async def run(self, script: str, *args: object) -> object:
        return await self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def wait_in_page(self, script: str) -> object:
        """Runs `script`, which calls its last argument when what it waits for has happened in the page."""
        return await self.command("POST", "/execute/async", {"script": script, "args": []})

    async def rows(self) -> list[str]:
        return await self.run(
            "return Array.from(document.querySelectorAll('tbody tr[id^=\"device-\"]')).map(r => r.id.slice(7));"
        )


@asynccontextmanager
async def browser_session(tmp_path: Path) -> AsyncIterator[Browser]:
    """chromedriver and a headless Chromium session 1400 px wide; both ended when the block ends."""
    driver = await trio.lowlevel.open_process(
        [CHROMEDRIVER, "--port=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        seen = b""
        with trio.fail_after(30):
            while (found := re.search(rb"started successfully on port (\d+)", seen)) is None:
                chunk = await driver.stdout.receive_some()
                assert chunk, f"chromedriver did not start: {seen!r}"
                seen += chunk
        address = f"127.0.0.1:{found.group(1).decode()}"
        options = {"binary": CHROMIUM, "args": [*FLAGS, "--window-size=1400,900", f"--user-data-dir={tmp_path}"]}
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        body = json.dumps({"capabilities": capabilities}).encode()
        with trio.fail_after(60):
            reply = await request(address, "POST", "/session", headers={"content-type": "application/json"}, body=body)
        assert reply.status_code == 200, reply.text
        browser = Browser(address, reply.json()["value"]["sessionId"])
        await browser.command("POST", "/timeouts", {"implicit": 10_000, "script": 20_000, "pageLoad": 20_000})
        try:
            yield browser
        finally:
            with trio.fail_after(30):
                await request(address, "DELETE", f"/session/{browser.session}")
    finally:
        driver.kill()
        await driver.wait()


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)
async def test_an_operator_logs_in_searches_filters_pages_sorts_and_watches_live_traffic(tmp_path):
    settings = settings_for(*FLEET, status="127.0.0.1:0", status_token=TOKEN)
    async with running_proxy(settings) as running, browser_session(tmp_path / "profile") as browser:
        site = f"http://{running.status}"
        register = running.devices["register"]
        await wait_for(register, lambda: register.state == State.IDLE)

        # The page sends a browser without a session to the login form, and back after it.
        await browser.go(f"{site}/?refresh=0")
        assert (await browser.url()).startswith(f"{site}/login?next=")
        await browser.type_into("input[name=token]", "not it")
        await browser.follow("button[type=submit]")
        assert "That is not the status token." in await browser.run("return document.body.textContent;")
        await browser.type_into("input[name=token]", TOKEN)
        await browser.follow("button[type=submit]")
        assert await browser.url() == f"{site}/?refresh=0"
        assert await browser.run("return document.cookie;") == ""  # HttpOnly: no script reads the session
        summary = await browser.run("return document.querySelector('p.summary').textContent;")
        assert summary.startswith("54 devices: online 1 (idle 1,") and "closed 52" in summary
        # Every column fits a 1,400 px window.
        assert await browser.run("return document.documentElement.scrollWidth <= window.innerWidth;")

        # Search, then a filter with a smaller page, then the next page: all through the page's own form.
        await browser.type_into("input[name=q]", "rp-1")
        await browser.follow("form.filters button[type=submit]")
        assert await browser.rows() == [f"rp-{n}" for n in range(10, 20)]
        await browser.run("document.querySelector('input[name=q]').value = '';")
        await browser.run("document.querySelector('select[name=state]').value = 'closed';")
        await browser.run("document.querySelector('select[name=per]').value = '50';")
        await browser.follow("form.filters button[type=submit]")
        assert len(await browser.rows()) == 50
        await browser.follow("a[rel=next]")
        assert await browser.rows() == ["rp-50", "rp-51"]

        # Sort by a column, then the other way, from the column's heading.
        await browser.go(f"{site}/?refresh=0")
        await browser.follow("th:first-child a")
        assert (await browser.rows())[:2] == ["meter", "register"]
        await browser.follow("th:first-child a")
        assert (await browser.rows())[:2] == ["rp-51", "rp-50"]

        # A device's page shows its bytes live while it is open.
        await browser.go(f"{site}/devices/register")
        await wait_for(register, lambda: register.traffic is not None)
        async with await connect(running, "register") as client:
            await client.send_all(BEEP)
            assert await receive_exactly(client, 9) == BEEP_ANSWER
            rows = await browser.wait_in_page(
                """
                var done = arguments[arguments.length - 1];
                var body = document.querySelector("#traffic tbody");
                function cells() {
                  return Array.from(body.rows).map(function (r) {
                    return Array.from(r.cells).map(function (c) { return c.textContent; });
                  });
                }
                function check() { if (body.rows.length >= 2) { done(cells()); return true; } return false; }
                if (!check()) new MutationObserver(check).observe(body, {childList: true});
                """
            )
        oldest = rows[-1]
        assert oldest[1:] == ["to device", oldest[2], "9", "01 05 00 13 3f 42 0f 00 a8", "....?B..."]
        assert oldest[2].startswith("127.0.0.1:") and rows[0][1] == "from device"

        # Log out: the page is the login form's again.
        await browser.follow("form[action='/logout'] button")
        await browser.find("input[name=token]")
        await browser.go(f"{site}/api/devices")
        assert "Authorization: Bearer TOKEN" in await browser.run("return document.body.textContent;")
