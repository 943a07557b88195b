"""The owner's log writer: its stream's steps into a Redis Stream, fenced.

`LogWriter` is the owned stream's sink (`proxy.stream.StreamSink`): each
producer step becomes an entry (`proxy.cluster.entries`), queued without
blocking the pump. Its task (`run`) sends what is queued in one script call
at a time, in order, and renews the lease between calls. The append script
checks the lease still holds this writer's token before its XADDs, in the
same atomic step (Kleppmann's fencing: the writer carries its token into
every write, and the store refuses a stale one). The log's name carries the
token too, so a writer that paused past its lease and resumed is refused,
and could never have named the next owner's log anyway.

The log is bounded: past `cluster.max_stream_bytes` the writer records a
failure (readers elsewhere end with an error event; readers here are
served as usual) and releases the lease, so new requests on other replicas
make their own call, as a local stream past its log cap does. It expires
`cluster.stream_ttl` after its end, and while the owner lives, the lease's
renewals keep it from expiring under a slow first token.

After the end is recorded the writer keeps renewing until the pump has
finished (its cache write included), then releases with a compare-and-
delete: a request on another replica in between replays this log rather
than calling the upstream again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence

from proxy.cluster import entries
from proxy.cluster.link import RETRY_PAUSE, LinkFault, RedisLink
from proxy.cluster.names import FlightNames
from proxy.errors import ProxyError, UpstreamBroken
from proxy.stream import Head, LogEvent, Stream

# KEYS[1] lease, KEYS[2] log; ARGV[1] token, ARGV[2] log ttl ms, ARGV[3] the
# entries this writer had written before this batch, then (kind, payload)
# pairs, one XADD each. A retried batch whose first try landed (its reply
# lost to a timeout) is not written twice: the entries already in the log
# are skipped. 1: written; 0: fenced, nothing written; -1: the log is not
# what this writer wrote.
APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local done = redis.call('XLEN', KEYS[2]) - tonumber(ARGV[3])
if done < 0 or done > (#ARGV - 3) / 2 then
  return -1
end
for i = 4 + 2 * done, #ARGV, 2 do
  redis.call('XADD', KEYS[2], '*', ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


class LogWriter:
    # The sink methods run in the pump's steps and `run` in its own task,
    # both on the loop thread; `_pending` is handed over whole, never shared.
    def __init__(
        self, link: RedisLink, names: FlightNames, token: str, stream: Stream | None = None
    ) -> None:
        self._link = link
        self._stream = stream  # told how many replicas mirror it, at each renewal
        self._names = names
        self._token = token
        self._script = link.script(APPEND)
        # kind, payload, kind, payload, ...: dropped from the front once Redis
        # has them, so a call that timed out is tried again with what followed.
        self._pending: list[bytes] = []
        self._written = 0  # entries Redis acknowledged
        self._wake = asyncio.Event()
        self._bytes = 0
        self._last_queued = False  # the entry that ends the log is queued
        self._cut = False  # passed max_stream_bytes: the log ends early
        self._stopped = False  # fenced or faulted: nothing more is sent

    # -- the sink (synchronous, from the pump) ---------------------------------

    def opened(self, head: Head) -> None:
        self._put(*entries.head(head))

    def appended(self, events: Sequence[LogEvent]) -> None:
        self._put(*entries.events([event.raw for event in events]))

    def ended(self, complete: bool, error: ProxyError | None) -> None:
        self._put(*entries.done(complete, error), last=True)

    def failed(self, error: ProxyError | Head) -> None:
        self._put(*entries.failed(error), last=True)

    def _put(self, kind: bytes, payload: bytes, *, last: bool = False) -> None:
        if self._last_queued or self._stopped:
            return
        self._bytes += len(payload)
        if self._bytes > self._link.settings.max_stream_bytes:
            self._cut = True
            self._link.overflows += 1
            cut = UpstreamBroken(
                "llm-sidecar: the answer passed cluster.max_stream_bytes; its shared copy was cut"
            )
            kind, payload = entries.failed(cut)
            last = True
        self._pending += (kind, payload)
        self._last_queued = last
        self._wake.set()

    # -- the task ------------------------------------------------------------

    async def run(self, pump: asyncio.Task[None]) -> None:
        """Send every entry, renewing meanwhile; release once `pump` is done.

        A call Redis does not answer is tried again (the log and the lease
        are where they were) until nothing has been answered for a whole
        lease: by then the lease has lapsed and readers elsewhere ended.
        """
        loop = asyncio.get_running_loop()
        lease = self._link.settings.lease
        renew_at = answered_at = loop.time()
        renew_at += lease / 3
        while True:
            try:
                if self._pending and not await self._flush():
                    return
                if loop.time() >= renew_at:
                    if not await self._renew():
                        return
                    renew_at = loop.time() + lease / 3
            except LinkFault:
                if loop.time() - answered_at >= lease:
                    # Readers here go on as usual; elsewhere they saw the lease go.
                    self._stopped = True
                    self._pending.clear()
                    self._link.fallbacks += 1
                    break
                await asyncio.sleep(RETRY_PAUSE)
                continue
            answered_at = loop.time()
            if self._last_queued and not self._pending:
                # Recorded whole. Keep the lease while the pump writes the cache.
                if self._cut or pump.done():
                    break
                await self._sleep(asyncio.wait((pump,)), renew_at - loop.time())
                continue
            self._wake.clear()
            if not self._pending:
                await self._sleep(self._wake.wait(), renew_at - loop.time())
        await self._release()

    async def _sleep(self, waiting: Awaitable[object], seconds: float) -> None:
        """Until `waiting` is done or `seconds` have passed (the next renewal)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await waiting

    async def _flush(self) -> bool:
        """Send what is queued; False when fenced."""
        batch = list(self._pending)
        settings = self._link.settings
        ttl = settings.stream_ttl_ms
        if not self._last_queued:  # still running: the renewals' horizon
            ttl += settings.lease_ms
        keys = [self._names.lease, self._names.log(self._token)]
        args: list[bytes | str | int] = [self._token, ttl, self._written, *batch]
        written = await self._link.call("append", lambda: self._script(keys=keys, args=args))
        if written != 1:
            self._fence()
            return False
        del self._pending[: len(batch)]
        self._written += len(batch) // 2
        return True

    async def _renew(self) -> bool:
        names, token = self._names, self._token
        mirrors = await self._link.call("renew", lambda: self._link.leases.renew(names, token))
        if mirrors is None:
            self._fence()
            return False
        if self._stream is not None:
            self._stream.mirrors = mirrors
        return True

    def _fence(self) -> None:
        self._stopped = True
        self._pending.clear()
        self._link.fenced += 1

    async def _release(self) -> None:
        names, token = self._names, self._token
        with contextlib.suppress(LinkFault):  # else it lapses on its own within one lease
            await self._link.call("release", lambda: self._link.leases.release(names, token))
