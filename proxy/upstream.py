"""Upstream connections: one pooled aiohttp client per upstream, and the
translation of connection faults into the proxy's errors.

A connection that failed mid-exchange is closed by aiohttp, never reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict

from proxy.errors import UpstreamBroken, UpstreamTimeout, UpstreamUnavailable
from proxy.policy import Upstream


class UpstreamPool:
    """Owns one ClientSession per upstream configuration; closed at shutdown."""

    def __init__(self) -> None:
        # Keyed by name and the frozen config, so a reload that changes an
        # upstream gets a fresh pool while streams on the old one finish.
        self._sessions: dict[tuple[str, Upstream], aiohttp.ClientSession] = {}

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

    async def close(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            await session.close()


def upstream_url(config: Upstream, path: str, query: str) -> str:
    """Map `/v1/...` onto the upstream's base URL (which ends in its own /v1)."""
    base = config.base_url.rstrip("/")
    tail = path[3:] if path.startswith("/v1/") or path == "/v1" else path
    url = base + tail
    return f"{url}?{query}" if query else url


async def open_upstream(
    session: aiohttp.ClientSession,
    config: Upstream,
    method: str,
    url: str,
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


async def read_chunks(
    response: aiohttp.ClientResponse, idle_timeout: float
) -> AsyncIterator[bytes]:
    """The response body as it arrives; a gap past `idle_timeout` or a cut is UpstreamBroken."""
    content = response.content
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                chunk = await content.readany()
        except TimeoutError as exc:
            raise UpstreamBroken(
                f"llm-sidecar: the upstream stream was idle for more than {idle_timeout:g}s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(
                f"llm-sidecar: the upstream stream broke ({type(exc).__name__})"
            ) from exc
        if not chunk:
            return
        yield chunk
