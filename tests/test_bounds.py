"""Bounds: no caller and no upstream holds a slot, a buffer or a task without limit.

Callers that stop reading hold no stage slot and are dropped alone after the
write timeout; an upstream response past `max_response_bytes`,
`max_event_bytes` or `max_duration` ends with an error for its readers, its
connection closed, its slot released and nothing cached.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from proxy.sse import EventTooLarge, SSEDecoder

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "bounds"}]}

# A backlog far past what loopback socket buffers absorb (about 3 MiB with a
# 4 KiB receive buffer), so a caller that reads nothing really fills up.
BIG_TOKENS, PADDING = 100, 64 * 1024


# --- the SSE decoder: cost per read and event size ----------------------------


def test_a_line_that_never_ends_costs_what_each_read_brings() -> None:
    # Before: every read re-joined and re-scanned the whole buffer, about
    # 7 s for 32 MiB in 64 KiB reads; now about 0.07 s. The bound is far
    # from both, so a loaded machine does not make it flaky.
    decoder = SSEDecoder()
    piece = b"x" * 65536
    decoder.feed(b"data: ")
    started = time.process_time()
    for _ in range(512):
        assert decoder.feed(piece) == []
    assert time.process_time() - started < 2.0
    assert len(decoder.pending) == 6 + 512 * 65536
    events = decoder.feed(b"\n\n")
    assert len(events) == 1 and len(events[0].data) == 512 * 65536


def test_an_unfinished_event_past_max_event_bytes_raises_and_never_grows_past_it() -> None:
    cap = 4096
    decoder = SSEDecoder(max_event_bytes=cap)
    first = decoder.feed(b'data: {"a": 1}\n\ndata: ')
    assert [e.data for e in first] == [b'{"a": 1}']
    with pytest.raises(EventTooLarge) as raised:
        for _ in range(100):
            decoder.feed(b"x" * 1000)
            assert len(decoder.pending) <= cap
    assert raised.value.events == []


def test_a_whole_event_past_max_event_bytes_raises_with_the_events_before_it() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    small, big = b"data: ok\n\n", b"data: " + b"y" * 100 + b"\n\n"
    with pytest.raises(EventTooLarge) as raised:
        decoder.feed(small + big)
    assert [e.raw for e in raised.value.events] == [small]


EVENTS = (b'data: {"a": 1}\r\n\r\n', b"event: x\ndata: two\n\n", b": note\n\n", b"data: [DONE]\n\n")
STREAM = b"".join(EVENTS)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_events_at_the_cap_pass_split_anywhere(cut: int) -> None:
    decoder = SSEDecoder(max_event_bytes=max(len(e) for e in EVENTS))
    events = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:])
    assert [e.data for e in events] == [b'{"a": 1}', b"two", b"[DONE]"]
    assert decoder.pending == b""
