"""devproxy's pytest plugin: simulated devices as a fixture, and their exchanges in a failing test's report.

Installed with devproxy (the `devproxy` pytest11 entry point) and inert unless a test asks for the
`simulated_device` fixture: it adds no autouse fixture, option or marker.

    def test_receipt_prints(simulated_device):
        register = simulated_device("custom", faults=Faults(nak_every=3))
        pos = MyPos(port=str(register.path))
        pos.print_receipt()
        assert register.exchanges[0].request[3] == 0x13

Each call starts one device (proxy.testing.simulated_device_sync's arguments: pty by default, tcp=True,
faults=...) and gives a proxy.testing.BackgroundDevice; every device is stopped when the test ends. When
the test fails (in setup, call or teardown), each device's exchanges are attached to its report as a
section, shown with the failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from proxy.testing import BackgroundDevice

DEVICES = pytest.StashKey["list[BackgroundDevice]"]()


@pytest.fixture
def simulated_device(request: pytest.FixtureRequest) -> Iterator[Callable[..., BackgroundDevice]]:
    """A factory: `simulated_device(protocol, **options)` starts a simulated device for this test."""
    from proxy.testing import simulated_device_sync  # only once a test asks for a device

    devices: list[BackgroundDevice] = request.node.stash.setdefault(DEVICES, [])

    with contextlib.ExitStack() as stack:

        def start(protocol: str = "custom", **options: Any) -> BackgroundDevice:
            device = stack.enter_context(simulated_device_sync(protocol, **options))
            devices.append(device)
            return device

        yield start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    devices = item.stash.get(DEVICES, [])
    if report.failed:
        for number, device in enumerate(devices, 1):
            report.sections.append((f"devproxy simulated device {number} ({device.protocol})", device.log()))
    return report
