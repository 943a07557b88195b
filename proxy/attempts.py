"""Attempts: one upstream call as one or more tries, all before the response head.

`call_with_retries` is the pump's way to open the upstream response. It
runs inside the upstream slot the pump already holds, so a retry is not a
new call for the stage limit and followers keep waiting on the same
stream. It tries the route's targets per its strategy and retry rules
(`proxy.retry`, `proxy.targets`), counts each try against the target's
health (`proxy.outliers`), and returns the response the pump should relay:
an answer, an error not worth retrying, or the last retryable failure once
the attempts, the budget or the healthy targets run out.

What bounds the load (Envoy's split between a retry budget and outlier
detection): a first try at another healthy target is a fallback, bounded
by health, since an ejected target is skipped; going back to a target that
already failed for this call is a retry, which waits a backoff (or the
target's Retry-After) and spends from the retry budget. A target whose
every peer is ejected gets one try, never a tour of the ejected ones.

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
from dataclasses import asdict, dataclass, replace
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy.errors import ProxyError, UpstreamBroken, UpstreamIdle, UpstreamTimeout
from proxy.headers import CREDENTIAL_HEADERS
from proxy.policy import Upstream
from proxy.retry import (
    BROKEN,
    CONNECT_ERROR,
    IDLE_TIMEOUT,
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

# Refusals after which the caller's SDK must not retry either: the proxy's
# own rules (budget, health) said no, and a client retry would only add load.
_FINAL_REFUSALS = frozenset({"budget", "ejected"})


@dataclass(frozen=True, slots=True)
class Opened:
    """The response the pump relays, and the target that sent it."""

    response: aiohttp.ClientResponse
    target: CompiledTarget  # its upstream's idle timeout and bounds apply to the body
    # The answering target's session lease: exit it once the response is
    # released, so a session a reload replaced closes after its last call.
    lease: contextlib.ExitStack

    @property
    def upstream(self) -> Upstream:
        return self.target.upstream


@dataclass(frozen=True, slots=True)
class _Step:
    """The next attempt: which target, after how long, and whether it spends budget."""

    index: int
    wait: float
    # A retry onto a target that already failed for this call, which is
    # what multiplies load in an outage; a first try at another healthy
    # target is bounded by health (ejection) instead.
    budgeted: bool


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
    assert index is not None  # a first try always gets a target
    payloads: dict[str | None, bytes] = {}  # the body per model rewrite, serialised once
    tried: set[int] = set()  # targets that failed for this call
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
                    retry_after = _retry_after(route, response)
                    _record(rt, stream, route, target, response, error, started, waited)
                    _pause(rt, target, retry_after)
                    tried.add(index)
                    done = len(stream.attempts)
                    step = _next(rt, route, index, response, retry_after, tried, done)
                    if isinstance(step, _Step) and step.budgeted and not _spend(rt, route):
                        step = "budget"
                    if isinstance(step, str):
                        _final(rt, stream, response, step)
                        if response is not None:
                            return Opened(response, target, lease.pop_all())
                        assert error is not None
                        raise error
                    retrying = step.budgeted
                    rt.metrics.retried()
                    if response is not None:
                        # aiohttp closes it, not pools it, if the body is unread.
                        response.release()
                except BaseException:
                    if response is not None:
                        response.close()
                    raise
            index, waited = step.index, step.wait
            if waited > 0:
                await asyncio.sleep(waited)
    finally:
        if retrying:
            state.budget.release()


def _spend(rt: Runtime, route: CompiledRoute) -> bool:
    """Take a retry budget token."""
    rules = route.retry
    active = rt.stages.upstream.stats().in_use  # this call's own slot included
    return rt.retries.budget.try_acquire(active, rules.budget_percent, rules.min_retry_concurrency)


def _final(
    rt: Runtime, stream: Stream, response: aiohttp.ClientResponse | None, reason: str
) -> None:
    """The last attempt's outcome stands; `reason`: why a retryable one was not retried
    ("" when it was not retryable: an answer, or the caller's own fault)."""
    if reason:
        rt.metrics.retry_refused(reason)
    if response is not None and response.status < 400:
        return
    if len(stream.attempts) > 1 or reason in _FINAL_REFUSALS:
        stream.retries_spent = True  # whatever the status: the SDK retries any 5xx


def _retry_after(route: CompiledRoute, response: aiohttp.ClientResponse | None) -> float | None:
    if response is None or response.status not in route.retry.on_status:
        return None
    return parse_retry_after(response.headers)


def _pause(rt: Runtime, target: CompiledTarget, retry_after: float | None) -> None:
    """A target that asked for a pause is skipped that long (at most `max_eject_for`)."""
    if retry_after:
        upstream = target.upstream
        seconds = min(retry_after, max(upstream.max_eject_for, upstream.eject_for))
        state = rt.retries
        state.outliers.paused(target.id, upstream, state.clock(), seconds)


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
    # An answer clears the target's record only once its body is whole (`body_done`).
    if is_failure(status):
        _failed(rt, target)


def _failed(rt: Runtime, target: CompiledTarget) -> None:
    """Count a failure against `target`; eject it past its upstream's threshold."""
    state = rt.retries
    upstream = target.upstream
    ejected = state.outliers.failed(
        target.id,
        upstream,
        state.clock(),
        eject_after=upstream.eject_after,
        eject_for=upstream.eject_for,
        max_eject_for=max(upstream.max_eject_for, upstream.eject_for),
    )
    if ejected:
        rt.metrics.ejected(target.label)
        if log.isEnabledFor(logging.WARNING):
            view = state.outliers.view(target.id, state.clock())
            fields = {"target": target.label, **asdict(view)}
            log.warning("target ejected", extra={"fields": fields})


def body_done(rt: Runtime, opened: Opened) -> None:
    """The answer's body was read whole: an answer under 500 (not a 429) clears the record."""
    status = opened.response.status
    if is_failure(status) or status == 429:
        return  # a failure counted at its head; a 429 neither counts nor clears
    restored = rt.retries.outliers.succeeded(opened.target.id)
    if restored is not None and restored.ejections and log.isEnabledFor(logging.INFO):
        fields = {"target": opened.target.label, "ejections": restored.ejections}
        log.info("target restored", extra={"fields": fields})


def body_failed(rt: Runtime, stream: Stream, opened: Opened, error: UpstreamBroken) -> None:
    """The answer's body stalled or broke after its head: too late to retry, but it
    was the target's failure, on the access line and in its health."""
    if type(error) not in (UpstreamBroken, UpstreamIdle):
        return  # a bound of ours (size, duration) says nothing about the target's health
    if stream.attempts:
        kind = IDLE_TIMEOUT if isinstance(error, UpstreamIdle) else BROKEN
        stream.attempts[-1] = replace(stream.attempts[-1], error=kind)
    _failed(rt, opened.target)


def _next(
    rt: Runtime,
    route: CompiledRoute,
    index: int,
    response: aiohttp.ClientResponse | None,
    retry_after: float | None,
    tried: set[int],
    done: int,
) -> _Step | str:
    """The next attempt, or why this outcome is final ("" when it is not a retryable one)."""
    rules = route.retry
    status = None if response is None else response.status
    decision = decide(status, retry_after, done, rules)
    if decision.kind == "stop":
        return decision.reason
    if rt.draining:  # shutting down: no new work for the upstream
        return "draining"
    state = rt.retries
    # A target that said when to come back is judged as of then.
    following = _pick(state, route, index, decision.wait if decision.kind == "same" else 0.0)
    if following is None:
        if decision.kind == "other":
            return decision.reason  # it asked for longer than we wait, and no one else is left
        return "ejected"  # every target is ejected: the one try was the least recently failed
    if following != index:
        if following not in tried:
            return _Step(following, 0.0, budgeted=False)  # another healthy target, at once
        # Wrapped around to a target that failed already: back off first.
        return _Step(following, _backoff(state, route, done), budgeted=True)
    if decision.kind == "same":
        return _Step(index, decision.wait, budgeted=True)
    if decision.kind == "next":
        return _Step(index, _backoff(state, route, done), budgeted=True)
    return decision.reason  # its Retry-After is too long and no other target is left


def _backoff(state: RetryState, route: CompiledRoute, done: int) -> float:
    rules = route.retry
    return backoff_delay(done - 1, rules.backoff, rules.max_retry_wait, state.rng)


def _pick(
    state: RetryState, route: CompiledRoute, failed: int | None, wait: float = 0.0
) -> int | None:
    """The target to try: a first try when `failed` is None, else after `failed`
    failed (judged `wait` seconds from now). None: none is worth another try."""
    targets = route.targets
    outliers = state.outliers
    if failed is None and (len(targets) == 1 or not outliers.tracking):
        # Nothing anywhere is failing, the usual case: skip the health lists
        # (`choose` answers the same when every target is healthy).
        if route.strategy == "fallback" or len(targets) == 1:
            return 0
        return weighted(range(len(targets)), [t.weight for t in targets], state.rng)
    now = state.clock()
    return choose(
        route.strategy,
        [t.weight for t in targets],
        [
            outliers.is_ejected(t.id, now + wait if i == failed else now)
            for i, t in enumerate(targets)
        ],
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
