"""Redis key names of one flight, sharing a Redis Cluster hash tag.

Lua scripts touch the lease and the log together, so both must live in one
slot: the request key (already a hash, never a prompt or a credential) is
the hash tag (`proxy.redis_names`), as it is in the cache entry's name. The
log's name also carries the owner's fencing token, so an owner that lost
its lease can never name the stream of the owner after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.redis_names import redis_name


@dataclass(frozen=True, slots=True)
class FlightNames:
    prefix: str
    key: str

    @property
    def lease(self) -> str:
        return redis_name(self.prefix, self.key, "claim")

    @property
    def mirrors(self) -> str:
        return redis_name(self.prefix, self.key, "mirrors")

    def log(self, token: str) -> str:
        return redis_name(self.prefix, self.key, "events", token)
