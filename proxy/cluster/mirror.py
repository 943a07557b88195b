"""The mirror: another replica's flight, read from Redis into a local stream.

One mirror per key per replica: it is the producer of a stream published in
the local table, so every local caller of that key follows the local
stream, and the replica reads the key's log from Redis once however many of
its callers follow it. The mirror reads the log from its first entry
(`XREAD` from 0), then blocks for new ones; each entry is applied to the
local stream (`proxy.cluster.replay`).

No wait is unbounded: a read blocks for at most `Settings.block`, and no
longer than until the owner's lease would end unless renewed; when it
comes back empty the mirror looks at the lease and the log's tail in one
atomic step (`POLL`), so an owner that died is noticed just after its lease
ends. An owner can only write while it holds the lease, so
once the lease is seen gone or another's, the tail read in that same step
is all the log will ever hold. If it holds no end:

* after the head, the local readers end as a broken stream does (an error
  event; the flight's runtime ends what is left);
* before it, nothing was sent to anyone, so the flight may claim the key
  and call the upstream itself (`Lapsed`), or follow a replica that
  already did (`Handoff`).

A Redis fault before the head falls back to the single-process path
(`Fault`): the callers still get an answer. After the head the mirror
reads on from its last entry once Redis answers again; only a Redis silent
for a whole lease ends the local readers as a broken stream: they are the
readers of the cut stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from proxy.cluster.entries import EntryError, decode
from proxy.cluster.link import RETRY_PAUSE, LinkFault, RedisLink
from proxy.cluster.names import FlightNames
from proxy.cluster.replay import Replay
from proxy.endpoint import Endpoint
from proxy.errors import UpstreamBroken
from proxy.stream import Stream

# KEYS[1] lease, KEYS[2] log; ARGV[1] first entry id to read, ARGV[2] count.
# -> {holder or nil, the lease's ms to live, entries from ARGV[1] on}
POLL = """
local holder = redis.call('GET', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
return {holder, ttl, redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])}
"""
# Past the lease's end, before looking again: Redis expires a key on access.
LAPSE_MARGIN = 0.02
COUNT = 1024  # entries per read


@dataclass(frozen=True, slots=True)
class Ended:
    """The local stream was ended: by the owner's end, or as broken."""

    how: str  # complete | failed | lapsed | cut


@dataclass(frozen=True, slots=True)
class Lapsed:
    """The owner's lease lapsed before its head: nobody was sent anything yet."""


@dataclass(frozen=True, slots=True)
class Handoff:
    """Before the head, another replica claimed the key: follow its log."""

    token: str


@dataclass(frozen=True, slots=True)
class Fault:
    """Redis failed before the head: run the flight on this replica alone."""


MirrorEnd = Ended | Lapsed | Handoff | Fault


class Mirror:
    def __init__(
        self, link: RedisLink, stream: Stream, endpoint: Endpoint, names: FlightNames
    ) -> None:
        self._link = link
        self._stream = stream
        self._names = names
        self._replay = Replay(stream, endpoint)
        self._poll = link.script(POLL)
        self._lapses_at: float | None = None  # loop time the lease ends unless renewed

    async def follow(self, token: str) -> MirrorEnd:
        """Mirror the log of the owner holding `token` until the local stream ends."""
        log_key = self._names.log(token)
        last = b"0-0"
        loop = asyncio.get_running_loop()
        answered_at = loop.time()
        while True:
            try:
                batch = await self._read(log_key, last)
                holder: str | None = token
                if not batch:  # quiet for a whole block: is the owner still there?
                    holder, batch = await self._poll_lease(log_key, last)
            except LinkFault:
                if self._replay.head is None:
                    return Fault()
                # The log stays where it is: read on from `last` once Redis
                # answers again, unless it stays silent for a whole lease.
                if loop.time() - answered_at < self._link.settings.lease:
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                return self._cut()
            answered_at = loop.time()
            try:
                for entry_id, fields in batch:
                    last = entry_id
                    if self._replay.apply(decode(fields)):
                        return Ended("complete" if self._stream.complete else "failed")
            except EntryError:
                return Fault() if self._replay.head is None else self._cut()
            if holder == token:
                continue
            if self._replay.head is None:
                return Lapsed() if holder is None else Handoff(holder)
            self._stream.fail(
                UpstreamBroken(
                    "llm-sidecar: the replica streaming this answer stopped (its lease lapsed)"
                )
            )
            return Ended("lapsed")

    def _cut(self) -> Ended:
        self._stream.fail(UpstreamBroken("llm-sidecar: the shared stream was cut (Redis)"))
        return Ended("cut")

    async def _read(self, log_key: str, last: bytes) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The entries after `last`, waiting up to one block for the first."""
        link = self._link
        settings = link.settings
        block = settings.block
        if self._lapses_at is not None:
            until_lapse = self._lapses_at + LAPSE_MARGIN - asyncio.get_running_loop().time()
            block = min(block, max(until_lapse, 0.001))
        block_ms = max(1, round(block * 1000))
        reply = await link.call(
            "read",
            lambda: link.client.xread({log_key: last}, count=COUNT, block=block_ms),
            bound=block + settings.timeout,
        )
        return _entries_of(reply)

    async def _poll_lease(
        self, log_key: str, last: bytes
    ) -> tuple[str | None, list[tuple[bytes, dict[bytes, bytes]]]]:
        """The lease's holder, and the entries after `last`, in one atomic step."""
        keys = [self._names.lease, log_key]
        args: list[str | int] = [_after(last), COUNT]
        found, ttl, tail = await self._link.call("read", lambda: self._poll(keys=keys, args=args))
        holder = None if found is None else _text(found)
        lapses_in = int(ttl) / 1000 if int(ttl) >= 0 else 0.0
        self._lapses_at = asyncio.get_running_loop().time() + lapses_in
        return holder, [(entry_id, _pairs(fields)) for entry_id, fields in tail]


def _entries_of(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's reply for one stream as (id, fields); the client speaks RESP2."""
    if not reply:
        return []
    ((_, entries),) = reply
    return list(entries)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A script's raw [field, value, ...] as XREAD would have parsed it."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _after(entry_id: bytes) -> str:
    """The smallest id after `entry_id`: XRANGE's start is inclusive."""
    ms, _, seq = entry_id.decode().partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
