"""The sans-IO SSE decoder, fed the same input split at every byte."""

from __future__ import annotations

import pytest

from proxy.sse import SSEDecoder

STREAM = (
    b'data: {"a": 1}\n\n'
    b": a comment\n\n"
    b'event: response.created\r\ndata: {"b": 2}\r\n\r\n'
    b"data: line1\ndata: line2\n\n"
    b"id: 7\rdata: cr-only\r\r"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    (b'data: {"a": 1}\n\n', None, b'{"a": 1}'),
    (b'event: response.created\r\ndata: {"b": 2}\r\n\r\n', "response.created", b'{"b": 2}'),
    (b"data: line1\ndata: line2\n\n", None, b"line1\nline2"),
    (b"id: 7\rdata: cr-only\r\r", None, b"cr-only"),
    (b"data: [DONE]\n\n", None, b"[DONE]"),
]


def _decode(parts: list[bytes]) -> list[tuple[bytes, str | None, bytes]]:
    decoder = SSEDecoder()
    out: list[tuple[bytes, str | None, bytes]] = []
    for part in parts:
        out.extend((e.raw, e.event, e.data) for e in decoder.feed(part))
    assert decoder.pending == b""
    return out


def test_whole_input() -> None:
    assert _decode([STREAM]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_split_at_every_byte(cut: int) -> None:
    assert _decode([STREAM[:cut], STREAM[cut:]]) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert _decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_unterminated_event_stays_pending() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b'data: {"a": 1}\n\ndata: {"par')
    assert [e.data for e in events] == [b'{"a": 1}']
    assert decoder.pending == b'data: {"par'
