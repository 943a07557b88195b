"""The body scanner that splices `include_usage` into a caller's own bytes."""

from __future__ import annotations

import json

import pytest

from proxy.jsonbody import with_usage


@pytest.mark.parametrize(
    "raw",
    [
        b'{"x":"a\\\\","stream_options":{"k":"\\"}{\\\\"}}',
        b'{"stream_options":{},"stream":true}',
        b'{"m":[{"stream_options":1}],"stream_options":{"include_usage":null}}',
        b'{"stream_options" :null}',
    ],
)
def test_the_splice_sets_usage_and_keeps_every_other_byte(raw: bytes) -> None:
    out = with_usage(raw)
    assert out is not None
    spliced, original = json.loads(out), json.loads(raw)
    assert spliced["stream_options"]["include_usage"] is True
    spliced["stream_options"].pop("include_usage")
    if original["stream_options"] is not None:
        original["stream_options"].pop("include_usage", None)
    assert {**spliced, "stream_options": original["stream_options"] or {}} == {
        **original,
        "stream_options": original["stream_options"] or {},
    }
    assert len(out) - len(raw) <= len(b'{"include_usage":true},')


@pytest.mark.parametrize(
    "raw",
    [
        b'{"stre\\u0061m_options":{}}',  # an escaped name: a real parser decides
        b'{"stream_options":{},"stream_options":{"a":1}}',  # named twice
        b'{"stream_options":"yes"}',  # not an object: nothing to splice into
    ],
)
def test_what_the_scanner_cannot_decide_is_left_to_re_serialising(raw: bytes) -> None:
    assert with_usage(raw) is None
