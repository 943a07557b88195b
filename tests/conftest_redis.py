"""The `redis_server` fixture: a real redis-server per test, stopped afterwards.

Registered from tests/conftest.py with `pytest_plugins = ["tests.conftest_redis"]`.
Fails, never skips, when redis-server is missing: `make test` installs it, and
a skipped Redis test would hide exactly the faults these tests exist for.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; `make test` installs it (Debian package)")
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()
