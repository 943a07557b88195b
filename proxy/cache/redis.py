"""The Redis cache backend: one key per answer, the value a codec record.

`key_prefix + key` holds `codec.encode(answer)`, written with `SET ... PX`
so Redis expires it. Keys arrive already hashed by the pipeline and values
hold no request headers, so nothing here is a credential; still, neither is
ever logged.

The client is built so that a sick Redis costs a bounded time and leaves
nothing broken behind:

* constructing it does not connect, so Redis being down at start-up never
  stops start-up; the first command connects;
* no retries (redis-py 6+ retries 10 times with backoff by default), so one
  call is one attempt and the lane's timeout is the whole cost;
* socket and connect timeouts equal the lane's timeout, a second guard for
  when this backend is used without the lane;
* a command that fails or is cancelled (the lane's `asyncio.timeout`)
  disconnects its connection inside redis-py (`Connection.read_response`
  disconnects on any error, cancellation included), so a reply that arrives
  late is never read as the answer to the next command.

Errors are raised to the lane, which turns them into misses and counters
(redis-py's own TimeoutError as the builtin one, so the lane can tell it).
"""

from __future__ import annotations

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.cache import codec
from proxy.cache.base import CachedAnswer


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, *, password: str | None, timeout: float, key_prefix: str) -> None:
        self._prefix = key_prefix
        # A password in the URL wins over `password` (redis-py's rule).
        self._client = Redis.from_url(
            url,
            password=password,
            decode_responses=False,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    async def get(self, key: str) -> CachedAnswer | codec.Corrupt | None:
        try:
            record = await self._client.get(self._prefix + key)
        except redis_errors.TimeoutError as exc:
            # The lane counts timeouts apart from other faults; it knows the builtin.
            raise TimeoutError("redis read timed out") from exc
        if record is None:
            return None
        # Always bytes with decode_responses=False; the types allow str.
        answer = codec.decode(record) if isinstance(record, bytes) else None
        return codec.CORRUPT if answer is None else answer

    async def get_with_ttl(self, key: str) -> tuple[CachedAnswer | codec.Corrupt | None, float]:
        """The answer and the seconds it has left, in one round trip (GET and PTTL pipelined).

        What the in-process tier needs to keep a copy no longer than Redis does.
        """
        name = self._prefix + key
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(name)
                pipe.pttl(name)
                record, left_ms = await pipe.execute()
        except redis_errors.TimeoutError as exc:
            raise TimeoutError("redis read timed out") from exc
        if record is None:
            return None, 0.0
        answer = codec.decode(record) if isinstance(record, bytes) else None
        # PTTL is -1 for a key without expiry (never written by us): keep no copy.
        left = left_ms / 1000 if isinstance(left_ms, int) and left_ms > 0 else 0.0
        return (codec.CORRUPT if answer is None else answer), left

    async def set(self, key: str, answer: CachedAnswer, ttl: float) -> None:
        await self._client.set(
            self._prefix + key, codec.encode(answer), px=max(1, round(ttl * 1000))
        )

    async def delete(self, key: str) -> None:
        await self._client.delete(self._prefix + key)

    async def close(self) -> None:
        await self._client.aclose()
