"""Redis clients for every part of the proxy that talks to Redis, built one way.

`mode: single` is one server (`redis.asyncio.Redis`); `mode: cluster` is a
Redis Cluster (`redis.asyncio.cluster.RedisCluster`), reached through the
URL of any one node: the client asks it for the slot map (CLUSTER SLOTS),
then sends each command to the master of its key's slot and learns the
other nodes from that map.

Either client is built so that a sick Redis costs a bounded time and leaves
nothing broken behind:

* constructing it does not connect, so Redis being down at start-up never
  stops start-up; the first command connects (on a cluster, the first
  command also fetches the slot map, inside that command's deadline);
* no retries (redis-py 6+ retries 3 to 10 times with backoff by default,
  and its cluster client would also re-route and sleep), so one call is one
  attempt and the caller's timeout is the whole cost; on a cluster a
  connection fault only marks the slot map stale, and the next command
  fetches it again first;
* socket and connect timeouts equal the caller's timeout, a second guard for
  a caller without its own deadline;
* a command that fails or is cancelled disconnects its connection inside
  redis-py (`Connection.read_response` disconnects on any error,
  cancellation included; both clients use that class), so a reply that
  arrives late is never read as the answer to the next command.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.policy import RedisMode


class _Cluster(RedisCluster):
    """redis-py's cluster client, with its slot map fetched before any command.

    Left to itself, a fresh client routes its first commands before it has a
    slot map (no default node yet, so a keyed command counts as keyless) and
    sends them to a random master: a burst of them collects MOVED replies,
    and every fifth MOVED closes every connection of the client, commands in
    flight included. `initialize` is public, serialised by the client's own
    lock, and a flag check once the map is there.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.initialize()
        return await super().execute_command(*args, **kwargs)


RedisClient: TypeAlias = Redis | RedisCluster


def url_problem(url: str, mode: RedisMode) -> str | None:
    """Why `url` cannot reach a Redis in `mode`, or None. Never echoes a credential."""
    try:
        options = parse_url(url)
    except ValueError as exc:  # redis-py's message names the schemes, never the URL
        return str(exc)
    if mode == "cluster":
        if "path" in options:
            return "a Redis Cluster is reached over TCP: use redis:// or rediss://, not unix://"
        if options.get("db"):
            return "a Redis Cluster has only database 0: end the URL with /0 or no path"
    return None


def make_client(
    url: str,
    *,
    mode: RedisMode,
    password: str | None,
    timeout: float,
    max_connections: int | None = None,
) -> RedisClient:
    """A client for `url`; `max_connections` bounds the connections per server.

    A password in the URL wins over `password` (redis-py's rule, both clients).
    Check the URL with `url_problem` first: a bad one raises here.
    """
    options: dict[str, Any] = {
        "password": password,
        "decode_responses": False,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 0,
        "retry": Retry(NoBackoff(), 0),
    }
    if mode == "cluster":
        # The cluster client's per-node pool refuses (MaxConnectionsError, a
        # fault to the caller) past its bound instead of waiting, 100 by
        # default; the caller says how many calls it may have in flight.
        return _Cluster.from_url(url, max_connections=max_connections or 100, **options)
    return Redis.from_url(url, max_connections=max_connections, **options)
