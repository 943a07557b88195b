"""Prepare steps: what a route does to the request before it goes upstream,
once per upstream call, in the leader stage only."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import Hook, StartProxy, wait_idle

CHAT = {"model": "small", "messages": [{"role": "user", "content": "prep"}]}


async def _post(
    url: str, body: dict[str, Any], **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


def _route(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "prepare": list(steps)}]}


async def test_body_and_header_steps_apply_in_order(
    fake: FakeUpstream, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_SIDECAR_TEST_ROUTE_KEY", "sk-route")
    proxy = await start_proxy(
        _route(
            {"step": "model_alias", "aliases": {"small": "big-model"}},
            {"step": "clamp_max_tokens", "max": 5},
            {"step": "system_message", "content": "Be brief."},
            {"step": "set_headers", "headers": {"X-Team": "search"}, "remove": ["X-Debug"]},
            {"step": "inject_key", "env": "LLM_SIDECAR_TEST_ROUTE_KEY"},
        )
    )
    status, _, _ = await _post(
        f"{proxy.base_url}/chat/completions",
        {**CHAT, "max_tokens": 50},
        Authorization="Bearer sk-caller",
        **{"X-Debug": "1"},
    )
    assert status == 200
    sent = fake.requests[-1]
    body = orjson.loads(sent.body)
    assert body["model"] == "big-model" and body["max_tokens"] == 5
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1:] == CHAT["messages"]
    assert sent.headers["x-team"] == "search" and "x-debug" not in sent.headers
    assert sent.headers["authorization"] == "Bearer sk-route"


async def test_clamp_sets_an_absent_limit(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_route({"step": "clamp_max_tokens", "max": 7}))
    await _post(f"{proxy.base_url}/chat/completions", CHAT)
    assert orjson.loads(fake.requests[-1].body)["max_tokens"] == 7


async def test_http_hook_rewrites_once_per_upstream_call(
    fake: FakeUpstream, start_proxy: StartProxy, hook: Hook
) -> None:
    hook.changes = {"model": "hooked"}
    proxy = await start_proxy(_route({"step": "http_hook", "url": hook.url}))
    fake.hold_after = 0
    url = f"{proxy.base_url}/chat/completions"
    tasks = [asyncio.create_task(_post(url, {**CHAT, "stream": True})) for _ in range(5)]
    async with asyncio.timeout(10):
        while sum(s.readers for s in proxy.runtime.table) < 5:
            await asyncio.sleep(0.005)
    fake.release.set()
    results = await asyncio.gather(*tasks)
    assert {r[0] for r in results} == {200}
    assert hook.calls == 1 and fake.total_calls == 1
    assert orjson.loads(fake.requests[-1].body)["model"] == "hooked"
    await wait_idle(proxy.runtime)


async def test_http_hook_keeps_an_integer_wider_than_64_bits_exact(
    fake: FakeUpstream, start_proxy: StartProxy, hook: Hook
) -> None:
    # To the hook and back, then upstream: 2**70 stays an integer, not a float.
    hook.changes = {"model": "hooked"}
    proxy = await start_proxy(_route({"step": "http_hook", "url": hook.url}))
    status, _, _ = await _post(f"{proxy.base_url}/chat/completions", {**CHAT, "seed": 2**70})
    assert status == 200 and hook.calls == 1
    sent = fake.requests[-1].body
    assert b'"seed":1180591620717411303424' in sent.replace(b" ", b"")
    assert json.loads(sent)["model"] == "hooked"


async def test_http_hook_error_status_rejects(
    fake: FakeUpstream, start_proxy: StartProxy, hook: Hook
) -> None:
    hook.status = 403
    proxy = await start_proxy(_route({"step": "http_hook", "url": hook.url}))
    status, _, body = await _post(f"{proxy.base_url}/chat/completions", CHAT)
    assert status == 403
    error = orjson.loads(body)["error"]
    assert error["message"] == "blocked by policy hook" and error["code"] == "rejected_by_hook"
    assert fake.total_calls == 0
    await wait_idle(proxy.runtime)


async def test_log_cap_makes_late_requests_take_their_own_path(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"stream": {"max_log_bytes": "1KiB"}})
    fake.hold_after = 20
    url = f"{proxy.base_url}/chat/completions"
    body = {**CHAT, "stream": True}
    fake.settings = replace(fake.settings, tokens=40)
    first = asyncio.create_task(_post(url, body))
    async with asyncio.timeout(10):
        await fake.reached_hold.wait()
    # Past the cap: a new identical request does not attach; it makes its own call.
    fake.hold_after = None
    second_status, second_headers, _ = await _post(url, body)
    assert second_status == 200 and second_headers["x-llm-sidecar"] == "lead"
    fake.release.set()
    status, headers, _ = await first
    assert status == 200 and headers["x-llm-sidecar"] == "lead"
    assert fake.total_calls == 2
    await wait_idle(proxy.runtime)


HOOK_LIMIT = 64 * 1024


async def test_http_hook_answers_are_bounded_parsed_safely_and_never_redirected(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    """A hostile hook: a huge answer, JSON nested too deep, a redirect elsewhere.
    Each is an OpenAI-style 502; the huge answer is not read to its end and
    the redirect's target is never contacted."""
    written: list[int] = []
    elsewhere: list[str] = []

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 65536
        sent = 0
        try:
            for _ in range(4096):  # 256 MiB if the proxy read it all
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            written.append(sent)
        return response

    async def deep(request: web.Request) -> web.Response:
        nested = b"[" * 600 + b"]" * 600
        return web.Response(body=b'{"model":"m","messages":[],"x":' + nested + b"}")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/elsewhere")

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.path)
        return web.json_response({"model": "m", "messages": []})

    app = web.Application()
    app.router.add_post("/huge", huge)
    app.router.add_post("/deep", deep)
    app.router.add_post("/redirect", redirect)
    app.router.add_route("*", "/elsewhere", other)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for path in ("huge", "deep", "redirect"):
            policy = _route({"step": "http_hook", "url": f"http://127.0.0.1:{port}/{path}"})
            policy["limits"] = {"max_body_bytes": HOOK_LIMIT}
            proxy = await start_proxy(policy)
            async with asyncio.timeout(10):
                status, headers, body = await _post(f"{proxy.base_url}/chat/completions", CHAT)
            assert (path, status, headers["x-llm-sidecar"]) == (path, 502, "error")
            assert orjson.loads(body)["error"]["code"] == "upstream_unavailable"
            await wait_idle(proxy.runtime)
        async with asyncio.timeout(10):
            while not written:
                await asyncio.sleep(0.01)
        assert written[0] < 64 * 1024 * 1024  # the hook was cut off, not read to the end
        assert elsewhere == []
        assert fake.total_calls == 0
    finally:
        await runner.cleanup()
