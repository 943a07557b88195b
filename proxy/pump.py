"""The pump: the task that owns one stream's upstream call, start to end.

It runs the leader stage (`prepare`, under a leader slot), then the upstream
stage (under an upstream slot), never holding both, then hands a complete
answer to the cache. The runtime starts it and owns its end: whatever way
the task ends, cancelled before its first step included, the runtime's
done-callback ends the stream and unpublishes it (`Runtime.start_pump`).
"""

from __future__ import annotations

import logging

from multidict import CIMultiDict

from proxy.cache.write import write_answer
from proxy.errors import ProxyError
from proxy.intake import Intake
from proxy.runtime import Runtime
from proxy.stages import leader, upstream
from proxy.stream import Stream

log = logging.getLogger("llm_sidecar.pump")


async def pump(
    rt: Runtime,
    stream: Stream,
    intake: Intake,
    headers: CIMultiDict[str],
    *,
    recheck: bool = False,
) -> None:
    """`recheck`: see `leader.prepare`."""
    try:
        outgoing = await leader.prepare(rt, stream, intake, headers, recheck=recheck)
        if outgoing is None:
            return  # the cache answered while the leader queued
        await upstream.call(rt, stream, intake, outgoing)
    except ProxyError as exc:
        stream.fail(exc)
    except Exception as exc:
        log.exception("pump failed")
        stream.fail(ProxyError(f"llm-sidecar: internal error ({type(exc).__name__})"))
    await write_answer(rt.cache, stream, intake)
