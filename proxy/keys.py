"""Request keys and tenants: pure functions, no I/O.

A key identifies "the same request": same tenant, upstream, method, path,
query string, values of the route's `vary_headers`, and canonical body minus
the fields the route ignores. The tenant is a hash of the credentials a
caller presented (headers, or a credential parameter in the query string)
or of a header value; the raw value never leaves this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus

from proxy import jsonbody

SHARED_TENANT = "shared"
ANONYMOUS_TENANT = "anonymous"

# Query parameters that carry a credential (Google-style `key`, Azure-style
# `api-key`, OAuth's `access_token`, ...): they make the tenant, and are left
# out of the key's query so they are hashed once, as the tenant, and nowhere else.
QUERY_CREDENTIALS = frozenset(
    {"key", "api-key", "api_key", "apikey", "x-api-key", "access_token", "token"}
)


def _utf8(value: str) -> bytes:
    # Header values that were not UTF-8 arrive with surrogate escapes.
    return value.encode("utf-8", "surrogateescape")


def tenant_of(value: str | None, *more: str | None) -> str:
    """A stable, non-reversible tenant id for the credentials (or the header
    value) a caller presented. One value hashes as it always has."""
    present = [v for v in (value, *more) if v]
    if not present:
        return ANONYMOUS_TENANT
    joined = b"\0".join(_utf8(v) for v in present)
    return hashlib.sha256(b"llm-sidecar-tenant\0" + joined).hexdigest()[:32]


def tenant_of_credentials(
    headers: Iterable[tuple[str, str]], query_credentials: str | None = None
) -> str:
    """The tenant for every credential a caller presented: each (name, value)
    header pair, each value of a repeated header, and the query's credentials.

    Order-independent per name. A caller with a single credential hashes as
    `tenant_of(value)` always has, so entries cached by older versions stay
    reachable; any second credential makes another tenant.
    """
    pairs = sorted(set(headers))
    if query_credentials:
        pairs.extend(("?", value) for value in query_credentials.split("\0"))
    if len(pairs) <= 1:
        return tenant_of(pairs[0][1] if pairs else None)
    # Name and value tagged: `authorization: X` + `api-key: A` never equals
    # `authorization: X` + `x-api-key: A`; header values cannot hold NUL.
    return tenant_of(*(f"{name}\x01{value}" for name, value in pairs))


def split_query(query: str) -> tuple[str, str | None]:
    """The raw query string without its credential parameters, and those
    credentials (joined), or None when it carries none."""
    if not query:
        return "", None
    kept: list[str] = []
    credentials: list[str] = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if unquote_plus(name).strip().lower() in QUERY_CREDENTIALS:
            credentials.append(unquote_plus(value))
        else:
            kept.append(pair)
    # Sorted: the order of credential parameters never makes another tenant.
    return "&".join(kept), "\0".join(sorted(credentials)) if credentials else None


def canonical_body(body: Mapping[str, Any], ignore: Iterable[str]) -> bytes:
    ignored = frozenset(ignore)
    kept = {k: v for k, v in body.items() if k not in ignored}
    # Sorted keys at every depth, compact separators: one byte string per
    # meaning (an integer wider than 64 bits written exactly).
    return jsonbody.dumps(kept, sort_keys=True)


def request_key(
    tenant: str,
    upstream: str,
    method: str,
    path: str,
    body: Mapping[str, Any],
    ignore: Iterable[str],
    *,
    query: str = "",
    vary: Iterable[str | None] = (),
) -> str:
    """`query` is the raw query string without credentials (`split_query`);
    `vary` the values of the route's `vary_headers`, in their order.

    A request with no query and no vary headers keys as it did before either
    existed, so entries cached by an older version stay reachable.
    Raises TypeError (orjson's) for a body nested deeper than it can write.
    """
    digest = hashlib.sha256()
    for part in (tenant, upstream, method.upper(), path):
        digest.update(_utf8(part))
        digest.update(b"\0")
    if query:
        # "?" and "\x01" cannot start the canonical body (always "{"), so no
        # request with a query collides with one without.
        digest.update(b"?" + _utf8(query) + b"\0")
    for value in vary:
        digest.update(b"\x01" if value is None else b"\x02" + _utf8(value))
        digest.update(b"\0")
    digest.update(canonical_body(body, ignore))
    return digest.hexdigest()
