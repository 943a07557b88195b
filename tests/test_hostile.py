"""Hostile callers against a real proxy process: the matrix of issue 12.

One proxy process serves the whole module, in front of a recording
upstream (a real aiohttp server that records each request-target exactly
as it arrived) and beside an "evil" server that must never be contacted.
Requests go out over raw sockets, so nothing between the test and the
proxy normalises them. Each kind of fault has a test; each checks the log
lines written during it: no credential, no traceback.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from proxy.keys import request_key, tenant_of
from tests.proxy_process import ProxyProcess, free_port, run_proxy, sample

pytestmark = pytest.mark.asyncio(loop_scope="module")

CALLER_SECRET = "sk-hostile-caller-5e2b9c04d1"
QUERY_SECRET = "sk-hostile-query-a7f3360e81"
UPSTREAM_SECRET = "sk-hostile-upstream-0c9d4be2f7"
SECRETS = (CALLER_SECRET, QUERY_SECRET, UPSTREAM_SECRET, "5e2b9c04d1", "a7f3360e81", "0c9d4be2f7")
AUTH = f"Bearer {CALLER_SECRET}"
MAX_ENTRY = 64 * 1024


@dataclass
class Seen:
    method: str
    target: str  # the request-target exactly as it arrived (path and query)
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """A real upstream that records what reaches it and answers plain JSON."""

    seen: list[Seen] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(Seen(request.method, request.raw_path, headers, body))
        if b'"hold"' in body:
            await self.gate.wait()
        if b'"big"' in body:  # an answer over the cache's entry bound
            vector = [0.125] * (MAX_ENTRY // 4)
            answer = {"object": "list", "data": [{"index": 0, "embedding": vector}]}
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        # A whole answer of the endpoint's own type: only such an answer is cached.
        if request.path.endswith("/embeddings"):
            vectors = {"object": "list", "data": [{"index": 0, "embedding": [0.5]}]}
            return web.Response(body=orjson.dumps(vectors), content_type="application/json")
        message = {"role": "assistant", "content": "ok"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        answer = {"id": f"r{len(self.seen)}", "object": "chat.completion", "choices": [choice]}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def close(self) -> None:
        self.gate.set()
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Rig:
    px: ProxyProcess
    upstream: Recorder
    evil: Recorder
    log_mark: int = 0

    def mark(self) -> None:
        self.log_mark = len(self.px.log_text())

    def new_log(self) -> str:
        return self.px.log_text()[self.log_mark :]


def rig_policy(upstream: Recorder, admin_port: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{upstream.port}/v1"
    return {
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "log": {"level": "debug"},
        "limits": {"header_timeout": "500ms", "body_timeout": "500ms", "idle_timeout": "5s"},
        "cache": {"max_entry_bytes": MAX_ENTRY},
        "upstreams": {"rec": {"base_url": base, "api_key_env": "LLM_HOSTILE_UPSTREAM_KEY"}},
        "routes": [
            {
                "match": {"path": "/v1/chat/completions"},
                "upstream": "rec",
                "cache": {"ttl": "1h"},
                "vary_headers": ["OpenAI-Organization"],
            },
            {"match": {"path": "/v1/embeddings"}, "upstream": "rec", "cache": {"ttl": "1h"}},
            {"match": {"path": "/v1/*"}, "upstream": "rec"},
        ],
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    upstream, evil = Recorder(), Recorder()
    await upstream.start()
    await evil.start()
    tmp: Path = tmp_path_factory.mktemp("hostile")
    env = {"LLM_HOSTILE_UPSTREAM_KEY": UPSTREAM_SECRET}
    try:
        async with run_proxy(tmp, rig_policy(upstream, free_port()), env) as px:
            await px.wait_ready()
            yield Rig(px, upstream, evil)
    finally:
        await upstream.close()
        await evil.close()


@pytest_asyncio.fixture(loop_scope="module")
async def hostile(rig: Rig) -> AsyncIterator[Rig]:
    """The shared rig, with a check after each test of what it logged."""
    rig.mark()
    rig.upstream.seen.clear()
    rig.evil.seen.clear()
    yield rig
    assert rig.evil.seen == []
    text = rig.new_log()
    for secret in SECRETS:
        assert secret not in text
    assert "Traceback" not in text and '"level":"error"' not in text
    for line in text.splitlines():
        orjson.loads(line)  # every line is one JSON object


async def send(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One raw request, as bytes on a socket; the status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        async with asyncio.timeout(timeout):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split(" ")[1]), headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def request(method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: sidecar", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat(content: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}]})


# -- 1. paths ------------------------------------------------------------------------------------

ESCAPES = [
    ("GET", "/v1/../_admin/x"),
    ("GET", "/v1/%2e%2e/_admin"),
    ("GET", "/v1/%2E%2E%2F_admin"),
    ("GET", "/v1/..%2f..%2f_admin"),
    ("GET", "/v1/.%2e/.%2e/_admin"),
    ("GET", "/v1/models/../../_admin?key=x"),
    ("GET", "/v1/..;/_admin"),
    ("GET", "/v1/%252e%252e/_admin"),
    ("GET", "/v1/..\\_admin"),
    ("GET", "/v1/%5c..%5c_admin"),
    ("GET", "/v1/models%00.json"),
    ("GET", "/v1/a%0d%0aX-Injected:%201"),
    ("POST", "/v1/chat/completions/../../../_admin"),
    ("POST", "/v1/chat/%2e%2e/%2e%2e/%2e%2e/_admin"),
    ("POST", "/v1/embeddings/..%2F..%2F..%2F_admin"),
    # Not UTF-8 once decoded (overlong `.` and `/`), and look-alike separators.
    ("GET", "/v1/rec/%c0%ae%c0%ae/%c0%ae%c0%ae/_admin"),
    ("GET", "/v1/%c0%ae%c0%ae%c0%af_admin"),
    ("GET", "/v1/files/%ff"),
    ("GET", "/v1/..%ef%bc%8f_admin"),
    ("GET", "/v1/..%e2%88%95_admin"),
    ("GET", "/v1/..%e2%a7%b8_admin"),
    ("POST", "/v1/chat/%ef%bc%8e%ef%bc%8e/%ef%bc%8e%ef%bc%8e/_admin"),
]


@pytest.mark.parametrize(("method", "target"), ESCAPES)
async def test_a_path_leaving_v1_is_a_400_and_goes_nowhere(
    hostile: Rig, method: str, target: str
) -> None:
    raw = request(method, target, chat("x") if method == "POST" else b"", Authorization=AUTH)
    status, headers, body = await send(hostile.px.port, raw)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == "invalid_path"
    assert hostile.upstream.seen == []


NORMALISED = [
    ("GET", "/v1/models/meta-llama%2FLlama-3.1-8B", "/v1/models/meta-llama/Llama-3.1-8B"),
    ("GET", "/v1//models/./gpt-4o", "/v1/models/gpt-4o"),
    ("GET", "/v1/files/a%3fb?purpose=x%2By&q=1+2", "/v1/files/a%3Fb?purpose=x%2By&q=1+2"),
    ("GET", "/v1/files/100%25", "/v1/files/100%25"),
    ("POST", "/v1/ch%61t/completions", "/v1/chat/completions"),
    ("POST", "/v1/chat/../chat/completions", "/v1/chat/completions"),
]


@pytest.mark.parametrize(("method", "target", "forwarded"), NORMALISED)
async def test_the_upstream_gets_the_canonical_path_exactly(
    hostile: Rig, method: str, target: str, forwarded: str
) -> None:
    body = chat(f"normalised {target}") if method == "POST" else b""
    status, _, _ = await send(hostile.px.port, request(method, target, body))
    assert status == 200
    [seen] = hostile.upstream.seen
    assert (seen.method, seen.target) == (method, forwarded)
    # The injected key went to the configured upstream, the only place it goes.
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"


async def test_only_the_configured_upstream_host_is_contacted(hostile: Rig) -> None:
    evil = f"127.0.0.1:{hostile.evil.port}"
    attempts = [
        request("GET", f"http://{evil}/v1/models"),  # absolute form
        request("GET", "/v1/models").replace(b"Host: sidecar", b"Host: " + evil.encode()),
        request("GET", f"/v1/@{evil}/models"),
        request("GET", "/v1/models", X_Forwarded_Host=evil, Forwarded=f"host={evil}"),
        request("POST", f"http://{evil}/v1/chat/completions", chat("absolute")),
    ]
    for raw in attempts:
        status, _, _ = await send(hostile.px.port, raw)
        assert status in (200, 404), raw
    assert hostile.evil.seen == []
    assert len(hostile.upstream.seen) == len(attempts)
    assert all(
        s.headers["host"] == f"127.0.0.1:{hostile.upstream.port}" for s in hostile.upstream.seen
    )


async def test_a_compressed_relayed_body_reaches_the_upstream_whole(hostile: Rig) -> None:
    # aiohttp inflates it; announcing the wire length upstream made the
    # upstream wait for bytes that never came (found by the intake fuzz).
    body = b'{"purpose": "batch"}'
    packed = gzip.compress(body)
    raw = request("POST", "/v1/files", packed, Content_Encoding="gzip")
    status, _, _ = await send(hostile.px.port, raw, timeout=5)
    assert status == 200
    [seen] = hostile.upstream.seen
    assert seen.body == body and "content-encoding" not in seen.headers


# -- 2. credentials in logs ----------------------------------------------------------------------

MALFORMED = [
    b"GET /v1/models?key=%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\x01\r\n\r\n",
    b"GET /v1/models HTTP/1.1\nHost: x\nAuthorization: Bearer %s\n\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s" + b"A" * 9000 + b"\r\n\r\n",
    b"GET /v1/models?api-key=%s" + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nApi-Key: %s\r\nTransfer-Encoding: chunked"
    b"\r\n\r\nzz\r\n%s\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("template", MALFORMED)
async def test_malformed_requests_log_method_and_path_only(hostile: Rig, template: bytes) -> None:
    raw = template.replace(b"%s", QUERY_SECRET.encode())
    status, headers, body = await send(hostile.px.port, raw)
    assert status == 400 and headers["content-type"] == "application/json"
    assert QUERY_SECRET not in body.decode()
    assert hostile.upstream.seen == []
    # (the fixture checks the log for the secret)


# -- 5. the key covers the query string and vary_headers ---------------------------------------


async def test_the_query_string_and_vary_headers_are_in_the_key(hostile: Rig) -> None:
    port = hostile.px.port
    body = chat("keyed by query")

    async def served(target: str, **headers: str) -> str:
        status, got, _ = await send(port, request("POST", target, body, **headers))
        assert status == 200
        return got["x-llm-sidecar"]

    path = "/v1/chat/completions"
    assert await served(f"{path}?api-version=A") == "lead"
    assert await served(f"{path}?api-version=B") == "lead"
    assert await served(f"{path}?api-version=A") == "hit"
    # A credential in the query is the tenant's: another one gets no hit.
    assert await served(f"{path}?key={QUERY_SECRET}") == "lead"
    assert await served(f"{path}?key={QUERY_SECRET}x") == "lead"
    assert await served(f"{path}?key={QUERY_SECRET}") == "hit"
    # vary_headers: another organisation is another answer.
    assert await served(path, OpenAI_Organization="org-a") == "lead"
    assert await served(path, OpenAI_Organization="org-b") == "lead"
    assert await served(path, OpenAI_Organization="org-a") == "hit"
    targets = [s.target for s in hostile.upstream.seen]
    assert targets == [
        f"{path}?api-version=A",
        f"{path}?api-version=B",
        path,  # the proxy injects its own key: query credentials stay here
        path,
        path,
        path,
    ]
    metrics = (await hostile.px.get("/metrics"))[1].decode()
    status = (await hostile.px.get("/status"))[1].decode()
    assert QUERY_SECRET not in metrics + status


# -- 6. deep JSON --------------------------------------------------------------------------------

DEEP = [
    b'{"model":"m","messages":[],"x":' + b"[" * 300 + b"]" * 300 + b"}",
    b'{"model":"m","messages":[],"user":' + b"[" * 300 + b"]" * 300 + b"}",
    b'{"model":"m","messages":[],"x":' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}",
    b'{"model":"m","messages":[],"x":' + b"[" * 2000 + b"]" * 2000 + b"}",
]


@pytest.mark.parametrize("body", DEEP)
async def test_deep_json_is_a_400(hostile: Rig, body: bytes) -> None:
    status, headers, answer = await send(
        hostile.px.port, request("POST", "/v1/chat/completions", body)
    )
    assert status == 400 and headers["content-type"] == "application/json"
    assert orjson.loads(answer)["error"]["type"] == "invalid_request_error"
    assert hostile.upstream.seen == []


# -- 8. operator endpoints -----------------------------------------------------------------------


async def test_operator_endpoints_answer_on_the_admin_listener_only(hostile: Rig) -> None:
    px = hostile.px
    for path in ("/status", "/metrics", "/healthz", "/readyz"):
        status, _, _ = await send(px.port, request("GET", path))
        assert status == 404, path
        assert (await px.get(path))[0] == 200, path


async def test_status_shows_no_key_material(hostile: Rig) -> None:
    prompt = {"model": "m", "messages": [{"role": "user", "content": "hold"}]}
    raw = request("POST", "/v1/chat/completions", orjson.dumps(prompt), Authorization=AUTH)
    hostile.upstream.gate.clear()
    caller = asyncio.create_task(send(hostile.px.port, raw))
    try:
        current = await hostile.px.until_status(lambda s: len(s["streams"]) == 1)
    finally:
        hostile.upstream.gate.set()
        status, _, _ = await caller
    assert status == 200
    key = request_key(
        tenant_of(AUTH),
        "rec",
        "POST",
        "/v1/chat/completions",
        prompt,
        ("stream", "stream_options", "user"),
        vary=[None],
    )
    text = orjson.dumps(current).decode()
    assert not any(key[i : i + 8] in text for i in range(len(key) - 8))
    assert "source" not in current["policy"] and str(hostile.px.policy_path) not in text


# -- 9. slow callers -----------------------------------------------------------------------------


async def test_slow_callers_get_408_and_hold_nothing(hostile: Rig) -> None:
    port = hostile.px.port
    head_only = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bear"
    body_stall = (
        request("POST", "/v1/chat/completions", b"").replace(
            b"Content-Length: 0", b"Content-Length: 100"
        )
        + b'{"model":'
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(*(send(port, raw) for raw in [head_only, body_stall] * 10))
    elapsed = loop.time() - started
    assert all(status == 408 for status, _, _ in results)
    assert elapsed < 5  # 500 ms timeouts, with room for a loaded machine
    current = await hostile.px.until_status(
        lambda s: all(v["in_use"] == v["queued"] == 0 for v in s["stages"].values())
    )
    assert current["streams"] == []
    assert hostile.upstream.seen == []


# -- 11. one huge answer -------------------------------------------------------------------------


async def test_an_oversize_answer_is_served_not_cached_and_harms_nothing(hostile: Rig) -> None:
    port = hostile.px.port
    big = orjson.dumps({"model": "e", "input": "big"})
    small = orjson.dumps({"model": "e", "input": "small"})
    before = await hostile.px.metrics()
    answers = []
    for _ in range(2):
        status, headers, body = await send(port, request("POST", "/v1/embeddings", big))
        assert status == 200 and len(body) > MAX_ENTRY
        answers.append((headers["x-llm-sidecar"], len(orjson.loads(body)["data"][0]["embedding"])))
    assert answers == [("lead", MAX_ENTRY // 4)] * 2  # served whole, never from the cache
    for served in ("lead", "hit"):
        _, headers, _ = await send(port, request("POST", "/v1/embeddings", small))
        assert headers["x-llm-sidecar"] == served
    after = await hostile.px.metrics()
    grew = sample(after, "llm_sidecar_cache_store_oversize_total") - sample(
        before, "llm_sidecar_cache_store_oversize_total"
    )
    assert grew == 2
    assert sample(after, "llm_sidecar_cache_breaker_state", state="closed") == 1


# -- follow-up: aiohttp's own errors are the proxy's -----------------------------------------

OWN_ERRORS = [
    pytest.param(request("CONNECT", "evil.example:443"), 404, id="connect"),
    pytest.param(request("OPTIONS", "*"), 404, id="options-star"),
    pytest.param(
        request("POST", "/v1/chat/completions", chat("x"), Expect=CALLER_SECRET), 417, id="expect"
    ),
    pytest.param(request("GET", "/v1/models", Expect=CALLER_SECRET), 417, id="expect-relayed"),
]


@pytest.mark.parametrize(("raw", "status"), OWN_ERRORS)
async def test_aiohttp_errors_are_openai_style_and_echo_nothing(
    hostile: Rig, raw: bytes, status: int
) -> None:
    got, headers, body = await send(hostile.px.port, raw)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert headers["x-llm-sidecar"] == "error"
    assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert CALLER_SECRET not in body.decode()
    assert hostile.upstream.seen == []


async def test_query_credentials_never_go_upstream_beside_the_injected_key(hostile: Rig) -> None:
    """The rig's upstream has api_key_env: the proxy sends its own key, so a
    caller's `?key=` / `?api-key=` / `?api_key=` stays with the proxy."""
    port = hostile.px.port
    query = f"api-version=A&key={QUERY_SECRET}&api-key={QUERY_SECRET}&api_key={QUERY_SECRET}"
    relayed = request("GET", f"/v1/models?{query}")
    coalesced = request("POST", f"/v1/chat/completions?{query}", chat("query creds"))
    for raw in (relayed, coalesced):
        status, _, _ = await send(port, raw)
        assert status == 200
    assert [seen.target.split("?", 1)[1] for seen in hostile.upstream.seen] == ["api-version=A"] * 2
    assert all(QUERY_SECRET not in repr(seen) for seen in hostile.upstream.seen)
