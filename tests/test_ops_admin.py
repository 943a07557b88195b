"""The admin listener: operator endpoints on their own address.

With `admin:` in the policy, /healthz, /readyz, /metrics and /status answer
on the admin address only (the API port answers them 404), and through a
drain the admin listener stays up to report 503 from /readyz while the API
listener has already closed.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from proxy.policy import PolicyError, parse_policy
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import until
from tests.proxy_process import free_port, policy_for, run_proxy
from tests.test_ops_shutdown import read_stream, refused


def test_admin_is_off_by_default_and_validated() -> None:
    base = (
        "upstreams: {u: {base_url: 'http://x/v1'}}\n"
        "routes: [{match: {path: '/v1/*'}, upstream: u}]\n"
    )
    assert parse_policy(base, "p.yaml").policy.admin is None
    admin = parse_policy(base + "admin: {port: 9901}\n", "p.yaml").policy.admin
    assert admin is not None and (admin.host, admin.port) == ("127.0.0.1", 9901)
    with pytest.raises(PolicyError, match=r"admin\.port"):
        parse_policy(base + "admin: {port: 70000}\n", "p.yaml")


async def test_admin_listener_serves_probes_through_the_drain(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.hold_after = 2
    admin_port = free_port()
    policy = policy_for(
        fake,
        {
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "shutdown": {"accept_delay": "200ms", "drain_timeout": "10s"},
        },
    )
    async with run_proxy(tmp_path, policy) as px:
        await px.wait_ready()  # on the admin port
        for path in ("/healthz", "/readyz", "/metrics", "/status"):
            async with px.session.get(f"{px.url}{path}") as response:
                assert response.status == 404
                assert response.headers["x-llm-sidecar"] == "error"
                assert (await response.json())["error"]["code"] == "not_found"
        # Log lines are written in batches just after the fact: wait for it.
        await until(lambda: bool(px.events("start")))
        [start] = px.events("start")
        assert (start["admin_host"], start["admin_port"]) == ("127.0.0.1", admin_port)

        stream = asyncio.create_task(read_stream(px.session, px.api, "held through the drain"))
        await until(lambda: fake.in_flight == 1)
        px.signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            while not await refused(px):  # the API listener closed ...
                await asyncio.sleep(0.02)
        # ... and the admin one still tells the truth.
        assert (await px.get("/readyz"))[0] == 503
        assert (await px.get("/healthz"))[0] == 200
        fake.release.set()
        async with asyncio.timeout(10):
            events = await stream
        assert events[-1] == b"data: [DONE]\n"
        assert await px.wait_exit() == 0
