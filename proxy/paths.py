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
  for upstreams that decode twice) and `..;` path parameters are refused;
* bytes that are not UTF-8 once decoded (overlong forms such as `%c0%ae`,
  stray or truncated sequences) are refused, and so are look-alikes of a
  separator or a dot segment: a segment with a character that NFKC folds
  to `/`, `\\`, `%`, `?` or `#` (fullwidth solidus U+FF0F) or that folds to
  `.` or `..` (U+FF0E, U+2025), or with a slash-shaped character that has
  no folding (U+2215 division slash, U+29F8 big solidus). A server or WAF
  that decodes leniently or folds Unicode would see a different path than
  this module did.

The result must be an API prefix (`/v1`, or Azure's `/openai`) or lie under
it. Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote_to_bytes

API_PREFIX = "/v1"
# Where the API lives: OpenAI's /v1, and Azure OpenAI's /openai (its
# deployment paths and its v1 API), which routes may match like /v1.
API_PREFIXES = (API_PREFIX, "/openai")

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
# Slash-shaped characters NFKC leaves alone; lenient servers and Unicode
# "best fit" mappings take some of them for a separator.
_SLASH_LIKE = frozenset("\u2044\u2215\u2216\u2571\u2572\u29f5\u29f8\u29f9")
# What a segment may not fold to under NFKC: a separator, an escape, a query or fragment.
_FOLDED_FORBIDDEN = re.compile(r"[/\\%?#\x00-\x1f\x7f]")
_DOT_TEXT = (".", "..")


class PathRejected(ValueError):
    """The path cannot be forwarded. The message says why without echoing it."""


def confine(raw: str, prefix: str | tuple[str, ...] = API_PREFIXES) -> str:
    """The canonical form of `raw` (a request-target's path, still encoded,
    without the query), or PathRejected when it is malformed or not under
    `prefix` (one of them). Idempotent: a canonical path is returned unchanged."""
    path = raw if _FAST.fullmatch(raw) and "/." not in raw else _normalise(raw)
    prefixes = (prefix,) if isinstance(prefix, str) else prefix
    if not any(under(path, one) for one in prefixes):
        raise PathRejected(f"the path must stay under {'/ or '.join(prefixes)}/")
    return path


def under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or lies under it, a whole segment at a time."""
    return path == prefix or path.startswith(prefix + "/")


def _normalise(raw: str) -> str:
    if not raw.startswith("/"):
        raise PathRejected("the path must start with /")
    if _BAD_ESCAPE.search(raw):
        raise PathRejected("malformed percent-encoding")
    try:
        data = unquote_to_bytes(raw)
        text = data.decode("utf-8")  # strict: overlong forms and surrogates fail too
    except UnicodeError:
        raise PathRejected("the decoded path is not valid UTF-8") from None
    if not text.isascii() and _look_alike(text):
        raise PathRejected("look-alikes of separators or dot segments are not allowed")
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


def _look_alike(text: str) -> bool:
    """Whether a segment of `text` (decoded, non-ASCII) could read as a
    separator or a dot segment to a server that folds Unicode."""
    if not _SLASH_LIKE.isdisjoint(text):
        return True
    for segment in text.split("/"):
        if segment.isascii():
            continue
        folded = unicodedata.normalize("NFKC", segment)
        if folded.partition(";")[0] in _DOT_TEXT:
            return True
        # Only what folding brings in counts: `é%25` stays allowed.
        if _FOLDED_FORBIDDEN.findall(folded) != _FOLDED_FORBIDDEN.findall(segment):
            return True
    return False
