"""Upstream connections: one pooled aiohttp client per upstream, and the
translation of connection faults into the proxy's errors.

A connection that failed mid-exchange is closed by aiohttp, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Iterator, Mapping

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.errors import (
    BadPath,
    UpstreamBroken,
    UpstreamIdle,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamTooLong,
    UpstreamUnavailable,
)
from proxy.paths import PathRejected, confine
from proxy.policy import Upstream


class UpstreamPool:
    """Owns one ClientSession per upstream configuration.

    Keyed by name and the frozen config, so a reload that changes an
    upstream gets a fresh session while streams on the old one finish. A
    session the current policy no longer names closes as soon as no call
    holds it (`retain`); the rest close at shutdown.
    """

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, Upstream], aiohttp.ClientSession] = {}
        # Calls holding each session now (between `lease` entry and exit).
        self._users: dict[aiohttp.ClientSession, int] = {}
        # None until the first reload: every configuration is current.
        self._current: frozenset[tuple[str, Upstream]] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def session(self, name: str, config: Upstream) -> aiohttp.ClientSession:
        session = self._sessions.get((name, config))
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=config.max_connections, limit_per_host=0, ttl_dns_cache=300
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=config.connect_timeout, sock_connect=config.connect_timeout
                ),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
            self._sessions[(name, config)] = session
        return session

    @contextlib.contextmanager
    def lease(self, name: str, config: Upstream) -> Iterator[aiohttp.ClientSession]:
        """The session for one call, held until the call's response is done with."""
        session = self.session(name, config)
        self._users[session] = self._users.get(session, 0) + 1
        try:
            yield session
        finally:
            left = self._users[session] - 1
            if left:
                self._users[session] = left
            else:
                del self._users[session]
                if self._current is not None and (name, config) not in self._current:
                    self._retire((name, config))

    def retain(self, upstreams: Mapping[str, Upstream]) -> None:
        """After a reload: sessions for configurations no longer named close once unused."""
        self._current = frozenset(upstreams.items())
        for key in list(self._sessions):
            if key not in self._current and self._sessions[key] not in self._users:
                self._retire(key)

    def _retire(self, key: tuple[str, Upstream]) -> None:
        session = self._sessions.pop(key, None)
        if session is None:
            return
        task = asyncio.create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            await session.close()
        await asyncio.gather(*self._closing, return_exceptions=True)


@functools.lru_cache(maxsize=64)
def _base(base_url: str) -> str:
    # Normalised once per configured URL, so the per-request URL can be built
    # pre-encoded, and sent exactly as built.
    return str(URL(base_url)).rstrip("/")


def upstream_url(config: Upstream, path: str, query: str) -> URL:
    """Map `/v1/...` onto the upstream's base URL (which ends in its own /v1).

    `path` must be canonical (`proxy.paths`, done at intake) and `query` raw:
    the URL is built encoded, so no normaliser between here and the socket
    can resolve what intake did not. The path is checked once more, since it
    may have come through a prepare step; a refusal is a 400.
    """
    try:
        path = confine(path)
    except PathRejected as exc:
        raise BadPath(f"llm-sidecar: the request path is not allowed: {exc}") from exc
    url = _base(config.base_url) + path[3:]
    return URL(f"{url}?{query}" if query else url, encoded=True)


async def open_upstream(
    session: aiohttp.ClientSession,
    config: Upstream,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    data: bytes | AsyncIterator[bytes] | None,
) -> aiohttp.ClientResponse:
    """Send the request; return once response headers arrive."""
    try:
        async with asyncio.timeout(config.first_byte_timeout):
            return await session.request(
                method, url, headers=headers, data=data, allow_redirects=False
            )
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"llm-sidecar: the upstream sent no response within {config.first_byte_timeout:g}s"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(
            f"llm-sidecar: the upstream is unreachable ({type(exc).__name__})"
        ) from exc


class _Idle(Exception):
    """Put into the response's reader by the watch when the upstream goes quiet."""


class _IdleWatch:
    """One timer per response, re-armed lazily.

    A per-read `asyncio.timeout` costs a timer handle per chunk, which showed
    in profiles of short streams; here a chunk costs two clock reads, and the
    timer only wakes once per `idle` to look. Only time spent waiting for the
    upstream counts, not time the consumer spends writing to its callers.
    """

    __slots__ = ("_content", "_handle", "_idle", "_loop", "waiting_since")

    def __init__(self, content: aiohttp.StreamReader, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._content = content
        self._idle = idle
        self.waiting_since: float | None = None
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(idle, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.waiting_since
        if since is not None and now - since >= self._idle:
            self._handle = None
            self._content.set_exception(_Idle())
            return
        due = (since if since is not None else now) + self._idle
        self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


@contextlib.asynccontextmanager
async def deadline(config: Upstream, started: float | None = None) -> AsyncIterator[None]:
    """Bound one upstream exchange, request to last byte, by `max_duration`
    from `started` (the loop's clock; now when None).

    One timer per call, not per read. Past it the work inside is cancelled
    (whoever holds the response closes it) and UpstreamTooLong is raised.
    """
    start = asyncio.get_running_loop().time() if started is None else started
    timeout = asyncio.timeout_at(start + config.max_duration)
    try:
        async with timeout:
            yield
    except TimeoutError as exc:
        if not timeout.expired():
            raise
        raise UpstreamTooLong(
            f"llm-sidecar: the upstream response took longer than {config.max_duration:g}s"
        ) from exc


def check_declared_size(response: aiohttp.ClientResponse, config: Upstream) -> None:
    """Refuse, before reading any of it, a body declared over `max_response_bytes`."""
    declared = response.content_length
    if declared is not None and declared > config.max_response_bytes:
        raise _too_large(config)


def _too_large(config: Upstream) -> UpstreamTooLarge:
    return UpstreamTooLarge(
        f"llm-sidecar: the upstream response is over {config.max_response_bytes} bytes"
    )


async def read_chunks(response: aiohttp.ClientResponse, config: Upstream) -> AsyncIterator[bytes]:
    """The response body as it arrives.

    A gap past `idle_timeout` or a cut is UpstreamBroken; a body past
    `max_response_bytes` (declared or read) is UpstreamTooLarge, raised
    before the chunk that would pass it is yielded.
    """
    idle_timeout, limit = config.idle_timeout, config.max_response_bytes
    check_declared_size(response, config)
    content = response.content
    loop = asyncio.get_running_loop()
    watch = _IdleWatch(content, idle_timeout)
    total = 0
    try:
        while True:
            watch.waiting_since = loop.time()
            try:
                chunk = await content.readany()
            except _Idle as exc:
                raise UpstreamIdle(
                    f"llm-sidecar: the upstream stream was idle for more than {idle_timeout:g}s"
                ) from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise UpstreamBroken(
                    f"llm-sidecar: the upstream stream broke ({type(exc).__name__})"
                ) from exc
            watch.waiting_since = None
            if not chunk:
                return
            total += len(chunk)
            if total > limit:
                raise _too_large(config)
            yield chunk
    finally:
        watch.stop()
