"""The pure retry logic: target choice, retry decisions, Retry-After, backoff, budget, ejection.

Seeded randomness and an explicit clock: every assertion here is exact.
"""

from __future__ import annotations

import collections
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from proxy.outliers import Outliers
from proxy.policy import Retry
from proxy.retry import RetryBudget, RetryRules, backoff_delay, decide, parse_retry_after
from proxy.targets import Strategy, choose, target_label, weighted

NONE_EJECTED = (False, False, False)
NEVER_FAILED = (float("-inf"),) * 3


def rules(**changes: object) -> RetryRules:
    return RetryRules.compile(Retry.model_validate(changes), targets=2, queue_timeout=60.0)


# -- choosing a target ------------------------------------------------------------------------


def test_fallback_starts_at_the_first_healthy_target_in_order() -> None:
    rng = random.Random(1)
    weights = (1.0, 5.0, 1.0)
    assert choose("fallback", weights, NONE_EJECTED, NEVER_FAILED, rng) == 0
    assert choose("fallback", weights, (True, False, False), NEVER_FAILED, rng) == 1


def test_fallback_goes_down_the_list_and_wraps_around() -> None:
    rng = random.Random(1)
    weights = (1.0, 1.0, 1.0)
    assert choose("fallback", weights, NONE_EJECTED, NEVER_FAILED, rng, failed=0) == 1
    assert choose("fallback", weights, NONE_EJECTED, NEVER_FAILED, rng, failed=1) == 2
    assert choose("fallback", weights, NONE_EJECTED, NEVER_FAILED, rng, failed=2) == 0
    # An ejected next one is skipped.
    assert choose("fallback", weights, (False, True, False), NEVER_FAILED, rng, failed=0) == 2


def test_balance_never_picks_the_target_that_just_failed() -> None:
    rng = random.Random(7)
    weights = (100.0, 1.0, 1.0)
    picks = {choose("balance", weights, NONE_EJECTED, NEVER_FAILED, rng, 0) for _ in range(500)}
    assert picks == {1, 2}


def test_balance_draws_by_weight() -> None:
    rng = random.Random(42)
    counts = collections.Counter(
        choose("balance", (3.0, 1.0), (False, False), (0.0, 0.0), rng) for _ in range(10_000)
    )
    # Binomial(10000, 0.75): sd is about 43; 5 sd either side.
    assert abs(counts[0] - 7_500) < 5 * 43
    assert counts[0] + counts[1] == 10_000


def test_weighted_is_deterministic_for_a_seed() -> None:
    first = [weighted((0, 1, 2), (1.0, 2.0, 3.0), random.Random(3)) for _ in range(5)]
    again = [weighted((0, 1, 2), (1.0, 2.0, 3.0), random.Random(3)) for _ in range(5)]
    assert first == again


def test_only_ejected_targets_left_tries_the_least_recently_failed() -> None:
    rng = random.Random(1)
    ejected = (True, True, True)
    last = (30.0, 10.0, 20.0)
    strategies: tuple[Strategy, ...] = ("fallback", "balance")
    for strategy in strategies:
        assert choose(strategy, (1.0, 1.0, 1.0), ejected, last, rng) == 1
        # That one try failed: no tour of the other ejected targets.
        assert choose(strategy, (1.0, 1.0, 1.0), ejected, last, rng, failed=1) is None


def test_the_failed_target_is_retried_when_it_is_the_only_healthy_one() -> None:
    rng = random.Random(1)
    assert choose("balance", (1.0, 1.0), (False, True), (5.0, 1.0), rng, failed=0) == 0


def test_a_one_target_route_gets_its_target_again_unless_it_is_ejected() -> None:
    rng = random.Random(1)
    assert choose("balance", (1.0,), (True,), (1.0,), rng) == 0  # a first try always goes
    assert choose("balance", (1.0,), (False,), (1.0,), rng, failed=0) == 0
    assert choose("balance", (1.0,), (True,), (1.0,), rng, failed=0) is None


def test_a_pause_skips_a_target_without_counting_as_a_failure() -> None:
    outliers = Outliers()
    outliers.paused(A, CONFIG, 100.0, 30.0)
    assert outliers.is_ejected(A, 129.9) and not outliers.is_ejected(A, 130.0)
    view = outliers.view(A, 110.0)
    assert (view.consecutive_failures, view.ejections, view.ejected) == (0, 0, True)
    assert (view.ejected_for_s, view.paused_for_s) == (20.0, 20.0)
    assert not fail(outliers, 101.0) and not fail(outliers, 102.0)  # it still takes 3 failures
    restored = outliers.succeeded(A)
    assert restored is not None and not outliers.tracking


def test_target_labels() -> None:
    assert target_label("openai", None) == "openai"
    assert target_label("azure", "gpt-4o-eu") == "azure/gpt-4o-eu"


# -- deciding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 200])
def test_statuses_off_the_list_are_final(status: int) -> None:
    decision = decide(status, None, 1, rules(attempts=5))
    assert (decision.kind, decision.reason) == ("stop", "")


def test_the_never_list_wins_over_a_compiled_list() -> None:
    # The policy refuses such a list; the decision does not rely on it.
    compiled = RetryRules(5, frozenset({400, 503}), 0.5, 5.0, 20.0, 3)
    assert decide(400, None, 1, compiled).kind == "stop"


@pytest.mark.parametrize("status", [None, 429, 500, 502, 503, 504])
def test_default_retryable_outcomes(status: int | None) -> None:
    assert decide(status, None, 1, rules(attempts=3)).kind == "next"


def test_attempts_run_out() -> None:
    decision = decide(503, None, 3, rules(attempts=3))
    assert (decision.kind, decision.reason) == ("stop", "attempts")


def test_a_one_target_route_without_a_retry_block_never_retries() -> None:
    one = RetryRules.compile(Retry(), targets=1, queue_timeout=60.0)
    assert one.attempts == 1
    assert decide(503, None, 1, one).kind == "stop"
    assert RetryRules.compile(Retry(), targets=3, queue_timeout=60.0).attempts == 3


def test_a_retry_block_without_attempts_retries_at_least_once() -> None:
    def attempts(targets: int) -> int:
        return RetryRules.compile(Retry(), targets, 60.0, given=True).attempts

    assert (attempts(1), attempts(2), attempts(3)) == (2, 2, 3)
    explicit = RetryRules.compile(Retry(attempts=1), 1, 60.0, given=True)
    assert explicit.attempts == 1  # a count written down wins


def test_the_default_longest_wait_stays_under_the_upstream_queue_timeout() -> None:
    assert RetryRules.compile(Retry(), 1, queue_timeout=60.0).max_retry_wait == 5.0
    assert RetryRules.compile(Retry(), 1, queue_timeout=0.5).max_retry_wait == 0.5
    assert RetryRules.compile(Retry(max_retry_wait=2.0), 1, 60.0).max_retry_wait == 2.0


def test_retry_after_within_the_limit_waits_on_the_same_target() -> None:
    decision = decide(429, 1.0, 1, rules(attempts=3, max_retry_wait="5s"))
    assert (decision.kind, decision.wait) == ("same", 1.0)


def test_retry_after_past_the_limit_moves_on_at_once() -> None:
    decision = decide(429, 30.0, 1, rules(attempts=3, max_retry_wait="5s"))
    assert (decision.kind, decision.wait, decision.reason) == ("other", 0.0, "retry_after")


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "1"}) == 1.0
    assert parse_retry_after({"retry-after": " 2 "}) == 2.0
    assert parse_retry_after({"retry-after-ms": "20"}) == 0.02
    # OpenAI sends both; the precise one wins.
    assert parse_retry_after({"retry-after-ms": "150", "retry-after": "1"}) == 0.15
    when = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    now = datetime(2030, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after({"retry-after": format_datetime(when, usegmt=True)}, now) == 30.0
    assert parse_retry_after({"retry-after": format_datetime(when, usegmt=True)}, now + 60) == 0.0


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", ""])
def test_unusable_retry_after_is_ignored(value: str) -> None:
    assert parse_retry_after({"retry-after": value}) is None
    assert parse_retry_after({"retry-after-ms": value}) is None
    assert parse_retry_after({}) is None


def test_full_jitter_backoff_stays_under_its_growing_ceiling() -> None:
    rng = random.Random(5)
    for retry in range(8):
        ceiling = min(4.0, 0.5 * 2**retry)
        draws = [backoff_delay(retry, 0.5, 4.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.9  # jitter spans the range, not a fixed delay
    assert backoff_delay(3, 0.5, 4.0, random.Random(9)) == backoff_delay(
        3, 0.5, 4.0, random.Random(9)
    )


# -- the budget -----------------------------------------------------------------------------------


def test_budget_is_a_share_of_active_calls_with_a_floor() -> None:
    budget = RetryBudget()
    granted = sum(budget.try_acquire(50, 20.0, 3) for _ in range(50))
    assert granted == 10
    assert budget.in_flight == 10
    budget.release()
    assert budget.try_acquire(50, 20.0, 3)
    assert not budget.try_acquire(50, 20.0, 3)


def test_budget_floor_applies_when_few_calls_are_active() -> None:
    budget = RetryBudget()
    assert sum(budget.try_acquire(2, 20.0, 3) for _ in range(10)) == 3
    assert sum(RetryBudget().try_acquire(2, 20.0, 0) for _ in range(10)) == 0


# -- ejection ----------------------------------------------------------------------------------

A = ("a", None)
CONFIG = "a-settings"


def fail(outliers: Outliers, now: float, target: tuple[str, str | None] = A) -> bool:
    return outliers.failed(target, CONFIG, now, eject_after=3, eject_for=10.0, max_eject_for=35.0)


def test_ejected_after_n_failures_in_a_row_then_back_after_the_cool_down() -> None:
    outliers = Outliers()
    assert [fail(outliers, t) for t in (1.0, 2.0)] == [False, False]
    assert not outliers.is_ejected(A, 2.0)
    assert fail(outliers, 3.0)
    assert outliers.is_ejected(A, 3.0)
    assert outliers.is_ejected(A, 12.9)
    assert not outliers.is_ejected(A, 13.0)
    view = outliers.view(A, 5.0)
    assert (view.consecutive_failures, view.ejections, view.ejected, view.ejected_for_s) == (
        3,
        1,
        True,
        8.0,
    )


def test_the_cool_down_doubles_while_it_keeps_failing_up_to_the_cap() -> None:
    outliers = Outliers()
    for t in (1.0, 2.0, 3.0):
        fail(outliers, t)
    lengths = []
    now = 3.0
    for _ in range(4):
        now += outliers.view(A, now).ejected_for_s  # wait the cool-down out
        assert not outliers.is_ejected(A, now)
        assert fail(outliers, now)  # one more failure is enough after a cool-down
        lengths.append(outliers.view(A, now).ejected_for_s)
    assert lengths == [20.0, 35.0, 35.0, 35.0]


def test_a_failure_while_ejected_does_not_extend_the_cool_down() -> None:
    outliers = Outliers()
    for t in (1.0, 2.0, 3.0):
        fail(outliers, t)
    assert not fail(outliers, 5.0)
    assert outliers.view(A, 5.0).ejected_for_s == 8.0
    assert outliers.last_failure(A) == 5.0


def test_success_clears_the_record() -> None:
    outliers = Outliers()
    for t in (1.0, 2.0):
        fail(outliers, t)
    outliers.succeeded(A)
    assert not fail(outliers, 3.0)  # counting starts again
    assert outliers.last_failure(("b", None)) == float("-inf")


def test_reconcile_forgets_targets_that_changed_or_left() -> None:
    outliers = Outliers()
    b, c = ("b", None), ("c", "m")
    for target in (A, b, c):
        for t in (1.0, 2.0, 3.0):
            fail(outliers, t, target)
    outliers.reconcile({A: CONFIG, b: "b-moved-elsewhere"})
    assert outliers.is_ejected(A, 4.0)
    assert not outliers.is_ejected(b, 4.0)
    assert not outliers.is_ejected(c, 4.0)
