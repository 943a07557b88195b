"""Path confinement: the one canonical form of a caller's path, or a refusal.

A caller's path is normalised once, at intake; routing, the request key and
the upstream URL all read the result, and the upstream URL is sent exactly
as computed (no second normaliser downstream can disagree with this one).

The canonical form (RFC 3986 §6.2.2, plus what proxies such as Envoy's
`normalize_path` and `merge_slashes` do):

* every percent-escape is decoded, then each byte is re-encoded only if it
  is not a `pchar`, in upper-case hex: `%61` is `a`, `%2F` is a real `/`
  (so routing sees what an upstream that decodes before routing sees) and
  `%2e%2e` is a real `..`;
* dot segments are resolved (§5.2.4) and empty segments (`//`) dropped; a
  `..` above the root is refused, not clamped;
* NUL and other control bytes, backslashes (a separator to some servers),
  malformed escapes, double-encoded dots, slashes or controls (`%252e`,
  for upstreams that decode twice) and `..;` path parameters are refused.

The result must be the prefix (`/v1`) or lie under it. Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

API_PREFIX = "/v1"

# pchar (RFC 3986 §3.3) minus pct-encoded: the bytes that need no escape.
_PLAIN = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
)
_ENCODE = tuple(chr(b) if b in _PLAIN else f"%{b:02X}" for b in range(256))
# Already canonical: plain segments, no escapes, no empty segment. Dot
# segments are ruled out separately ("/." never occurs in the fast path).
_FAST = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@]+)+/?")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN = re.compile(rb"[\x00-\x1f\x7f\\]")
# After one decode: an escape that a second decode would turn into a
# separator, a dot, a control byte or another escape.
_DOUBLE_ENCODED = re.compile(rb"%(?:2[EeFf]|5[Cc]|[01][0-9A-Fa-f]|7[Ff]|25)")
_DOTS = (b".", b"..")


class PathRejected(ValueError):
    """The path cannot be forwarded. The message says why without echoing it."""


def confine(raw: str, prefix: str = API_PREFIX) -> str:
    """The canonical form of `raw` (a request-target's path, still encoded,
    without the query), or PathRejected when it is malformed or not under
    `prefix`. Idempotent: a canonical path is returned unchanged."""
    path = raw if _FAST.fullmatch(raw) and "/." not in raw else _normalise(raw)
    if path != prefix and not path.startswith(prefix + "/"):
        raise PathRejected(f"the path must stay under {prefix}/")
    return path


def _normalise(raw: str) -> str:
    if not raw.startswith("/"):
        raise PathRejected("the path must start with /")
    if _BAD_ESCAPE.search(raw):
        raise PathRejected("malformed percent-encoding")
    data = unquote_to_bytes(raw)
    if _FORBIDDEN.search(data):
        raise PathRejected("control bytes and backslashes are not allowed")
    kept: list[bytes] = []
    directory = False  # whether the path ends with a slash
    for segment in data.split(b"/")[1:]:
        directory = True
        if segment == b"" or segment == b".":
            continue
        if segment == b"..":
            if not kept:
                raise PathRejected("the path climbs above the root")
            kept.pop()
            continue
        if segment.partition(b";")[0] in _DOTS:
            raise PathRejected("dot segments with parameters are not allowed")
        if _DOUBLE_ENCODED.search(segment):
            raise PathRejected("double percent-encoding is not allowed")
        kept.append(segment)
        directory = False
    path = "/" + "/".join("".join(_ENCODE[b] for b in segment) for segment in kept)
    return path + "/" if directory and kept else path
