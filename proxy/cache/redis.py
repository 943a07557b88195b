"""The Redis cache backend: one key per answer, the value a codec record.

`key_prefix + key` holds `codec.encode(answer)`, written with `SET ... PX`
so Redis expires it. Keys arrive already hashed by the pipeline and values
hold no request headers, so nothing here is a credential; still, neither is
ever logged.

On a Redis Cluster (`mode: cluster`) the name is `key_prefix + "{" + key +
"}"` instead (`proxy.redis_names`): the hash tag puts the entry in the slot
of everything else kept for that key. A single Redis keeps the untagged
name, so entries written by earlier versions stay reachable.

The client (`proxy.redis_client`) does not connect until the first command,
makes one attempt per call, and drops a connection that failed or was
cancelled mid-command: a sick Redis or cluster node costs the lane's
timeout and leaves nothing broken behind.

Errors are raised to the lane, which turns them into misses and counters
(redis-py's own TimeoutError as the builtin one, so the lane can tell it).
"""

from __future__ import annotations

from redis import exceptions as redis_errors

from proxy.cache import codec
from proxy.cache.base import CachedAnswer
from proxy.cache.lane import WRITE_BYTES_PER_SECOND
from proxy.policy import RedisMode
from proxy.redis_client import make_client
from proxy.redis_names import redis_name


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        password: str | None,
        timeout: float,
        key_prefix: str,
        mode: RedisMode = "single",
        max_connections: int | None = None,
        write_timeout: float | None = None,
    ) -> None:
        self._prefix = key_prefix
        self._tagged = mode == "cluster"
        self._client = make_client(
            url, mode=mode, password=password, timeout=timeout, max_connections=max_connections
        )
        # Big writes get their own pool, whose socket timeout leaves room for
        # the largest entry (`write_timeout`): a big write must neither time
        # out for its size alone nor hold a connection lookups are waiting
        # for. Small ones share the lookups' client, already connected (and
        # on a cluster, already holding the slot map a new client must fetch
        # first, which could cost a small write its deadline).
        self._small_write = int(timeout * WRITE_BYTES_PER_SECOND / 4)
        self._writer = (
            self._client
            if write_timeout is None or write_timeout <= timeout
            else make_client(
                url,
                mode=mode,
                password=password,
                timeout=write_timeout,
                max_connections=max_connections,
            )
        )

    def entry_name(self, key: str) -> str:
        """Where `key`'s answer lives in Redis."""
        return redis_name(self._prefix, key) if self._tagged else self._prefix + key

    async def get(self, key: str) -> CachedAnswer | codec.Corrupt | None:
        try:
            record = await self._client.get(self.entry_name(key))
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
        Both commands name one key, so on a cluster they go to one master.
        """
        name = self.entry_name(key)
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
        record = codec.encode(answer)
        client = self._client if len(record) <= self._small_write else self._writer
        try:
            await client.set(self.entry_name(key), record, px=max(1, round(ttl * 1000)))
        except redis_errors.TimeoutError as exc:
            # A slow write is not a sick backend; the lane tells them apart by this type.
            raise TimeoutError("redis write timed out") from exc

    async def delete(self, key: str) -> None:
        await self._client.delete(self.entry_name(key))

    async def close(self) -> None:
        await self._client.aclose()
        if self._writer is not self._client:
            await self._writer.aclose()
