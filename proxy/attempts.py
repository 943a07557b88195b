"""Attempts: one upstream call as one or more tries, all before the response head.

`call_with_retries` is the pump's way to open the upstream response. It
runs inside the upstream slot the pump already holds, so a retry is not a
new call for the stage limit and followers keep waiting on the same
stream. It tries the route's targets per its strategy and retry rules
(`proxy.retry`, `proxy.targets`), counts each try against the target's
health (`proxy.outliers`) and the retry budget, and returns the response
the pump should relay: an answer, an error not worth retrying, or the last
retryable failure once the attempts, the budget or the targets run out.

It never touches the stream's head, which is what makes a retry safe: no
reader has seen a byte yet. The request key does not depend on the target,
so the answer is cached under the caller's request whichever target gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy.errors import ProxyError, UpstreamTimeout
from proxy.headers import CREDENTIAL_HEADERS
from proxy.policy import Upstream
from proxy.retry import (
    CONNECT_ERROR,
    TIMEOUT,
    Attempt,
    RetryState,
    backoff_delay,
    decide,
    is_failure,
    parse_retry_after,
)
from proxy.routing import CompiledRoute, CompiledTarget, Snapshot
from proxy.runtime import Runtime
from proxy.stream import Stream
from proxy.targets import choose, weighted
from proxy.upstream import open_upstream, upstream_url

log = logging.getLogger("llm_sidecar.attempts")


@dataclass(frozen=True, slots=True)
class Opened:
    """The response the pump relays, and the settings of the target that sent it."""

    response: aiohttp.ClientResponse
    upstream: Upstream  # its idle timeout applies to the body
    # The answering target's session lease: exit it once the response is
    # released, so a session a reload replaced closes after its last call.
    lease: contextlib.ExitStack


async def call_with_retries(
    rt: Runtime,
    stream: Stream,
    route: CompiledRoute,
    path: str,
    query: str,
    headers: CIMultiDict[str],
    body: Callable[[str | None], bytes],
) -> Opened:
    """Open the upstream response, retrying before the head; each try lands in `stream.attempts`.

    Each attempt holds a lease on its target's session from sending until
    its response is done with: a discarded answer's lease ends here, the
    returned one's is the caller's to exit (`Opened.lease`). Raises the last
    attempt's ProxyError (unreachable, timeout) when no target answered.
    """
    state = rt.retries
    index = _pick(state, route, None)
    payloads: dict[str | None, bytes] = {}  # the body per model rewrite, serialised once
    waited = 0.0
    retrying = False  # whether this call holds a retry budget token
    try:
        while True:
            target = route.targets[index]
            response: aiohttp.ClientResponse | None = None
            error: ProxyError | None = None
            with contextlib.ExitStack() as lease:
                session = lease.enter_context(rt.pool.lease(target.upstream_name, target.upstream))
                started = time.perf_counter()
                try:
                    response = await open_upstream(
                        session,
                        target.upstream,
                        "POST",
                        upstream_url(target.upstream, path, query),
                        _headers_for(route, target, headers),
                        _payload(target, body, payloads),
                    )
                except ProxyError as exc:
                    error = exc
                if retrying:
                    state.budget.release()
                    retrying = False
                try:
                    _record(rt, stream, route, target, response, error, started, waited)
                    following = _next(rt, route, index, response, len(stream.attempts))
                    if following is None or not _spend(rt, route):
                        if response is not None:
                            return Opened(response, target.upstream, lease.pop_all())
                        assert error is not None
                        raise error
                    retrying = True
                    rt.metrics.retries.inc()
                    if response is not None:
                        # aiohttp closes it, not pools it, if the body is unread.
                        response.release()
                except BaseException:
                    if response is not None:
                        response.close()
                    raise
            index, waited = following
            if waited > 0:
                await asyncio.sleep(waited)
    finally:
        if retrying:
            state.budget.release()


def _spend(rt: Runtime, route: CompiledRoute) -> bool:
    """Take a retry budget token, or count the refusal."""
    rules = route.retry
    active = rt.stages.upstream.stats().in_use  # this call's own slot included
    if rt.retries.budget.try_acquire(active, rules.budget_percent, rules.min_retry_concurrency):
        return True
    rt.metrics.retries_refused.labels("budget").inc()
    return False


def _record(
    rt: Runtime,
    stream: Stream,
    route: CompiledRoute,
    target: CompiledTarget,
    response: aiohttp.ClientResponse | None,
    error: ProxyError | None,
    started: float,
    waited: float,
) -> None:
    status = None if response is None else response.status
    kind = None
    if error is not None:
        kind = TIMEOUT if isinstance(error, UpstreamTimeout) else CONNECT_ERROR
    stream.attempts.append(
        Attempt(target.label, status, kind, time.perf_counter() - started, waited)
    )
    rt.metrics.upstream_call(route.index, status)
    rt.metrics.attempt(target.label, status if status is not None else kind or CONNECT_ERROR)
    state = rt.retries
    if not is_failure(status):
        if status != 429:  # the upstream pacing us says nothing about its health
            state.outliers.succeeded(target.id)
        return
    rules = route.retry
    ejected = state.outliers.failed(
        target.id,
        target.upstream,
        state.clock(),
        eject_after=rules.eject_after,
        eject_for=rules.eject_for,
        max_eject_for=rules.max_eject_for,
    )
    if ejected:
        rt.metrics.ejections.labels(target.label).inc()
        if log.isEnabledFor(logging.WARNING):
            view = state.outliers.view(target.id, state.clock())
            fields = {"target": target.label, **asdict(view)}
            log.warning("target ejected", extra={"fields": fields})


def _next(
    rt: Runtime,
    route: CompiledRoute,
    index: int,
    response: aiohttp.ClientResponse | None,
    done: int,
) -> tuple[int, float] | None:
    """The next target's index and the wait before it, or None: this outcome is final."""
    rules = route.retry
    status = None if response is None else response.status
    retry_after = None
    if response is not None and response.status in rules.on_status:
        retry_after = parse_retry_after(response.headers)
    decision = decide(status, retry_after, done, rules)
    if decision.kind == "stop":
        _refused(rt, decision.reason)
        return None
    if rt.draining:  # shutting down: no new work for the upstream
        _refused(rt, "draining")
        return None
    state = rt.retries
    target = route.targets[index]
    if decision.kind == "same" and not state.outliers.is_ejected(target.id, state.clock()):
        return index, decision.wait
    following = _pick(state, route, index)
    if following != index:
        return following, 0.0  # another target: no reason to wait
    if decision.kind in ("same", "next"):
        wait = decision.wait if decision.kind == "same" else _backoff(state, route, done)
        return index, wait
    _refused(rt, decision.reason)
    return None


def _backoff(state: RetryState, route: CompiledRoute, done: int) -> float:
    rules = route.retry
    return backoff_delay(done - 1, rules.backoff, rules.max_retry_wait, state.rng)


def _refused(rt: Runtime, reason: str) -> None:
    if reason:
        rt.metrics.retries_refused.labels(reason).inc()


def _pick(state: RetryState, route: CompiledRoute, failed: int | None) -> int:
    targets = route.targets
    if len(targets) == 1:
        return 0
    outliers = state.outliers
    if failed is None and not outliers.tracking:
        # Nothing anywhere is failing, the usual case: skip the health lists
        # (`choose` answers the same when every target is healthy).
        if route.strategy == "fallback":
            return 0
        return weighted(range(len(targets)), [t.weight for t in targets], state.rng)
    now = state.clock()
    return choose(
        route.strategy,
        [t.weight for t in targets],
        [outliers.is_ejected(t.id, now) for t in targets],
        [outliers.last_failure(t.id) for t in targets],
        state.rng,
        failed,
    )


def _headers_for(
    route: CompiledRoute, target: CompiledTarget, headers: CIMultiDict[str]
) -> CIMultiDict[str]:
    """The headers for `target`: each upstream's own key goes to that upstream only."""
    if target.upstream_key is route.upstream_key:
        return headers  # the first target's upstream, or neither injects a key
    out = headers.copy()
    primary = route.upstream_key
    if primary is not None and out.get("Authorization") == primary.reveal():
        # The first target's key took the caller's place; it is for its upstream only.
        out.popall("Authorization")
    if target.upstream_key is not None:
        for name in CREDENTIAL_HEADERS:
            out.popall(name, None)
        out["Authorization"] = target.upstream_key.reveal()
    return out


def _payload(
    target: CompiledTarget, body: Callable[[str | None], bytes], done: dict[str | None, bytes]
) -> bytes:
    data = done.get(target.model)
    if data is None:
        data = done[target.model] = body(target.model)
    return data


def reconcile_targets(rt: Runtime, snapshot: Snapshot) -> None:
    """After a reload: forget the health of targets that are gone or whose upstream changed."""
    rt.retries.outliers.reconcile(
        {target.id: target.upstream for route in snapshot.routes for target in route.targets}
    )


def targets_status(rt: Runtime) -> dict[str, dict[str, Any]]:
    """Every target of the policy and its health, by label, for /status."""
    state = rt.retries
    now = state.clock()
    out: dict[str, dict[str, Any]] = {}
    for route in rt.snapshot.routes:
        for target in route.targets:
            if target.label not in out:
                view = state.outliers.view(target.id, now)
                out[target.label] = {
                    "upstream": target.upstream_name,
                    "model": target.model,
                    **asdict(view),
                }
    return out
