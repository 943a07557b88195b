"""The `cluster:` block, `cache.mode` and the hash-tagged Redis names: pure checks.

The behaviour on a real Redis Cluster is in tests/test_cache_cluster.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.cache.factory import cache_problems
from proxy.policy import ClusterSettings, Policy, PolicyError, parse_policy
from proxy.redis_client import make_client, url_problem
from proxy.redis_names import redis_name

BASE: dict[str, Any] = {
    "upstreams": {"a": {"base_url": "http://x/v1"}},
    "routes": [{"match": {"path": "/v1/*"}, "upstream": "a"}],
}


def _policy(**sections: Any) -> Policy:
    return parse_policy(yaml.safe_dump({**BASE, **sections}), "p.yaml").policy


def _problems(**sections: Any) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        _policy(**sections)
    return list(info.value.problems)


def test_cluster_block_defaults_leave_the_feature_off() -> None:
    cluster = _policy().cluster
    assert cluster == ClusterSettings(
        coalesce_across_replicas=False,
        url=None,
        password_env=None,
        mode="single",
        lease=5.0,
        stream_ttl=30.0,
        max_stream_bytes=16 * 1024 * 1024,
        timeout=0.2,
    )
    assert cluster.max_stream_bytes == _policy().stream.max_log_bytes
    assert _policy().cache.mode == "single"


def test_cluster_block_reads_units() -> None:
    cluster = _policy(
        cache={"backend": "redis", "mode": "cluster"},
        cluster={
            "coalesce_across_replicas": True,
            "lease": "2s",
            "stream_ttl": "1m",
            "max_stream_bytes": "4MiB",
            "timeout": "150ms",
        },
    ).cluster
    assert (cluster.lease, cluster.stream_ttl, cluster.max_stream_bytes, cluster.timeout) == (
        2.0,
        60.0,
        4 * 1024 * 1024,
        0.15,
    )


@pytest.mark.parametrize(
    "sections",
    [
        {"cache": {"backend": "redis"}, "cluster": {"coalesce_across_replicas": True}},
        {
            "cluster": {
                "coalesce_across_replicas": True,
                "url": "redis://redis:6379/0",
                "password_env": "CLUSTER_PASSWORD",
                "mode": "cluster",
            }
        },
    ],
    ids=["the-cache-redis", "its-own-url"],
)
def test_enabled_with_a_redis_to_talk_to(sections: dict[str, Any]) -> None:
    assert _policy(**sections).cluster.coalesce_across_replicas


def test_enabled_without_any_redis_is_refused() -> None:
    assert _problems(cluster={"coalesce_across_replicas": True}) == [
        (
            "cluster.coalesce_across_replicas",
            "needs a Redis: set cluster.url, or cache.backend: redis to share the cache's",
        )
    ]


@pytest.mark.parametrize(
    ("cluster", "path", "reason"),
    [
        ({"lease": 0}, "cluster.lease", "must be above 0"),
        ({"timeout": "0s"}, "cluster.timeout", "must be above 0"),
        ({"max_stream_bytes": 0}, "cluster.max_stream_bytes", "greater than 0"),
        ({"lease": "1s", "timeout": "1s"}, "cluster.timeout", "shorter than cluster.lease"),
        ({"url": "http://redis:6379"}, "cluster.url", "redis://, rediss:// or unix://"),
        ({"mode": "sharded"}, "cluster.mode", "'single' or 'cluster'"),
        ({"coalesce": True}, "cluster.coalesce", "unknown key"),
    ],
)
def test_bad_cluster_settings_name_the_field(
    cluster: dict[str, Any], path: str, reason: str
) -> None:
    [(where, why)] = _problems(cluster=cluster)
    assert where == path and reason in why, why


@pytest.mark.parametrize("prefix", ["llm-{sidecar}:", "a{", "b}"])
def test_a_brace_in_the_key_prefix_is_refused(prefix: str) -> None:
    [(where, why)] = _problems(cache={"key_prefix": prefix})
    assert where == "cache.key_prefix" and "{ or }" in why


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://10.0.0.1:7000", None),
        ("redis://10.0.0.1:7000/0", None),
        ("rediss://:secret@redis.example:6380/0", None),
        ("redis://10.0.0.1:7000/3", "only database 0"),
        ("unix:///run/redis.sock", "over TCP"),
        ("http://10.0.0.1:7000", "redis://"),
    ],
)
def test_cluster_urls(url: str, problem: str | None) -> None:
    found = url_problem(url, "cluster")
    assert (found is None) if problem is None else (found is not None and problem in found)
    assert "secret" not in (found or "")


def test_single_mode_keeps_databases_and_sockets() -> None:
    assert url_problem("redis://10.0.0.1:6379/3", "single") is None
    assert url_problem("unix:///run/redis.sock", "single") is None


def test_cache_problems_check_the_url_for_the_mode() -> None:
    policy = _policy(cache={"backend": "redis", "mode": "cluster", "url": "redis://h:7000/2"})
    [(where, why)] = cache_problems(policy, {})
    assert where == "cache.url" and "only database 0" in why


async def test_the_mode_picks_the_client() -> None:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    single = make_client("redis://127.0.0.1:1/0", mode="single", password=None, timeout=0.1)
    cluster = make_client("redis://127.0.0.1:1/0", mode="cluster", password=None, timeout=0.1)
    try:
        assert type(single) is Redis and isinstance(cluster, RedisCluster)
    finally:
        await single.aclose()
        await cluster.aclose()


def test_redis_names_put_the_request_key_in_the_hash_tag() -> None:
    key = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert redis_name("llm-sidecar:", key) == f"llm-sidecar:{{{key}}}"
    assert redis_name("llm-sidecar:", key, "claim") == f"llm-sidecar:{{{key}}}:claim"
    assert redis_name("p:", key, "events", "tok") == f"p:{{{key}}}:events:tok"
    assert redis_name("", key) == f"{{{key}}}"
