"""Real Redis for tests: `redis_server` (one server per test) and `redis_cluster`
(a 3-master Redis Cluster, started once per session, healthy and empty for
each test).

Registered from tests/conftest.py with `pytest_plugins = ["tests.conftest_redis"]`.
Fails, never skips, when redis-server or redis-cli is missing: `make test`
installs them, and a skipped Redis test would hide exactly the faults these
tests exist for.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.redis_cluster import RedisClusterNodes
from tests.redis_server import RedisServer


def _require(executable: str) -> None:
    if shutil.which(executable) is None:
        pytest.fail(f"{executable} is not installed; `make test` installs it (Debian package)")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    _require("redis-server")
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisClusterNodes]:
    """Built once: `redis-cli --cluster create` alone takes 2 to 4 s."""
    _require("redis-server")
    _require("redis-cli")
    cluster = RedisClusterNodes()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterNodes) -> Iterator[RedisClusterNodes]:
    """The session's cluster, every node up, `cluster_state:ok`, no keys.

    A test may pause or kill nodes: they are resumed or restarted as it ends, while Redis still
    counts them as merely unreachable (a node unreachable past
    cluster-node-timeout, 15 s, is failed, and a failed master with slots
    stays failed for twice that), so the next test's wait stays short.
    """
    cluster = redis_cluster_session
    cluster.heal()
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            node.resume()
            if not node.running:
                node.restart()
