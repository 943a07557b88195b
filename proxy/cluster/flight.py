"""A local miss with cross-replica coalescing on: own the key, mirror it, or run alone.

The pipeline publishes the local stream first (single-flight within the
process, no await), then `start_flight` runs this as the stream's producer
task, owned by the runtime like any pump (`Runtime.start_pump`, whose
done-callback ends whatever is left open and unpublishes the stream):

* the claim is won: this replica is the owner. Today's pump runs, with a
  log writer as the stream's sink (`proxy.cluster.log`);
* another replica holds the key: this replica mirrors its log into the
  local stream (`proxy.cluster.mirror`); when that owner's lease lapses
  before its head, the flight claims the key itself (or follows whoever
  did), since nothing was sent to anyone yet;
* Redis failed, or its breaker is open: today's pump alone, as if the
  feature were off. A Redis fault never fails a request that would have
  succeeded on one replica.

The caller that made the stream learns the role as soon as the claim is
answered: it reads as a leader when this replica calls the upstream, as a
follower (under a follower slot) when it mirrors another replica's call.
"""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict

from proxy.cluster.lease import plain_call
from proxy.cluster.link import RedisLink
from proxy.cluster.log import LogWriter
from proxy.cluster.mirror import Ended, Fault, Handoff, Lapsed, Mirror
from proxy.cluster.names import FlightNames
from proxy.intake import Intake
from proxy.pump import pump
from proxy.runtime import Runtime
from proxy.stream import Role, Stream

# Owners that may come and go before one sends a head, before this replica
# stops following and calls the upstream itself.
MAX_HANDOFFS = 3


def start_flight(
    rt: Runtime, link: RedisLink, stream: Stream, intake: Intake, headers: CIMultiDict[str]
) -> asyncio.Future[Role]:
    """Start `stream`'s producer; the future says which role this replica took."""
    role: asyncio.Future[Role] = asyncio.get_running_loop().create_future()
    rt.start_pump(stream, _flight(rt, link, stream, intake, headers, role))
    assert stream.pump is not None
    link.adopt(stream.pump)

    def settle(_: object) -> None:  # cancelled before it could say: the stream is ended
        if not role.done():
            role.set_result("local")

    stream.pump.add_done_callback(settle)
    return role


async def _flight(
    rt: Runtime,
    link: RedisLink,
    stream: Stream,
    intake: Intake,
    headers: CIMultiDict[str],
    role: asyncio.Future[Role],
) -> None:
    names = link.names(intake.key)
    plain = not intake.wants_stream  # this replica would ask in its leader's mode
    claim = await link.claim(names, plain)
    if claim is None or claim.token is None:
        role.set_result("local")
        await _alone(rt, link, stream, intake, headers)
        return
    if claim.won:
        role.set_result("owner")
        await _own(rt, link, stream, intake, headers, names, claim.token)
        return
    stream.role = "mirror"
    role.set_result("mirror")
    mirror = Mirror(link, stream, intake.endpoint, names)
    token = claim.token
    for _ in range(MAX_HANDOFFS):
        # The call is asked in its owner's mode: readers here wait as for it.
        stream.plain_call = plain_call(token)
        end = await mirror.follow(token)
        if isinstance(end, Ended):
            link.mirror_ends[end.how] += 1
            return
        if isinstance(end, Fault):
            link.mirror_ends["fell_back"] += 1
            await _alone(rt, link, stream, intake, headers)
            return
        if isinstance(end, Handoff):
            token = end.token
            continue
        assert isinstance(end, Lapsed)
        claim = await link.claim(names, plain)
        if claim is None or claim.token is None:
            link.mirror_ends["fell_back"] += 1
            await _alone(rt, link, stream, intake, headers)
            return
        if claim.won:
            link.mirror_ends["took_over"] += 1
            await _own(rt, link, stream, intake, headers, names, claim.token)
            return
        token = claim.token
    link.mirror_ends["fell_back"] += 1
    await _alone(rt, link, stream, intake, headers)


async def _own(
    rt: Runtime,
    link: RedisLink,
    stream: Stream,
    intake: Intake,
    headers: CIMultiDict[str],
    names: FlightNames,
    token: str,
) -> None:
    stream.role = "owner"
    stream.plain_call = plain_call(token)  # this replica's leader's mode, as always
    # Readers on other replicas are invisible here: the last local reader
    # leaving must not cancel the call they may still be reading.
    stream.cancel_on_abandon = False
    writer = LogWriter(link, names, token, stream)
    stream.sink = writer
    assert stream.pump is not None
    link.spawn(writer.run(stream.pump))
    await pump(rt, stream, intake, headers, recheck=True)


async def _alone(
    rt: Runtime, link: RedisLink, stream: Stream, intake: Intake, headers: CIMultiDict[str]
) -> None:
    stream.role = "local"
    stream.plain_call = not intake.wants_stream
    link.fallbacks += 1
    await pump(rt, stream, intake, headers, recheck=True)
