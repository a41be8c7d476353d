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
