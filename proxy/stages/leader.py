"""The leader stage: prepare one upstream call, then release the slot.

`lead` answers the caller whose request made a new stream: it reads the
stream like any other reader, holding no slot, while the stream's pump owns
the call (the caller leaving changes nothing for the others). `prepare` is
the pump's first step: under a leader slot it re-checks the cache if it had
to queue for the slot (the answer may have landed meanwhile; right after the
miss that made this stream, a lookup cannot find anything new) and runs the
route's prepare steps. The slot is released when `prepare` returns, before
the upstream slot is asked for (DESIGN invariant 2), so a long stream never
keeps the next request from being prepared.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from proxy.cache.base import CachedAnswer
from proxy.convert import Assembly, PlainAnswer
from proxy.endpoint import Endpoint
from proxy.headers import Served
from proxy.intake import Intake
from proxy.prepare import Outgoing, run_steps
from proxy.reply import Outcome, StreamReply
from proxy.runtime import Runtime
from proxy.stream import Head, LogEvent, Stream


async def lead(request: web.Request, intake: Intake, stream: Stream) -> Outcome:
    stream.attach()
    try:
        return await StreamReply(request, intake, stream, Served.LEAD).run()
    finally:
        stream.detach()


async def prepare(
    rt: Runtime,
    stream: Stream,
    intake: Intake,
    headers: CIMultiDict[str],
    *,
    recheck: bool = False,
) -> Outgoing | None:
    """The request to send upstream; None when the cache answered into `stream`.

    `recheck`: look the cache up again even without queueing. A cross-replica
    flight asked Redis first (`proxy.cluster.flight`): meanwhile another
    replica's flight may have ended and its answer landed in the cache (an
    owner releases its claim only once its answer is written).
    """
    async with rt.stages.leader.slot(intake.request_id) as queued:
        if (queued or recheck) and intake.cache_read:
            answer = await rt.cache.lookup(intake.key)
            if answer is not None:
                replay_answer(stream, intake.endpoint, answer)
                return None
        return await run_steps(
            intake.route.steps, Outgoing(intake.path, intake.endpoint, intake.body, headers)
        )


def replay_answer(stream: Stream, endpoint: Endpoint, answer: CachedAnswer) -> None:
    """A cached answer as the whole of `stream`, not to be written back."""
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": answer.content_type})
    stream.open(Head(answer.status, headers, is_sse=answer.is_sse, body=answer.body))
    if answer.is_sse:
        stream.assembly = Assembly.built(endpoint, answer.body, whole=True)
        stream.append(
            [LogEvent(raw, index == answer.usage_event) for index, raw in enumerate(answer.events)]
        )
    else:
        stream.plain = PlainAnswer(endpoint, answer.body or b"")
        # What the stream holds is a plain call's answer, whatever mode its
        # leader asked in: a streaming reader gets it re-chunked, as a hit.
        stream.plain_call = True
    stream.end(complete=False)  # already cached: nothing to write back
