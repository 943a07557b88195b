"""Several real sidecar processes sharing one Redis, for cross-replica tests.

`replicas` starts N `python -m proxy serve` processes on one policy (each in
its own directory under tmp_path, all at once), waits until every one is
ready and always reaps them. The helpers read each replica's `/status`,
send requests and decode answers; every wait is bounded.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from proxy.testing.fake_upstream import FakeUpstream
from tests.proxy_process import ProxyProcess, policy_for, run_proxy

Answer = tuple[int, CIMultiDict[str], bytes]


def cluster_policy(
    fake: FakeUpstream, redis_url: str, *, lease: str = "1s", timeout: str = "300ms", **extra: Any
) -> dict[str, Any]:
    """Every replica's policy: cross-replica coalescing on `redis_url`, room for bursts."""
    wide = {"max_concurrency": 512, "max_queue": 2048, "queue_timeout": "30s"}
    return policy_for(
        fake,
        {
            "cluster": {
                "coalesce_across_replicas": True,
                "url": redis_url,
                "lease": lease,
                "timeout": timeout,
            },
            "stages": {"leader": wide, "follower": wide, "upstream": wide},
            "log": {"access": False},
            **extra,
        },
    )


@asynccontextmanager
async def replicas(
    tmp_path: Path, policy: dict[str, Any], count: int
) -> AsyncIterator[list[ProxyProcess]]:
    async with AsyncExitStack() as stack:
        procs = []
        for index in range(count):
            home = tmp_path / f"replica{index}"
            home.mkdir()
            procs.append(await stack.enter_async_context(run_proxy(home, policy)))
        await asyncio.gather(*(proc.wait_ready() for proc in procs))
        yield procs


def chat(prompt: str, stream: bool) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": stream}


async def ask(
    session: aiohttp.ClientSession, proc: ProxyProcess, body: dict[str, Any], **headers: str
) -> Answer:
    async with session.post(f"{proc.api}/chat/completions", json=body, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def sse_payloads(body: bytes) -> list[Any]:
    """Every `data:` payload of an SSE body, parsed (`[DONE]` as the string)."""
    out: list[Any] = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            data = line[len(b"data: ") :]
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def streamed_text(body: bytes) -> str:
    return "".join(
        p["choices"][0]["delta"].get("content") or ""
        for p in sse_payloads(body)
        if isinstance(p, dict) and p.get("choices")
    )


def plain_text(body: bytes) -> str:
    text: str = orjson.loads(body)["choices"][0]["message"]["content"]
    return text


def ends_whole(body: bytes) -> bool:
    payloads = sse_payloads(body)
    return bool(payloads) and payloads[-1] == "[DONE]"


def ends_with_error(body: bytes) -> bool:
    payloads = sse_payloads(body)
    return bool(payloads) and isinstance(payloads[-1], dict) and "error" in payloads[-1]


def calls_for(fake: FakeUpstream, prompt: str) -> int:
    """Upstream calls the fake received for `prompt`, whatever mode they were asked in."""
    count = 0
    for request in fake.requests:
        body: Any = orjson.loads(request.body) if request.method == "POST" else {}
        messages = body.get("messages") or [{}]
        count += messages[0].get("content") == prompt
    return count


async def readers(procs: Iterable[ProxyProcess]) -> int:
    """Callers attached to streams, over every replica."""
    statuses = await asyncio.gather(*(proc.status() for proc in procs))
    return sum(stream["readers"] for status in statuses for stream in status["streams"])


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll an async condition no event signals, bounded by `timeout`."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


def idle(status: dict[str, Any]) -> bool:
    """Every stage back to zero, no stream and no pump left."""
    stages = status["stages"].values()
    return (
        all(s["in_use"] == 0 and s["queued"] == 0 for s in stages)
        and not status["streams"]
        and status["pumps"] == 0
    )


async def all_idle(procs: Iterable[ProxyProcess], timeout: float = 10.0) -> None:
    await asyncio.gather(*(proc.until_status(idle, timeout) for proc in procs))


async def burst(
    procs: Sequence[ProxyProcess], fake: FakeUpstream, tag: str, prompts: int, requests: int
) -> None:
    """`requests` callers over `prompts` prompts, round-robin over the replicas
    (each prompt reaches every one), half streaming; the fake holds every
    answer, head sent, until all of them are in. Asserts one upstream call per
    prompt, one body per kind of reader, and one leader per prompt."""
    fake.hold_after = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        plan = [(i % len(procs), (i // len(procs)) % prompts, i % 2 == 0) for i in range(requests)]
        tasks = [
            asyncio.create_task(ask(session, procs[r], chat(f"{tag} {p}", stream)))
            for r, p, stream in plan
        ]

        async def gathered() -> bool:
            return fake.in_flight == prompts and await readers(procs) == requests

        async with asyncio.timeout(40):
            await until(gathered, timeout=40)
            fake.release.set()
            answers: list[Answer] = await asyncio.gather(*tasks)
    assert fake.total_calls == prompts
    assert all(calls_for(fake, f"{tag} {p}") == 1 for p in range(prompts))
    streamed: dict[int, set[bytes]] = defaultdict(set)
    plain: dict[int, set[bytes]] = defaultdict(set)
    leads: Counter[int] = Counter()
    for (_, prompt, stream), (status, headers, body) in zip(plan, answers, strict=True):
        assert status == 200, body
        (streamed if stream else plain)[prompt].add(body)
        leads[prompt] += headers["x-llm-sidecar"] == "lead"
    for prompt in range(prompts):
        # One body per kind of reader, whichever replica served it.
        assert len(streamed[prompt]) == 1 and len(plain[prompt]) == 1
        (events,) = streamed[prompt]
        (whole,) = plain[prompt]
        assert ends_whole(events)
        assert streamed_text(events) == plain_text(whole) != ""
        assert leads[prompt] == 1  # the owner's first caller; every other one follows
