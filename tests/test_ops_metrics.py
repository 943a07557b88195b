"""Metrics, the live view, the access log and health, on an in-process proxy.

Each test's app has its own registry, so counts start at zero and are
asserted exactly where they cannot vary.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.metrics import Metrics
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, post, wait_idle, wait_readers
from tests.proxy_process import free_port, parse_metrics, sample

CACHED = {
    "routes": [
        {"match": {"path": "/v1/chat/completions"}, "upstream": "fake", "cache": {"ttl": "1h"}},
        {"match": {"path": "/v1/*"}, "upstream": "fake"},
    ]
}


def chat(prompt: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


def value(proxy: RunningProxy, name: str, **labels: str) -> float:
    return proxy.runtime.metrics.registry.get_sample_value(name, labels) or 0.0


async def scrape(session: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with session.get(proxy.base_url.removesuffix("/v1") + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


async def test_metrics_parse_and_move_as_requests_flow(
    start_proxy: StartProxy, fake: FakeUpstream
) -> None:
    proxy = await start_proxy(CACHED)
    url = proxy.base_url
    async with aiohttp.ClientSession() as session:
        empty = parse_metrics(await scrape(session, proxy))
        assert sample(empty, "llm_sidecar_stage_in_use", stage="upstream") == 0
        assert sample(empty, "llm_sidecar_requests_total", served="lead", status="200") == 0

        # lead, then hit, for one prompt
        for _ in range(2):
            status, _, _ = await post(session, f"{url}/chat/completions", chat("once"))
            assert status == 200
            await proxy.runtime.cache.flush()
        # one lead and one follower on a held stream
        fake.hold_after = 1
        pair = [
            asyncio.create_task(post(session, f"{url}/chat/completions", chat("pair", True)))
            for _ in range(2)
        ]
        await wait_readers(proxy, 2)
        live = parse_metrics(await scrape(session, proxy))
        assert sample(live, "llm_sidecar_stage_in_use", stage="upstream") == 1
        assert sample(live, "llm_sidecar_streams_in_flight") == 1
        fake.release.set()
        assert [status for status, _, _ in await asyncio.gather(*pair)] == [200, 200]
        # bypass, and a request the proxy refuses itself
        async with session.get(f"{url}/models") as response:
            assert response.status == 200
        async with session.post(f"{url}/chat/completions", data=b"{not json") as response:
            assert response.status == 400
        await wait_idle(proxy.runtime)

        samples = parse_metrics(await scrape(session, proxy))

    def requests(served: str, status: str) -> float:
        return sample(samples, "llm_sidecar_requests_total", served=served, status=status)

    assert requests("lead", "200") == 2
    assert requests("hit", "200") == 1
    assert requests("follow", "200") == 1
    assert requests("bypass", "200") == 1
    assert requests("none", "400") == 1
    upstream = "llm_sidecar_upstream_requests_total"
    assert sample(samples, upstream, route="0", status="200") == 2
    assert sample(samples, upstream, route="1", status="200") == 1
    assert sample(samples, "llm_sidecar_request_duration_seconds_count", served="lead") == 2
    assert sample(samples, "llm_sidecar_time_to_first_byte_seconds_count", served="follow") == 1
    # Every leader took a leader slot and an upstream slot; the follower a follower slot.
    assert sample(samples, "llm_sidecar_stage_wait_seconds_count", stage="leader") == 2
    assert sample(samples, "llm_sidecar_stage_wait_seconds_count", stage="upstream") == 2
    assert sample(samples, "llm_sidecar_stage_wait_seconds_count", stage="follower") == 1
    assert sample(samples, "llm_sidecar_request_bytes_total", served="lead") > 0
    assert sample(samples, "llm_sidecar_response_bytes_total", served="hit") > 0
    assert sample(samples, "llm_sidecar_cache_hits_total") == 1
    assert sample(samples, "llm_sidecar_cache_breaker_state", state="closed") == 1
    assert sample(samples, "llm_sidecar_stage_max_concurrency", stage="leader") == 64
    assert sample(samples, "llm_sidecar_policy_info", version=proxy.runtime.snapshot.version) == 1
    # The registry itself says the same (the scrape is just its text).
    assert value(proxy, "llm_sidecar_requests_total", served="lead", status="200") == 2


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.request_done("lead", 200, 0.01, 0.005, 10, 20)
    first.upstream_call(0, None)
    assert first.registry.get_sample_value(
        "llm_sidecar_requests_total", {"served": "lead", "status": "200"}
    )
    assert (
        first.registry.get_sample_value(
            "llm_sidecar_upstream_requests_total", {"route": "0", "status": "error"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "llm_sidecar_requests_total", {"served": "lead", "status": "200"}
        )
        is None
    )
    # An unknown `served` value cannot grow the label set.
    first.request_done("x-chosen-by-someone", 200, 0.01, None, 0, 0)
    assert first.registry.get_sample_value(
        "llm_sidecar_requests_total", {"served": "none", "status": "200"}
    )


async def test_status_is_a_live_view(proxy: RunningProxy, fake: FakeUpstream) -> None:
    fake.hold_after = 2
    base = proxy.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        readers = [
            asyncio.create_task(
                post(session, f"{proxy.base_url}/chat/completions", chat("watched", True))
            )
            for _ in range(3)
        ]
        await wait_readers(proxy, 3)
        async with asyncio.timeout(5):
            await fake.reached_hold.wait()
        async with session.get(f"{base}/status") as response:
            assert response.status == 200
            status = orjson.loads(await response.read())
        keys = [stream.key for stream in proxy.runtime.table]
        fake.release.set()
        await asyncio.gather(*readers)
    [stream] = status["streams"]
    # An opaque id, no part of the key: a guessed prompt's key is no match for it.
    assert "key" not in stream and len(stream["id"]) == 16
    assert all(c in "0123456789abcdef" for c in stream["id"])
    [key] = keys
    assert stream["id"][:6] not in key
    assert stream["readers"] == 3
    assert stream["events"] == 2
    assert stream["age_s"] >= 0
    assert status["policy"]["version"] == proxy.runtime.snapshot.version
    assert status["stages"]["upstream"] == {
        "in_use": 1,
        "queued": 0,
        "max_concurrency": 64,
        "max_queue": 1024,
        "queue_timeout": 60.0,
    }
    assert status["cache"]["hits"] == 0
    assert status["draining"] is False


async def test_one_access_line_per_request(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(
            session, f"{proxy.base_url}/chat/completions", chat("logged"), **{"x-request-id": "r1"}
        )
    assert status == 200
    [record] = [r for r in caplog.records if r.name == "llm_sidecar.access"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["request_id"] == "r1"
    assert fields["route"] == 0
    assert fields["served"] == "lead"
    assert (fields["status"], fields["upstream_status"]) == (200, 200)
    assert fields["duration_ms"] >= fields["ttfb_ms"] > 0
    assert fields["bytes_in"] > 0
    assert fields["bytes_out"] == int(headers["Content-Length"])
    assert fields["path"] == "/v1/chat/completions"


async def test_access_lines_can_be_turned_off(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy({"log": {"access": False}})
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as session:
        status, _, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("quiet"))
    assert status == 200
    assert not [r for r in caplog.records if r.name == "llm_sidecar.access"]
    assert value(proxy, "llm_sidecar_requests_total", served="lead", status="200") == 1


async def test_health_needs_neither_upstream_nor_redis(start_proxy: StartProxy) -> None:
    dead = free_port()
    proxy = await start_proxy(
        {
            "upstreams": {"fake": {"base_url": f"http://127.0.0.1:{dead}/v1"}},
            "cache": {"backend": "redis", "url": f"redis://127.0.0.1:{dead}/0"},
        }
    )
    base = proxy.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/metrics", "/status"):
            async with asyncio.timeout(2), session.get(base + path) as response:
                assert response.status == 200, path
        proxy.runtime.draining = True
        async with session.get(base + "/readyz") as response:
            assert response.status == 503
        async with session.get(base + "/healthz") as response:
            assert response.status == 200
