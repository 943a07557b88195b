"""Live reload: SIGHUP and the file watch, against a real proxy process.

A broken file is rejected with one line naming the file, the path and the
reason, and the old policy keeps serving; a valid one replaces it at once
and resizes the stages live; a burst of signals leaks nothing and the last
file wins; no request fails along the way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path, PosixPath
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.reload import Reloader
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, until
from tests.proxy_process import policy_for, run_proxy, sample, write_policy


def chat(prompt: str, stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


def limits(upstream: int, version: str) -> dict[str, Any]:
    return {
        "version": version,
        "stages": {
            "upstream": {"max_concurrency": upstream, "max_queue": 100, "queue_timeout": "20s"}
        },
    }


async def stream_ok(session: aiohttp.ClientSession, url: str, prompt: str) -> bool:
    async with session.post(f"{url}/chat/completions", json=chat(prompt)) as response:
        text = await response.text()
        return response.status == 200 and text.endswith("data: [DONE]\n\n") and "error" not in text


async def test_sighup_broken_then_valid_under_streaming_load(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.settings = replace(fake.settings, tokens=6, token_delay=0.003)
    async with run_proxy(tmp_path, policy_for(fake, limits(2, "v1"))) as px:
        await px.wait_ready()
        outcomes: list[bool] = []
        stop = asyncio.Event()

        async def client(number: int) -> None:
            async with aiohttp.ClientSession() as session:
                turn = 0
                while not stop.is_set():
                    turn += 1
                    outcomes.append(await stream_ok(session, px.api, f"load {number} {turn}"))

        clients = [asyncio.create_task(client(n)) for n in range(6)]
        try:
            await until(lambda: len(outcomes) >= 12)

            write_policy(px.policy_path, "upstreams: {fake: [unclosed\n")
            px.signal(signal.SIGHUP)
            await px.until_metrics(
                lambda m: sample(m, "llm_sidecar_reloads_total", result="failed") == 1
            )
            status = await px.status()
            assert status["policy"]["version"] == "v1"
            assert status["stages"]["upstream"]["max_concurrency"] == 2
            seen = len(outcomes)
            await until(lambda: len(outcomes) >= seen + 12)

            write_policy(px.policy_path, policy_for(fake, limits(5, "v2")))
            px.signal(signal.SIGHUP)
            status = await px.until_status(lambda s: s["policy"]["version"] == "v2")
            assert status["stages"]["upstream"]["max_concurrency"] == 5
            seen = len(outcomes)
            await until(lambda: len(outcomes) >= seen + 12)
        finally:
            stop.set()
            await asyncio.gather(*clients)

        assert outcomes and all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} failed"
        metrics = await px.metrics()
        assert sample(metrics, "llm_sidecar_reloads_total", result="ok") == 1
        assert sample(metrics, "llm_sidecar_reloads_total", result="failed") == 1
        [failed] = px.events("reload failed")
        assert failed["file"] == str(px.policy_path)
        assert failed["path"].startswith("line ")
        assert "invalid YAML" in failed["reason"]
        assert failed["version"] == "v1"
        [applied] = px.events("reload ok")
        assert (applied["version"], applied["previous"]) == ("v2", "v1")


async def test_a_grown_stage_admits_its_queue_at_once(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.hold_after = 1
    async with run_proxy(tmp_path, policy_for(fake, limits(2, "v1"))) as px:
        await px.wait_ready()
        requests = [asyncio.create_task(stream_ok(px.session, px.api, f"q{n}")) for n in range(6)]
        try:
            status = await px.until_status(lambda s: s["stages"]["upstream"]["queued"] == 4)
            assert status["stages"]["upstream"]["in_use"] == 2

            write_policy(px.policy_path, policy_for(fake, limits(5, "v2")))
            px.signal(signal.SIGHUP)
            status = await px.until_status(lambda s: s["policy"]["version"] == "v2")
            # Resized in the same step as the swap: the queue moved at once.
            assert status["stages"]["upstream"]["in_use"] == 5
            assert status["stages"]["upstream"]["queued"] == 1

            # A shrink lets the holders finish; it takes nothing from them.
            write_policy(px.policy_path, policy_for(fake, limits(1, "v3")))
            px.signal(signal.SIGHUP)
            status = await px.until_status(lambda s: s["policy"]["version"] == "v3")
            assert status["stages"]["upstream"]["in_use"] == 5
        finally:
            fake.release.set()
        async with asyncio.timeout(15):
            assert all(await asyncio.gather(*requests))
        status = await px.until_status(lambda s: not s["streams"] and not s["pumps"])
        assert status["stages"]["upstream"]["in_use"] == 0
        assert status["stages"]["upstream"]["queued"] == 0


async def test_twenty_sighups_in_two_seconds(fake: FakeUpstream, tmp_path: Path) -> None:
    async with run_proxy(tmp_path, policy_for(fake, limits(4, "v0"))) as px:
        await px.wait_ready()
        assert await stream_ok(px.session, px.api, "warm up")
        before = await px.until_status(lambda s: not s["pumps"])
        for number in range(1, 21):
            write_policy(px.policy_path, policy_for(fake, limits(number, f"v{number}")))
            px.signal(signal.SIGHUP)
            await asyncio.sleep(0.1)
        status = await px.until_status(lambda s: s["policy"]["version"] == "v20")
        assert status["stages"]["upstream"]["max_concurrency"] == 20
        assert await stream_ok(px.session, px.api, "after the burst")
        status = await px.until_status(lambda s: not s["pumps"] and not s["streams"])
        # Nothing leaked: no task per reload (keep-alive connections may
        # come and go, hence the slack), no slot held.
        assert status["tasks"] <= before["tasks"] + 2
        for stage in status["stages"].values():
            assert (stage["in_use"], stage["queued"]) == (0, 0)
        metrics = await px.metrics()
        # Reloads never overlap; signals that arrive during one fold into the next.
        assert 1 <= sample(metrics, "llm_sidecar_reloads_total", result="ok") <= 20
        assert sample(metrics, "llm_sidecar_reloads_total", result="failed") == 0
        assert px.events("reload ok")[-1]["version"] == "v20"


# -- the watch, in process -------------------------------------------------------------------


class _ReadCountingPath(PosixPath):
    """The policy path, counting reads: the watch reads the file once per poll."""

    reads = 0

    def read_bytes(self) -> bytes:
        self.reads += 1
        return super().read_bytes()


def _configmap(root: Path, name: str, text: str) -> None:
    """Lay out a file the way a Kubernetes ConfigMap volume does, and swap it."""
    data = root / f"..{name}"
    data.mkdir()
    (data / "policy.yaml").write_text(text, encoding="utf-8")
    link = root / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, root / "..data")  # the atomic swap the kubelet does
    if not (root / "policy.yaml").is_symlink():
        (root / "policy.yaml").symlink_to("..data/policy.yaml")


@pytest.mark.parametrize("same_mtime", [False, True])
async def test_the_watch_follows_a_configmap_swap(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path, same_mtime: bool
) -> None:
    watch = {"reload": {"watch": True, "interval": "20ms"}}
    proxy = await start_proxy({"version": "v1", **watch})
    rt = proxy.runtime
    first = yaml.safe_dump(policy_for(fake, {"version": "v1", **watch}))
    _configmap(tmp_path, "2024_01", first)
    path = _ReadCountingPath(tmp_path / "policy.yaml")
    reloader = Reloader(rt, path)
    task = asyncio.create_task(reloader.run())
    try:
        second = yaml.safe_dump(policy_for(fake, {"version": "v2", **limits(7, "v2"), **watch}))
        _configmap(tmp_path, "2024_02", second)
        if same_mtime:
            stamp = os.stat(tmp_path / "..2024_01" / "policy.yaml").st_mtime_ns
            os.utime(tmp_path / "..2024_02" / "policy.yaml", ns=(stamp, stamp))
        await until(lambda: rt.snapshot.version == "v2", timeout=5)
        assert rt.stages.upstream.stats().max_concurrency == 7

        # A broken file is tried once, counted once, and the old policy stays.
        _configmap(tmp_path, "2024_03", "routes: 3\n")
        registry = rt.metrics.registry

        def reloads(result: str) -> float | None:
            return registry.get_sample_value("llm_sidecar_reloads_total", {"result": result})

        await until(lambda: reloads("failed") == 1, timeout=5)
        assert rt.snapshot.version == "v2"
        # Ten more polls of the broken file pass without another attempt.
        polled = path.reads
        await until(lambda: path.reads >= polled + 10, timeout=5)
        assert (reloads("ok"), reloads("failed")) == (1, 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_reload_swaps_the_cache_when_its_settings_change(
    fake: FakeUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.policy import parse_policy
    from proxy.reload import apply_policy
    from tests.conftest import base_policy, merge, post

    route = {"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}
    policy = merge(base_policy(f"http://127.0.0.1:{fake.port}/v1"), {"routes": [route]})
    proxy = await start_proxy(policy, raw=True)
    rt = proxy.runtime
    body = {"model": "m", "messages": [{"role": "user", "content": "swap"}]}
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        await post(session, url, body)
        await rt.cache.flush()
        assert (await post(session, url, body))[1]["x-llm-sidecar"] == "hit"
        old = rt.cache
        same = parse_policy(yaml.safe_dump(policy), "same.yaml")
        apply_policy(rt, same)
        assert rt.cache is old  # nothing changed: the warm cache stays
        caplog.set_level(logging.INFO, logger="llm_sidecar.lifecycle")
        assert not [r for r in caplog.records if r.msg == "reload rebuilt cache"]
        changed = merge(policy, {"cache": {"max_bytes": "1MiB"}})
        apply_policy(rt, parse_policy(yaml.safe_dump(changed), "changed.yaml"))
        assert rt.cache is not old
        [rebuilt] = [r for r in caplog.records if r.msg == "reload rebuilt cache"]
        fields = rebuilt.fields  # type: ignore[attr-defined]
        assert (fields["old"]["max_bytes"], fields["new"]["max_bytes"]) == (256 * 2**20, 2**20)
        assert fields["new"]["stage"] == {"workers": 32, "max_queue": 1024}
        await until(lambda: not rt.retiring)
        # The new, empty cache misses once, then serves hits again.
        assert (await post(session, url, body))[1]["x-llm-sidecar"] == "lead"
        await rt.cache.flush()
        assert (await post(session, url, body))[1]["x-llm-sidecar"] == "hit"
    stats = old.stats()
    assert stats is not None and stats.in_lane == 0


def test_cache_settings_in_a_log_line_never_show_a_password() -> None:
    from proxy.policy import parse_policy
    from proxy.reload import cache_settings

    policy = {
        "upstreams": {"a": {"base_url": "http://x/v1"}},
        "cache": {"backend": "redis", "url": "redis://app:s3cret@redis:6379/0"},
        "routes": [{"match": {"path": "/v1/*"}, "upstream": "a"}],
    }
    settings = cache_settings(parse_policy(yaml.safe_dump(policy), "p.yaml").policy)
    assert settings["url"] == "redis://app:***@redis:6379/0"
    assert "s3cret" not in repr(settings)
