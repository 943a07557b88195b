"""Which target an upstream call tries next: pure, seeded, no I/O.

A route lists targets (an upstream, an optional model rewrite, a weight).
`choose` picks the index of the next one from what the caller knows at
that moment: which targets are ejected, when each last failed, and which
one just failed. The `fallback` strategy goes down the list in order, the
`balance` strategy draws by weight; neither retries the target that just
failed while another is healthy, and a route whose targets are all ejected
still tries the least recently failed one rather than refusing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

Strategy = Literal["fallback", "balance"]


def target_label(upstream: str, model: str | None) -> str:
    """How a target is named in metrics, logs and /status: `upstream` or `upstream/model`."""
    return upstream if model is None else f"{upstream}/{model}"


def weighted(indexes: Sequence[int], weights: Sequence[float], rng: random.Random) -> int:
    """One of `indexes`, drawn with probability proportional to its weight."""
    if len(indexes) == 1:
        return indexes[0]
    total = sum(weights[i] for i in indexes)
    point = rng.random() * total
    for index in indexes:
        point -= weights[index]
        if point < 0:
            return index
    return indexes[-1]  # float rounding left a sliver past the last weight


def choose(
    strategy: Strategy,
    weights: Sequence[float],
    ejected: Sequence[bool],
    last_failure: Sequence[float],
    rng: random.Random,
    failed: int | None = None,
) -> int:
    """The index of the target to try now; `failed` is the one that just failed, if any.

    A one-target route always answers 0: retrying its only target is the
    caller's decision (after a backoff), not ours.
    """
    count = len(weights)
    if count == 1:
        return 0
    others = [i for i in range(count) if i != failed]
    healthy = [i for i in others if not ejected[i]]
    if healthy:
        if strategy == "balance":
            return weighted(healthy, weights, rng)
        if failed is None:
            return healthy[0]
        # The next healthy one down the list, wrapping around to the top.
        return min(healthy, key=lambda i: (i - failed) % count)
    if failed is not None and not ejected[failed]:
        return failed  # every other target is ejected: the one that failed is the best left
    # Every target is ejected: the one whose last failure is oldest gets the try.
    return min(others, key=lambda i: last_failure[i])
