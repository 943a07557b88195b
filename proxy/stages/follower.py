"""The follower stage: a caller joins a stream another request leads.

The follower slot bounds how many subscriptions are being set up at once.
It is held only while the caller attaches and, when the stream is already
flowing, while the backlog is handed to the caller's socket without ever
waiting on it: what the socket does not take at once, and every live event,
is written with no slot held, so a caller that stops reading holds none
(DESIGN, Bounds).
"""

from __future__ import annotations

from aiohttp import web

from proxy.headers import Served
from proxy.intake import Intake
from proxy.reply import Outcome, StreamReply
from proxy.runtime import Runtime
from proxy.stream import Stream


async def follow(request: web.Request, intake: Intake, stream: Stream, rt: Runtime) -> Outcome:
    async def attach(reply: StreamReply) -> None:
        async with rt.stages.follower.slot(intake.request_id):
            await reply.replay_backlog()

    stream.attach()
    try:
        return await StreamReply(request, intake, stream, Served.FOLLOW).run(attach)
    finally:
        stream.detach()
