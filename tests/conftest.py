import pytest
from loguru import logger

from proxy import log
from proxy.config import ProxyConfig


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
