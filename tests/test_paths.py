"""Path confinement as a pure function: every known escape, and properties.

The properties state what the proxy relies on: a path that is not refused
stays under /v1 (or Azure's /openai) whoever reads it (this module, yarl's normaliser that the
HTTP client would apply, or an upstream that decodes once more), and a
canonical path is its own canonical form.
"""

from __future__ import annotations

import posixpath
import unicodedata
from urllib.parse import unquote, unquote_to_bytes

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from yarl import URL

from proxy.paths import API_PREFIXES, PathRejected, confine, under

ESCAPES = [
    "/v1/../_admin/x",
    "/v1/%2e%2e/_admin",
    "/v1/%2E%2E/_admin",
    "/v1/.%2e/_admin",
    "/v1/%2e./_admin",
    "/v1/%2e%2e%2f_admin",
    "/v1/..%2F_admin",
    "/v1/..%2f..%2f_admin",
    "/v1/models/../../_admin",
    "/v1/a/b/../../../_admin",
    "/v1/..",
    "/v1/%2e%2e",
    "/v1/..;/_admin",
    "/v1/..;x/_admin",
    "/v1/.;/x",
    "/v1/%252e%252e/_admin",
    "/v1/%252E%252E%252F_admin",
    "/v1/%25252e/_admin",
    "/v1/a%255c..%255c_admin",
    "/v1/..\\_admin",
    "/v1/a\\..\\..\\_admin",
    "/v1/%5c..%5c_admin",
    "/v1/models%00.json",
    "/v1/models\x00",
    "/v1/a%0d%0aHost:%20evil",
    "/v1/a%09b",
    "/v1/a%7fb",
    "/v1/a%zz",
    "/v1/a%4",
    "/_admin",
    "/",
    "",
    "v1/models",
    "/v1x/models",
    "/%2e%2e/v1/models",
    "/..",
    "/v2/models",
    "/V1/models",
    "/openaix/deployments",
    "/openai/../_admin",
    "/openai/deployments/%2e%2e/%2e%2e/_admin",
    # Not UTF-8 once decoded: overlong dots and slashes, stray and cut sequences.
    "/v1/rec/%c0%ae%c0%ae/%c0%ae%c0%ae/_admin",
    "/v1/%c0%af_admin",
    "/v1/%e0%80%ae%e0%80%ae/_admin",
    "/v1/files/%ff",
    "/v1/files/%c3",
    "/v1/files/%ed%a0%80",
    # Look-alikes of separators and dot segments.
    "/v1/..%ef%bc%8f_admin",
    "/v1/a%ef%bc%8fb",
    "/v1/..%e2%88%95_admin",
    "/v1/..%e2%a7%b8_admin",
    "/v1/%ef%bc%8e%ef%bc%8e/_admin",
    "/v1/%ef%bc%8e./_admin",
    "/v1/%e2%80%a5/_admin",
    "/v1/..%ef%bc%bc_admin",
    "/v1/%ef%bc%85%32e%ef%bc%85%32e/_admin",
    "/v1/\uff0e\uff0e/_admin",
]


@pytest.mark.parametrize("raw", ESCAPES)
def test_escapes_are_refused(raw: str) -> None:
    with pytest.raises(PathRejected) as caught:
        confine(raw)
    assert len(raw) < 4 or raw not in str(caught.value)  # the reason never echoes the path


CANONICAL = [
    ("/v1/models", "/v1/models"),
    ("/v1", "/v1"),
    ("/v1/", "/v1/"),
    ("/v1//models", "/v1/models"),
    ("/v1///chat//completions", "/v1/chat/completions"),
    ("/v1/./models", "/v1/models"),
    ("/v1/chat/../models", "/v1/models"),
    ("/v1/chat/%2e%2e/models", "/v1/models"),
    ("/v1/ch%61t/completions", "/v1/chat/completions"),
    ("/%76%31/models", "/v1/models"),
    ("/v1/models/meta-llama%2FLlama-3.1-8B", "/v1/models/meta-llama/Llama-3.1-8B"),
    ("/v1/models/a%2fb", "/v1/models/a/b"),
    ("/v1/files/a%20b", "/v1/files/a%20b"),
    ("/v1/files/a%3fb", "/v1/files/a%3Fb"),
    ("/v1/files/a%23b", "/v1/files/a%23b"),
    ("/v1/files/100%25", "/v1/files/100%25"),
    ("/v1/files/%C3%A9", "/v1/files/%C3%A9"),
    ("/v1/files/%e2%80%a2", "/v1/files/%E2%80%A2"),
    ("/v1/files/%C3%A9%25", "/v1/files/%C3%A9%25"),
    ("/v1/files/a%ef%bc%8eb", "/v1/files/a%EF%BC%8Eb"),
    ("/v1/models/llama3:8b", "/v1/models/llama3:8b"),
    ("/v1/models/gpt-3.5-turbo", "/v1/models/gpt-3.5-turbo"),
    ("/v1/files/.hidden", "/v1/files/.hidden"),
    ("/v1/files/...", "/v1/files/..."),
    ("/v1/models/ft:gpt-4o:org::abc", "/v1/models/ft:gpt-4o:org::abc"),
    ('/v1/a"b', "/v1/a%22b"),
    ("/v1/models/", "/v1/models/"),
    ("/v1/models/.", "/v1/models/"),
    # Azure's own paths: the same rules under /openai.
    ("/openai/deployments/gpt-4o/chat/completions", "/openai/deployments/gpt-4o/chat/completions"),
    ("/openai//deployments/d/../e/embeddings", "/openai/deployments/e/embeddings"),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL)
def test_canonical_form(raw: str, expected: str) -> None:
    assert confine(raw) == expected
    assert confine(expected) == expected


def test_prefix_is_a_whole_segment() -> None:
    assert confine("/api/v1/x", prefix="/api") == "/api/v1/x"
    with pytest.raises(PathRejected):
        confine("/apiary/x", prefix="/api")


# Paths built from the pieces attacks are made of, so hypothesis spends its
# examples near the edge rather than on random letters.
PIECES = st.sampled_from(
    [
        "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%25", "%00", ";",
        "v1", "models", "a", "%61", "%76%31", "_admin", "%", "?", "#", "%3F", "\x00", "é", "%ff",
        "%c0%ae", "%c0%af", "%c3", "%ef%bc%8f", "%e2%88%95", "%e2%a7%b8", "%ef%bc%8e", "\uff0e",
    ]
)  # fmt: skip
PATHS = st.lists(PIECES, max_size=12).map(lambda parts: "/v1/" + "".join(parts))
ANY_TEXT = st.text(max_size=40).map(lambda tail: "/v1/" + tail)
AZURE_TEXT = st.text(max_size=40).map(lambda tail: "/openai/" + tail)


def _resolved(path: str) -> str:
    """How a server that decodes once and then resolves dots would see it."""
    return posixpath.normpath(unquote(path, errors="replace").replace("\\", "/"))


@given(st.one_of(PATHS, ANY_TEXT, AZURE_TEXT, st.text(max_size=30)))
@example("/v1/%2e%2e%2f%2e%2e/x")
@example("/v1/%252e%252e/x")
def test_nothing_accepted_leaves_the_prefix(raw: str) -> None:
    try:
        path = confine(raw)
    except PathRejected:
        return
    prefix = next(p for p in API_PREFIXES if under(path, p))
    # Idempotent: the canonical form is a fixed point.
    assert confine(path) == path
    # No dot segment, no empty segment, nothing a later normaliser would change.
    segments = path.split("/")[1:]
    assert all(s not in (".", "..") for s in segments[:-1] if s) and "" not in segments[:-1]
    assert URL(f"http://upstream{path}").raw_path == path
    # An upstream that decodes once (or twice) and resolves dots stays under /v1.
    for seen in (_resolved(path), _resolved(unquote(path))):
        assert under(seen, prefix), (raw, path, seen)
    assert "\x00" not in unquote(path) and "\\" not in unquote(path)
    # Valid UTF-8, and a server that folds Unicode (NFKC) sees the same separators.
    text = unquote_to_bytes(path).decode("utf-8")
    assert not any(c in text for c in "\u2044\u2215\u29f8")
    assert under(_resolved(unicodedata.normalize("NFKC", text)), prefix), (raw, path)
