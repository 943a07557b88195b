"""The per-process budget of request bodies held at once.

A parsed JSON body costs many times its size (about 30x for a body of empty
objects), and a request holds its body until its answer is sent. Bounding
the body bytes held across all requests bounds that memory whatever the
callers send; a request past the budget gets a 503 the SDKs retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from proxy.errors import BodiesBusy


@dataclass
class BodyBudget:
    # Owned by the runtime; changed only synchronously, so no lock.
    in_use: int = 0

    @contextmanager
    def hold(self, size: int, limit: int) -> Iterator[None]:
        """Hold `size` bytes of `limit` while the block runs, or raise BodiesBusy.

        A body alone in the process is always let in, so a limit below
        `max_body_bytes` (after a reload) slows callers but never starves one.
        """
        if self.in_use and self.in_use + size > limit:
            raise BodiesBusy(limit)
        self.in_use += size
        try:
            yield
        finally:
            self.in_use -= size
