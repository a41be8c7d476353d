import pytest
from loguru import logger

from proxy import log
from proxy.config import ProxyConfig

from helpers import PtyDevice, TcpDevice


@pytest.fixture(autouse=True)
def quiet_logs():
    """Logs at DEBUG to stderr (shown for failing tests only)."""
    log.setup(ProxyConfig(log_level="DEBUG"))
    yield
    logger.remove()


@pytest.fixture
def log_lines():
    """Every log message from here on, as text, to check what an operator would read."""
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{level} {message}")
    yield lines
    logger.remove(sink)


@pytest.fixture
async def pty(tmp_path):
    """A device on a pseudo-terminal (not plugged yet); unplugged when the test ends."""
    device = PtyDevice(tmp_path / "ttyDEVICE")
    yield device
    await device.unplug()


@pytest.fixture
async def tcp_device(nursery):
    """A device on a TCP port of 127.0.0.1, serving until the test ends."""
    device = TcpDevice()
    await nursery.start(device.serve)
    return device
