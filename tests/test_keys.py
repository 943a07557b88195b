"""Request keys: equal exactly when the canonical inputs are equal."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import jsonbody
from proxy.keys import (
    ANONYMOUS_TENANT,
    canonical_body,
    request_key,
    split_query,
    tenant_of,
    tenant_of_credentials,
)

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


def test_the_query_string_is_in_the_key() -> None:
    body = {"model": "m"}
    plain = request_key("t", "up", "POST", "/p", body, IGNORE)
    a = request_key("t", "up", "POST", "/p", body, IGNORE, query="api-version=A")
    b = request_key("t", "up", "POST", "/p", body, IGNORE, query="api-version=B")
    assert len({plain, a, b}) == 3
    # No query and no vary headers: the key an older version computed.
    assert plain == request_key("t", "up", "POST", "/p", body, IGNORE, query="", vary=())


def test_vary_header_values_are_in_the_key() -> None:
    body = {"model": "m"}
    keys = {
        request_key("t", "up", "POST", "/p", body, IGNORE, vary=[value])
        for value in (None, "", "org-a", "org-b")
    }
    assert len(keys) == 4
    assert request_key("t", "up", "POST", "/p", body, IGNORE, vary=["a", None]) != request_key(
        "t", "up", "POST", "/p", body, IGNORE, vary=[None, "a"]
    )


def test_credentials_in_the_query_become_the_tenant_not_the_key() -> None:
    assert split_query("") == ("", None)
    assert split_query("api-version=2024-06-01") == ("api-version=2024-06-01", None)
    assert split_query("key=sk-1&api-version=A") == ("api-version=A", "sk-1")
    assert split_query("api-version=A&API-KEY=sk-2&%6Bey=sk-3") == ("api-version=A", "sk-2\0sk-3")
    assert split_query("api_key=a%2Bb&access_token=t") == ("", "a+b\0t")
    # The credential counts with the header's: either one changes the tenant.
    header = "Bearer sk-h"
    assert tenant_of(header) == tenant_of(header, None)
    assert len({tenant_of(header), tenant_of(header, "sk-q"), tenant_of(None, "sk-q")}) == 3
    assert "sk-q" not in tenant_of(None, "sk-q")


def test_header_bytes_that_were_not_utf8_still_hash() -> None:
    # aiohttp hands such bytes over as surrogate escapes; hashing must not raise.
    value = b"Bearer \xff\xfe".decode("utf-8", "surrogateescape")
    assert len(tenant_of(value)) == 32
    assert request_key(tenant_of(value), "up", "POST", "/p", {}, IGNORE, vary=[value])


def test_the_tenant_covers_every_credential_in_any_order() -> None:
    bearer = ("authorization", "Bearer X")
    assert tenant_of_credentials([bearer]) == tenant_of("Bearer X")  # unchanged for one
    a = tenant_of_credentials([bearer, ("api-key", "A")])
    assert a != tenant_of_credentials([bearer, ("api-key", "B")])
    assert a != tenant_of_credentials([bearer, ("x-api-key", "A")])
    assert a == tenant_of_credentials([("api-key", "A"), bearer])
    assert a != tenant_of_credentials([bearer, ("api-key", "A")], "q")
    assert tenant_of_credentials([], "q") == tenant_of(None, "q")


def test_wide_integers_key_exactly_and_ordinary_bodies_key_as_before() -> None:
    def key(raw: bytes) -> str:
        return request_key("t", "u", "POST", "/v1/x", jsonbody.loads(raw), ())

    assert key(b'{"seed":1180591620717411303424}') != key(b'{"seed":1180591620717411303425}')
    # Formatting and member order still do not matter on the exact path.
    assert key(b'{"seed": 1180591620717411303424, "a": 1}') == key(
        b'{"a":1,"seed":1180591620717411303424}'
    )
    # Digits inside a string take the exact path and key as the fast one would.
    ordinary = b'{"user_text":"1234567890123456789012","n":1}'
    assert key(ordinary) == request_key("t", "u", "POST", "/v1/x", orjson.loads(ordinary), ())
    # Duplicate members: the last one wins, as in the upstream's parser.
    assert key(b'{"model":"A","model":"B"}') == key(b'{"model":"B"}')
