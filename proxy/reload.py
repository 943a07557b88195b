"""Live reload: re-read the policy file, validate it whole, swap it in one step.

A reload builds a complete new `Snapshot` (`parse_policy` + `compile_policy`)
before touching anything; only then does it replace `rt.snapshot` (one
reference: each request read its snapshot when it started and keeps it)
and resize the stage limiters in place. A file that fails anywhere is
rejected with one log line naming the file, the path inside it and the
reason, and the old policy keeps serving.

One task (`Reloader.run`) does every reload, so reloads never overlap: a
signal only sets an event, a burst of signals while a reload runs becomes
one more reload, and since each reload reads the file when it starts, the
file's last content wins. With `reload.watch` on, the same task polls the
file every `reload.interval` and reloads when its fingerprint changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy import logs
from proxy.attempts import reconcile_targets
from proxy.cache.factory import build_cache
from proxy.cluster.link import RedisLink, settings_of
from proxy.policy import LoadedPolicy, Policy, PolicyError, parse_policy
from proxy.routing import compile_policy
from proxy.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What identifies a policy file's content. A Kubernetes ConfigMap volume
    swaps a symlink to a new directory, which may keep the old mtime, so the
    resolved path and the content hash count as much as the mtime."""

    resolved: str
    mtime_ns: int
    digest: str


def _read(path: Path) -> tuple[str, Fingerprint]:
    """The file's text and fingerprint, from one read."""
    try:
        resolved = os.path.realpath(path)
        data = path.read_bytes()
        mtime_ns = os.stat(resolved).st_mtime_ns
        text = data.decode("utf-8")
    except OSError as exc:
        raise PolicyError(str(path), "(file)", exc.strerror or str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), "(file)", f"not UTF-8 ({exc.reason})") from exc
    return text, Fingerprint(resolved, mtime_ns, hashlib.sha256(data).hexdigest())


def fingerprint(path: Path) -> Fingerprint | None:
    """The file's current fingerprint; None while it cannot be read."""
    try:
        return _read(path)[1]
    except PolicyError:
        return None


def apply_policy(rt: Runtime, loaded: LoadedPolicy) -> None:
    """Validate `loaded` completely, then make it the policy; PolicyError leaves all as it was."""
    snapshot = compile_policy(loaded, rt.hooks)
    old = rt.snapshot.loaded.policy
    new = loaded.policy
    cache = None
    if (old.cache, old.stages.cache) != (new.cache, new.stages.cache):
        # Built (and so validated) before the swap; it connects lazily.
        cache = build_cache(new, os.environ, source=loaded.source)
    cluster = settings_of(new, os.environ, loaded.source)
    current = None if rt.cluster is None else rt.cluster.settings
    link = None if cluster is None or cluster == current else RedisLink(cluster)
    # From here on nothing can fail: swap, then resize.
    rt.snapshot = snapshot
    rt.stages.resize(new.stages)
    reconcile_targets(rt, snapshot)
    rt.pool.retain(new.upstreams)  # sessions for replaced upstreams close once idle
    if cache is not None:
        # Lookups already in the old lane end as misses; its pending writes
        # get their grace while it closes in the background.
        rt.retire_cache(rt.cache)
        rt.cache = cache
        logs.event(
            "reload rebuilt cache",
            reason="cache settings changed; the new cache starts empty",
            old=cache_settings(old),
            new=cache_settings(new),
        )
    if cluster != current:
        # Flights under way finish on the old link; new ones use the new (or none).
        if rt.cluster is not None:
            rt.retire_cluster(rt.cluster)
        rt.cluster = link
        logs.event(
            "reload changed cross-replica coalescing",
            on=cluster is not None,
            lease=None if cluster is None else cluster.lease,
        )
    for section in ("listen", "admin"):
        if getattr(old, section) != getattr(new, section):
            logs.event(
                "reload kept old settings",
                logging.WARNING,
                section=section,
                reason="takes effect on restart",
            )


def cache_settings(policy: Policy) -> dict[str, Any]:
    """The cache's settings for a log line: `cache` and `stages.cache`, and
    never a password (only `password_env`'s name; one in the URL is masked)."""
    settings = policy.cache.model_dump(mode="json")
    settings["url"] = _masked(settings["url"])
    settings["stage"] = policy.stages.cache.model_dump(mode="json")
    return settings


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}***@{host}").geturl()


class Reloader:
    """Owns every reload of one runtime's policy file."""

    def __init__(
        self,
        rt: Runtime,
        path: Path,
        on_applied: Callable[[LoadedPolicy], None] | None = None,
    ) -> None:
        self._rt = rt
        self._path = path
        self._on_applied = on_applied
        self._wanted = asyncio.Event()
        # The fingerprint of the last content tried (applied or rejected), so
        # the watch neither reapplies a file nor repeats a rejection.
        self._seen = fingerprint(path)

    def request(self) -> None:
        """Ask for a reload; safe from a signal handler (it only sets an event)."""
        self._wanted.set()

    async def run(self) -> None:
        while True:
            settings = self._rt.snapshot.loaded.policy.reload
            try:
                async with asyncio.timeout(settings.interval if settings.watch else None):
                    await self._wanted.wait()
            except TimeoutError:
                current = fingerprint(self._path)
                if current is None or current == self._seen:
                    continue
                logs.event("policy file changed", logging.DEBUG, resolved=current.resolved)
                self.reload_now("watch")
            else:
                # Cleared before reading the file: a signal from now on
                # means one more reload, which will see later content.
                self._wanted.clear()
                self.reload_now("signal")

    def reload_now(self, trigger: str) -> bool:
        rt = self._rt
        previous = rt.snapshot.version
        try:
            text, seen = _read(self._path)
            self._seen = seen
            loaded = parse_policy(text, str(self._path))
            apply_policy(rt, loaded)
        except PolicyError as exc:
            rt.metrics.reloaded(False)
            logs.event(
                "reload failed",
                logging.ERROR,
                trigger=trigger,
                file=exc.file,
                path=exc.path,
                reason=exc.reason,
                error=str(exc),
                version=previous,
            )
            return False
        rt.metrics.reloaded(True)
        if self._on_applied is not None:
            self._on_applied(loaded)
        logs.event("reload ok", trigger=trigger, version=loaded.version, previous=previous)
        return True
