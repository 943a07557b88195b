"""The cache write: a complete answer handed to the cache when its stream ends.

Runs at the end of the pump task, after the upstream slot is released. The
stream stays published (and joinable, being complete) until the write lands,
so an identical request arriving in between follows it instead of calling
the upstream again. Nothing partial is ever written: only a stream that
ended complete and whole (every choice finished, or the response completed:
the one place a streamed answer is always parsed), on a route with a cache,
for a caller that allows writes (and, with `cache_fallback: false`, from the
route's first target). The record keeps the answer in the mode the upstream
sent it: events (and the assembled object), or the plain body.
"""

from __future__ import annotations

import asyncio
import time

from proxy.cache.base import Cache, CachedAnswer
from proxy.intake import Intake
from proxy.stream import Stream


def answer_of(stream: Stream) -> CachedAnswer | None:
    """The record for a complete stream; None when the answer is not whole."""
    head = stream.head.result()
    content_type = head.headers.get("Content-Type", "application/json")
    if stream.plain is not None:
        if not stream.plain.whole():
            return None
        return CachedAnswer(
            status=head.status,
            content_type=content_type,
            is_sse=False,
            events=(),
            usage_event=None,
            body=stream.plain.body,
            stored_at=time.time(),
        )
    if stream.assembly is None or not stream.assembly.whole():
        return None
    usage = next((i for i, e in enumerate(stream.events) if e.usage_only), None)
    return CachedAnswer(
        status=head.status,
        content_type=content_type,
        is_sse=head.is_sse,
        events=tuple(e.raw for e in stream.events),
        usage_event=usage,
        body=stream.assembly.body(),
        stored_at=time.time(),
    )


def _from_a_fallback(stream: Stream, first: str) -> bool:
    """Whether a target other than the route's first gave the answer."""
    return bool(stream.attempts) and stream.attempts[-1].target != first


async def write_answer(cache: Cache, stream: Stream, intake: Intake) -> None:
    """Hand a complete answer to the cache; return once the write landed."""
    config = intake.route.config.cache
    if not (stream.complete and intake.cache_write):
        return
    if config is None or config.ttl <= 0:
        return
    route = intake.route
    if not route.config.cache_fallback and _from_a_fallback(stream, route.targets[0].label):
        return
    answer = answer_of(stream)
    if answer is None:
        return
    pending = cache.store(intake.key, answer, config.ttl)
    if pending is not None:
        # wait, not await: a cancelled pump must not cancel the cache's write.
        await asyncio.wait((pending,))
