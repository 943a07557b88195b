"""Request keys and tenants: pure functions, no I/O.

A key identifies "the same request": same tenant, upstream, method, path,
query string (Azure's `api-version`) and canonical body minus the fields the
route ignores. The tenant is a hash of
a credential or header value; the raw value never leaves this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

SHARED_TENANT = "shared"
ANONYMOUS_TENANT = "anonymous"


def tenant_of(value: str | None) -> str:
    """A stable, non-reversible tenant id for a credential or header value."""
    if not value:
        return ANONYMOUS_TENANT
    return hashlib.sha256(b"llm-sidecar-tenant\0" + value.encode()).hexdigest()[:32]


def canonical_body(body: Mapping[str, Any], ignore: Iterable[str]) -> bytes:
    ignored = frozenset(ignore)
    kept = {k: v for k, v in body.items() if k not in ignored}
    # Sorted keys at every depth, compact separators: one byte string per meaning.
    return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)


def request_key(
    tenant: str,
    upstream: str,
    method: str,
    path: str,
    body: Mapping[str, Any],
    ignore: Iterable[str],
    *,
    query: str = "",
) -> str:
    """`query` is the raw query string; a request without one keys as before
    the query was part of the key, so entries cached then stay reachable."""
    digest = hashlib.sha256()
    for part in (tenant, upstream, method.upper(), path):
        digest.update(part.encode())
        digest.update(b"\0")
    if query:
        # "?" cannot start the canonical body (always "{"): no collision with a
        # request without a query.
        digest.update(b"?" + query.encode() + b"\0")
    digest.update(canonical_body(body, ignore))
    return digest.hexdigest()
