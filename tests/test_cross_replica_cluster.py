"""Cross-replica coalescing on a real 3-master Redis Cluster.

The same burst as tests/test_cross_replica.py, with the replicas' claims
and logs spread over three masters: a claim and its log share one slot
(the request key is their hash tag), so the fenced append script runs on
one node, as it must on a cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cluster.names import FlightNames
from proxy.testing.fake_upstream import FakeUpstream
from tests.redis_cluster import RedisClusterNodes
from tests.replicas import all_idle, burst, cluster_policy, replicas

pytestmark = pytest.mark.timeout(90)


async def test_burst_over_three_replicas_on_a_redis_cluster(
    tmp_path: Path, fake: FakeUpstream, redis_cluster: RedisClusterNodes
) -> None:
    policy = cluster_policy(fake, redis_cluster.url, lease="4s", timeout="2s")
    policy["cluster"]["mode"] = "cluster"
    async with replicas(tmp_path, policy, 3) as procs:
        await burst(procs, fake, "cluster burst", prompts=30, requests=300)
        await all_idle(procs)
    # Every log left behind (they expire after stream_ttl) sits in its key's slot.
    logs = []
    for index in range(len(redis_cluster.nodes)):
        with redis_cluster.client(index) as client:
            logs += [name.decode() for name in client.scan_iter("llm-sidecar:*:events:*")]
    assert len(logs) == 30
    leases = []
    for log in logs:
        key = log[log.index("{") + 1 : log.index("}")]
        leases.append(FlightNames("llm-sidecar:", key).lease)
    assert redis_cluster.slots_of(*logs) == redis_cluster.slots_of(*leases)
    assert set(redis_cluster.nodes_of(*logs)) == {0, 1, 2}  # spread over every master
