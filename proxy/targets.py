"""Which target an upstream call tries next: pure, seeded, no I/O.

A route lists targets (an upstream, an optional model rewrite, a weight).
`choose` picks the index of the next one from what the caller knows at
that moment: which targets are ejected, when each last failed, and which
one just failed. The `fallback` strategy goes down the list in order, the
`balance` strategy draws by weight; neither retries the target that just
failed while another is healthy. A route whose targets are all ejected
still tries the least recently failed one rather than refusing, once: a
failure there is not retried on another ejected target.
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
) -> int | None:
    """The index of the target to try now; `failed` is the one that just failed, if any.

    None: no target is worth another try (every one is ejected), so the
    failure stands. A first try (`failed` None) always gets a target: when
    every one is ejected, the one whose last failure is oldest.
    """
    count = len(weights)
    others = [i for i in range(count) if i != failed]
    healthy = [i for i in others if not ejected[i]]
    if healthy:
        if strategy == "balance":
            return weighted(healthy, weights, rng)
        if failed is None:
            return healthy[0]
        # The next healthy one down the list, wrapping around to the top.
        return min(healthy, key=lambda i: (i - failed) % count)
    if failed is not None:
        # Every other target is ejected: the one that failed, unless it is too.
        return None if ejected[failed] else failed
    # Every target is ejected: one try, at the one whose last failure is oldest.
    return min(others, key=lambda i: last_failure[i])
