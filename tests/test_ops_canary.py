"""The secret canary: a caller's key and the upstream key never leak.

A real proxy process at debug level serves a caller who sends a known
secret in `Authorization`, with the upstream's own key (another known
secret) injected from `api_key_env`. Across successes, cache hits, streams,
relays, errors of every origin, requests the HTTP parser refuses (a control
byte in the credential, a bare LF, a header or request line over the limit,
a broken chunked body), the credential passed in the query string, and
reloads good and bad, neither secret appears in any log line, in
`/metrics`, in `/status`, or in any response.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.testing.fake_upstream import FakeUpstream
from tests.proxy_process import policy_for, run_proxy, write_policy

CALLER_SECRET = "sk-canary-caller-3f9a1c77e2d04b"
UPSTREAM_SECRET = "sk-canary-upstream-8b2e6d10aa5c91"
SECRETS = (CALLER_SECRET, UPSTREAM_SECRET, "3f9a1c77e2d04b", "8b2e6d10aa5c91")


def canary_policy(fake: FakeUpstream, version: str) -> dict[str, Any]:
    return policy_for(
        fake,
        {
            "version": version,
            "log": {"level": "debug"},
            "upstreams": {
                "fake": {"api_key_env": "LLM_CANARY_UPSTREAM_KEY"},
                # Azure's paths, to the same fake: the caller's `api-key` is a credential too.
                "azure": {
                    "base_url": f"http://127.0.0.1:{fake.port}",
                    "api_key_env": "LLM_CANARY_UPSTREAM_KEY",
                },
            },
            "routes": [
                {"match": {"path": "/openai/*"}, "upstream": "azure", "cache": {"ttl": "1h"}},
                {
                    "match": {"path": "/v1/chat/completions"},
                    "upstream": "fake",
                    "cache": {"ttl": "1h"},
                },
                {"match": {"path": "/v1/*"}, "upstream": "fake"},
            ],
        },
    )


# Requests aiohttp's parser refuses; its own error text would quote these bytes.
MALFORMED = [
    b"GET /v1/models?key=%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\x01\r\n\r\n",
    b"GET /v1/models HTTP/1.1\nHost: x\nAuthorization: Bearer %s\n\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s" + b"A" * 9000 + b"\r\n\r\n",
    b"GET /v1/models?api_key=%s" + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Api-Key : %s\r\n\r\n",
    b"POST /v1/chat/completions?key=%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n%s\r\n0\r\n\r\n",
    # The credential in the path itself: a scheme-relative target's userinfo, a path parameter.
    b"GET //u:%s@evil/v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: \x01\r\n\r\n",
    b"GET /v1/models;key=%s HTTP/1.1\r\nHost: x\r\nX-Bad: \x01\r\n\r\n",
]


async def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes (no client library to fix them up); everything the proxy answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def chat(prompt: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


async def test_no_secret_in_logs_metrics_status_or_bodies(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.settings = replace(fake.settings, require_key=UPSTREAM_SECRET)
    env = {"LLM_CANARY_UPSTREAM_KEY": UPSTREAM_SECRET, "LLM_SIDECAR_LOG_LEVEL": "debug"}
    seen: list[str] = []
    async with run_proxy(tmp_path, canary_policy(fake, "c1"), env) as px:
        await px.wait_ready()
        auth = {"Authorization": f"Bearer {CALLER_SECRET}", "api-key": CALLER_SECRET}

        async def call(method: str, path: str, echoed: bool = False, **kwargs: Any) -> int:
            url = f"{px.url}{path}" if path.startswith("/openai/") else f"{px.api}{path}"
            async with px.session.request(method, url, headers=auth, **kwargs) as response:
                if not echoed:  # the fake's 404 quotes the path the caller sent it
                    seen.append(str(response.headers))
                    seen.append(await response.text())
                return response.status

        statuses = [
            await call("POST", "/chat/completions", json=chat("one")),  # lead
            await call("POST", "/chat/completions", json=chat("one")),  # hit (once stored)
            await call("POST", "/chat/completions", json=chat("two", stream=True)),
            await call("GET", "/models"),  # relayed
            await call(  # Azure's own path, with the key also in `api-key`
                "POST",
                "/openai/deployments/d1/chat/completions?api-version=2024-10-21",
                json=chat("azure"),
            ),
            await call("POST", "/chat/completions", data=b"{broken"),  # 400 from the proxy
            await call("GET", "/no/such/thing"),  # 404 from the upstream
        ]
        fake.settings = replace(fake.settings, error_status=500)
        statuses.append(await call("POST", "/chat/completions", json=chat("three")))
        fake.settings = replace(fake.settings, error_status=None, require_key="another-key")
        statuses.append(await call("POST", "/chat/completions", json=chat("four")))  # 401
        fake.settings = replace(fake.settings, require_key=UPSTREAM_SECRET)
        # The caller's credential in the query string: a tenant, never logged.
        path = f"/chat/completions?api-version=1&key={CALLER_SECRET}"
        statuses.append(await call("POST", path, json=chat("five")))
        statuses.append(await call("GET", f"/models?api-key={CALLER_SECRET}"))
        # A credential as a path parameter, relayed as sent: the access line drops it.
        statuses.append(await call("GET", f"/models;key={CALLER_SECRET}", echoed=True))
        # Userinfo after `//`: as the whole target (no route: 404, no access line),
        # and inside a /v1 path (relayed, the fake's 404 quotes it): logged without it.
        for target in (f"//u:{CALLER_SECRET}@evil/v1/models", f"/v1//u:{CALLER_SECRET}@evil/x"):
            head = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            answer = await exchange(px.port, head.encode())
            statuses.append(int(answer.split(b" ", 2)[1]))
            if target.startswith("//"):
                seen.append(answer.decode("latin-1"))
        assert statuses[:5] == [200, 200, 200, 200, 200]
        assert statuses[5:] == [400, 404, 500, 401, 200, 200, 404, 404, 404]
        for template in MALFORMED:
            answer = await exchange(px.port, template.replace(b"%s", CALLER_SECRET.encode()))
            assert answer.split(b" ", 2)[1] == b"400"
            seen.append(answer.decode("latin-1"))
        # The key did go upstream, only upstream.
        assert fake.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"

        write_policy(px.policy_path, "upstreams: {fake: {api_key_env: [1]}}\n")
        px.signal(signal.SIGHUP)
        await px.until_metrics(
            lambda m: any(k[0] == "llm_sidecar_reloads_total" and v == 1 for k, v in m.items())
        )
        write_policy(px.policy_path, canary_policy(fake, "c2"))
        px.signal(signal.SIGHUP)
        await px.until_status(lambda s: s["policy"]["version"] == "c2")

        seen.append((await px.get("/metrics"))[1].decode())
        seen.append((await px.get("/status"))[1].decode())
        px.signal(signal.SIGTERM)
        assert await px.wait_exit() == 0

    lines = px.log_lines()  # every line is JSON, at every level
    assert {line["level"] for line in lines} >= {"info", "error"}
    access = [line for line in lines if line["logger"] == "llm_sidecar.access"]
    assert len(access) == 13
    assert {"/v1/models", "/v1//evil/x"} <= {line["path"] for line in access}
    refused = [line for line in lines if line["msg"] == "malformed request"]
    assert len(refused) == len(MALFORMED)
    # Method and path only: the query string (credential and all) is cut.
    assert {(line["method"], line["path"]) for line in refused} == {
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "//evil/v1/models"),
    }
    assert px.events("reload failed") and px.events("reload ok")
    seen.append(px.log_text())
    for text in seen:
        for secret in SECRETS:
            assert secret not in text
