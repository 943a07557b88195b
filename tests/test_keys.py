"""Request keys: equal exactly when the canonical inputs are equal."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.keys import ANONYMOUS_TENANT, canonical_body, request_key, tenant_of

IGNORE = ("stream", "stream_options", "user")

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
bodies = st.dictionaries(
    st.sampled_from(["model", "messages", "n", "stream", "user", "seed", "x"]), values, max_size=5
)
tenants = st.sampled_from(["t1", "t2"])
paths = st.sampled_from(["/v1/chat/completions", "/v1/embeddings"])


def _canonical(body: dict[str, Any]) -> str:
    kept = {k: v for k, v in body.items() if k not in IGNORE}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@settings(max_examples=300, deadline=None)
@given(tenants, paths, bodies, tenants, paths, bodies)
def test_key_equal_iff_canonical_inputs_equal(
    t1: str, p1: str, b1: dict[str, Any], t2: str, p2: str, b2: dict[str, Any]
) -> None:
    k1 = request_key(t1, "up", "POST", p1, b1, IGNORE)
    k2 = request_key(t2, "up", "POST", p2, b2, IGNORE)
    same_inputs = (t1, p1, _canonical(b1)) == (t2, p2, _canonical(b2))
    assert (k1 == k2) == same_inputs


queries = st.sampled_from(["", "api-version=2024-10-21", "api-version=2025-01-01-preview"])


@settings(max_examples=200, deadline=None)
@given(queries, bodies, queries, bodies)
def test_the_query_string_is_part_of_the_key(
    q1: str, b1: dict[str, Any], q2: str, b2: dict[str, Any]
) -> None:
    # Azure's api-version lives in the query: two versions are two calls.
    k1 = request_key("t", "up", "POST", "/p", b1, IGNORE, query=q1)
    k2 = request_key("t", "up", "POST", "/p", b2, IGNORE, query=q2)
    assert (k1 == k2) == ((q1, _canonical(b1)) == (q2, _canonical(b2)))


def test_a_request_without_a_query_keys_as_before_the_query_was_keyed() -> None:
    # The value the key function gave before it took a query: cached entries stay reachable.
    body = {"model": "m"}
    assert request_key("t", "up", "POST", "/p", body, IGNORE, query="") == (
        "bd2d0f3987b575e945cdb6ea90fd18b5b2bbec7c47d7628ec249f876fe272a78"
    )


@given(bodies)
def test_key_ignores_field_order_and_ignored_fields(body: dict[str, Any]) -> None:
    reordered = dict(reversed(list(body.items())))
    noisy = {
        **reordered,
        "stream": True,
        "user": "someone",
        "stream_options": {"include_usage": True},
    }
    assert request_key("t", "up", "POST", "/p", body, IGNORE) == request_key(
        "t", "up", "POST", "/p", noisy, IGNORE
    )


def test_canonical_body_is_compact_and_sorted() -> None:
    assert canonical_body({"b": 1, "a": {"d": 2, "c": 3}}, ()) == b'{"a":{"c":3,"d":2},"b":1}'


def test_tenant_hides_the_credential() -> None:
    secret = "Bearer sk-very-secret"
    tenant = tenant_of(secret)
    assert "secret" not in tenant and len(tenant) == 32
    assert tenant == tenant_of(secret) != tenant_of("Bearer other")
    assert tenant_of(None) == ANONYMOUS_TENANT
