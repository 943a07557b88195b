"""Header hygiene between caller, proxy and upstream.

Hop-by-hop headers (RFC 9110 §7.6.1) and any header the `Connection` header
names belong to one connection and never cross the proxy.
"""

from __future__ import annotations

import enum

from multidict import CIMultiDict, CIMultiDictProxy

Headers = CIMultiDictProxy[str] | CIMultiDict[str]

# The response header that says which path served a request.
SERVED_BY = "x-llm-sidecar"
# The response header that says how many upstream attempts a stream took.
ATTEMPTS_HEADER = "x-llm-sidecar-attempts"
# Honoured by the OpenAI Python and Node SDKs: "false" and they do not retry,
# set once the proxy has retried (or refused to), so retries never multiply.
SHOULD_RETRY_HEADER = "x-should-retry"


class Served(enum.StrEnum):
    """Which path served a request: the value of `SERVED_BY` and the metrics label."""

    LEAD = "lead"
    FOLLOW = "follow"
    HIT = "hit"
    BYPASS = "bypass"


HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed by aiohttp on each side; passing them through would lie.
_FRAMING = frozenset({"content-length", "host", "accept-encoding", "content-encoding"})
# Headers the proxy owns on the request it sends upstream.
_OWNED_REQUEST = HOP_BY_HOP | _FRAMING | {"x-request-id"}
_OWNED_RESPONSE = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "x-request-id",
    "server",
    "date",
}

CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")
_OWNED_AND_CREDENTIALS = _OWNED_REQUEST | frozenset(CREDENTIAL_HEADERS)


def _connection_named(headers: Headers) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def _filter(headers: Headers, drop: frozenset[str]) -> CIMultiDict[str]:
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower in named:
            continue
        out.add(name, value)
    return out


def upstream_request_headers(
    headers: Headers, request_id: str, injected_key: str | None = None
) -> CIMultiDict[str]:
    """What the caller sent, minus hop-by-hop, plus our request id.

    With a key the sidecar injects, the caller's credentials never go upstream.
    """
    out = _filter(headers, _OWNED_REQUEST if injected_key is None else _OWNED_AND_CREDENTIALS)
    out["X-Request-Id"] = request_id
    if injected_key is not None:
        out["Authorization"] = injected_key
    return out


def downstream_response_headers(headers: Headers) -> CIMultiDict[str]:
    return _filter(headers, _OWNED_RESPONSE)


def first_credential(headers: Headers) -> str | None:
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return None
