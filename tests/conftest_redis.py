"""The `redis_server` fixture: a real redis-server per test, stopped afterwards.

Registered from tests/conftest.py with `pytest_plugins = ["tests.conftest_redis"]`.
Skips the test when redis-server is not installed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()
