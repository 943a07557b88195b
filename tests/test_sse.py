"""The sans-IO SSE decoder, against the WHATWG event-stream rules, fed every byte split."""

from __future__ import annotations

import time

import pytest

from proxy.sse import EventTooLarge, SSEDecoder, SSEEvent

# Every line ending the standard allows, a comment, an event without data,
# a field without a colon, and a BOM.
STREAM = (
    b'\xef\xbb\xbfdata: {"a": 1}\n\n'
    b": a comment\n\n"
    b'event: response.created\r\ndata: {"b": 2}\r\n\r\n'
    b"event: ping\n\n"
    b"data: line1\ndata: line2\n\n"
    b"id: 7\rdata: cr-only\r\r"
    b"data\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    (b'\xef\xbb\xbfdata: {"a": 1}\n\n', None, b'{"a": 1}'),
    # What dispatches nothing leads the next event, so replaying raws loses no byte.
    (
        b': a comment\n\nevent: response.created\r\ndata: {"b": 2}\r\n\r\n',
        "response.created",
        b'{"b": 2}',
    ),
    (b"event: ping\n\ndata: line1\ndata: line2\n\n", None, b"line1\nline2"),
    (b"id: 7\rdata: cr-only\r\r", None, b"cr-only"),
    (b"data\n\n", None, b""),
    (b"data: [DONE]\n\n", None, b"[DONE]"),
]


def _triples(events: list[SSEEvent]) -> list[tuple[bytes, str | None, bytes]]:
    return [(e.raw, e.event, e.data) for e in events]


def _decode(parts: list[bytes]) -> list[tuple[bytes, str | None, bytes]]:
    decoder = SSEDecoder()
    out: list[tuple[bytes, str | None, bytes]] = []
    for part in parts:
        out.extend(_triples(decoder.feed(part)))
    out.extend(_triples(decoder.finish()))
    assert decoder.pending == b"" and not decoder.truncated
    return out


def test_whole_input() -> None:
    assert _decode([STREAM]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_split_at_every_byte(cut: int) -> None:
    assert _decode([STREAM[:cut], STREAM[cut:]]) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert _decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"], ids=["lf", "cr", "crlf"])
def test_each_line_ending_dispatches_the_event_in_the_read_that_ends_it(ending: bytes) -> None:
    # The blank line arrives whole in one read: the event is out now, not at the next read.
    decoder = SSEDecoder()
    first = b"data: {}" + ending + ending
    assert [e.raw for e in decoder.feed(first)] == [first]
    assert decoder.feed(b"data: [DONE]" + ending + ending)[0].data == b"[DONE]"


def test_a_bare_cr_event_is_not_held_for_the_next_read() -> None:
    # The fault: `data: {...}\r\r` was held until more bytes came (or never, at the end).
    decoder = SSEDecoder()
    events = decoder.feed(b'data: {"first": "token"}\r\r')
    assert [e.data for e in events] == [b'{"first": "token"}']


def test_a_crlf_split_from_its_cr_leads_the_next_event_when_the_stream_was_not_crlf() -> None:
    decoder = SSEDecoder()
    first = decoder.feed(b"data: a\n\r")
    assert [(e.raw, e.data) for e in first] == [(b"data: a\n\r", b"a")]
    second = decoder.feed(b"\ndata: b\n\n")
    # The LF completes the CR's line ending: no extra blank line, no byte lost.
    assert [(e.raw, e.data) for e in second] == [(b"\ndata: b\n\n", b"b")]


def test_in_a_crlf_stream_a_cr_at_the_end_of_a_read_waits_for_its_lf() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r") == []
    assert decoder.truncated
    assert [e.raw for e in decoder.feed(b"\n")] == [b"data: a\r\n\r\n"]


def test_end_of_input_dispatches_a_held_cr_and_discards_an_unfinished_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r") == []
    assert [e.raw for e in decoder.finish()] == [b"data: a\r\n\r"]
    assert not decoder.truncated

    cut = SSEDecoder()
    assert cut.feed(b"data: [DONE]\n") == []
    assert cut.finish() == []  # no blank line: the standard discards it
    assert cut.truncated and cut.pending == b"data: [DONE]\n"


def test_unterminated_event_stays_pending() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b'data: {"a": 1}\n\ndata: {"par')
    assert [e.data for e in events] == [b'{"a": 1}']
    assert decoder.pending == b'data: {"par' and decoder.truncated


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"], ids=["lf", "cr", "crlf"])
def test_raw_bytes_add_up_to_the_input_at_every_split(ending: bytes) -> None:
    stream = b"".join(
        b": keepalive" + ending + ending + b"data: " + str(i).encode() + ending + ending
        for i in range(4)
    )
    for cut in range(1, len(stream)):
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) + decoder.finish()
        assert [e.data for e in events] == [b"0", b"1", b"2", b"3"]
        assert b"".join(e.raw for e in events) + decoder.pending == stream


def test_a_feed_costs_what_it_feeds_not_what_is_buffered() -> None:
    # One 4 MiB event (or a line that never ends) fed 1 KiB at a time: a decoder
    # that re-copies or re-scans its buffer per feed does ~8 GiB of work here.
    piece = b"x" * 1024
    for head, tail in ((b"data: ", b"\n\n"), (b"data: ", b"\r\r")):
        decoder = SSEDecoder()
        started = time.process_time()
        assert decoder.feed(head) == []
        for _ in range(4096):
            assert decoder.feed(piece) == []
        events = decoder.feed(tail)
        spent = time.process_time() - started
        assert len(events) == 1 and len(events[0].data) == 4 * 1024 * 1024
        assert spent < 1.0, f"{spent:.2f}s of CPU for 4 MiB"


def test_many_cr_lines_in_one_read_are_decoded_in_linear_time() -> None:
    # A CR-only stream has no LF to find: the search for one must not restart per line.
    stream = b"data: x\r\r" * 100_000
    decoder = SSEDecoder()
    started = time.process_time()
    events = decoder.feed(stream)
    spent = time.process_time() - started
    assert len(events) == 100_000
    assert spent < 2.0, f"{spent:.2f}s of CPU for {len(stream)} bytes"


def test_comments_leading_an_event_are_bounded_apart_from_it() -> None:
    # The comments before an event lead its raw bytes, but the cap counts the
    # event alone: a keepalive before a 20-byte event passes a 20-byte cap.
    event = b"data: [DONE]\n\n"
    decoder = SSEDecoder(max_event_bytes=len(event))
    assert [e.raw for e in decoder.feed(b": keep\n\n" + event)] == [b": keep\n\n" + event]
    # Comments alone never grow the buffer past the cap either.
    decoder = SSEDecoder(max_event_bytes=32)
    with pytest.raises(EventTooLarge) as raised:
        for _ in range(10):
            decoder.feed(b": keepalive\n\n")
    assert raised.value.events == []
