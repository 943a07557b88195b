"""The owner's lease on a key: claim, renew and release, with a fencing token.

A claim is `SET lease token NX PX ms` with a fresh random token: exactly one
replica's SET succeeds while the lease lives, and the others learn the
holder's token in the same round trip (it names the log they read).
Renewing and releasing are Lua scripts that act only if the stored token is
still ours, as redis-py's `redis/asyncio/lock.py` does (`LUA_EXTEND_SCRIPT`,
`LUA_RELEASE_SCRIPT`): a replica that paused past its lease can neither
extend nor delete the lease of the replica that claimed after it. The log
writer carries the same token into every append (`proxy.cluster.log`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from proxy.cluster.names import FlightNames
from proxy.redis_client import RedisClient

# KEYS[1] lease, KEYS[2] mirrors; ARGV[1] token, ARGV[2] lease ms.
# -> {1, token} | {0, holder}. `mirrors` counts the replicas that lost the
# claim to the current holder (they mirror its log), for the owner's view.
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2])
  return {1, ARGV[1]}
end
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {0, redis.call('GET', KEYS[1])}
"""

# KEYS[1] lease, KEYS[2] log, KEYS[3] mirrors; ARGV[1] token, ARGV[2] lease
# ms, ARGV[3] log ttl ms. The log lives as long as the lease does (plus its
# TTL): a slow first token never lets the head expire under the readers.
# -> -1: not ours; else how many replicas mirror the log.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return tonumber(redis.call('GET', KEYS[3]) or '0')
"""

# KEYS[1] lease; ARGV[1] token. Compare-and-delete.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def new_token(plain: bool) -> str:
    """64 random bits (two live claims never share one), then the mode the
    owner asks the upstream in: `p` a plain call, `s` a stream."""
    return secrets.token_hex(8) + ("p" if plain else "s")


def plain_call(token: str) -> bool:
    """Whether the owner holding `token` asks the upstream for a plain answer."""
    return token.endswith("p")


@dataclass(frozen=True, slots=True)
class Claim:
    won: bool
    token: str | None  # ours when won; else the holder's (None: it lapsed as we asked)


class Leases:
    """The three lease scripts, registered once on one client."""

    def __init__(self, client: RedisClient, lease_ms: int, log_ttl_ms: int) -> None:
        self.lease_ms = lease_ms
        self.log_ttl_ms = log_ttl_ms
        self._claim = client.register_script(CLAIM)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    async def claim(self, names: FlightNames, plain: bool) -> Claim:
        """Claim the key for a call in this mode (`plain`: not streamed)."""
        token = new_token(plain)
        keys = [names.lease, names.mirrors]
        won, holder = await self._claim(keys=keys, args=[token, self.lease_ms])
        if won:
            return Claim(True, token)
        return Claim(False, None if holder is None else _text(holder))

    async def renew(self, names: FlightNames, token: str) -> int | None:
        """How many replicas mirror the log; None: the lease is no longer ours
        (it lapsed, maybe another replica claimed it)."""
        ttl = self.lease_ms + self.log_ttl_ms
        args: list[str | int] = [token, self.lease_ms, ttl]
        keys = [names.lease, names.log(token), names.mirrors]
        mirrors = int(await self._renew(keys=keys, args=args))
        return None if mirrors < 0 else mirrors

    async def release(self, names: FlightNames, token: str) -> bool:
        return bool(await self._release(keys=[names.lease], args=[token]))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
