"""JSON log lines are written off the request path, in batches, in order, and all of them.

The handler under test writes to a stream that counts its writes; the
proxy-level guarantee (every access line on stderr after a SIGTERM exit) is
pinned by tests/test_ops_canary.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import logs
from proxy.logs import JsonFormatter, access_log, lifecycle_log
from proxy.policy import Log


class Sink(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def lines(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.getvalue().splitlines()]


@pytest.fixture
def sink() -> Iterator[Sink]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    flags = (logging._srcfile, logging.logThreads, logging.logProcesses)
    out = Sink()
    logs.configure(Log(level="info"), {}, stream=out)
    try:
        yield out
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        logging._srcfile, logging.logThreads, logging.logProcesses = flags


async def until_written(sink: Sink, lines: int) -> None:
    async with asyncio.timeout(5):
        while len(sink.getvalue().splitlines()) < lines:
            await asyncio.sleep(0.001)


async def test_lines_logged_on_the_loop_are_written_later_in_one_call(sink: Sink) -> None:
    for n in range(3):
        access_log.info("request", extra={"fields": {"request_id": f"r{n}", "status": 200}})
    lifecycle_log.info("reload ok")
    # The task that logged (a request's) goes on without a write or a format.
    assert sink.writes == 0
    await until_written(sink, 4)
    assert sink.writes == 1
    lines = sink.lines()
    assert [line.get("request_id") for line in lines] == ["r0", "r1", "r2", None]
    assert lines[0]["logger"] == "llm_sidecar.access" and lines[0]["status"] == 200
    assert lines[3]["msg"] == "reload ok" and lines[3]["level"] == "info"
    assert set(lines[0]) == {"ts", "level", "logger", "msg", "request_id", "status"}


async def test_a_line_from_another_thread_keeps_the_order(sink: Sink) -> None:
    lifecycle_log.info("first")
    await asyncio.to_thread(lifecycle_log.info, "second")  # no loop there: written at once
    lifecycle_log.info("third")
    await until_written(sink, 3)
    assert [line["msg"] for line in sink.lines()] == ["first", "second", "third"]


async def test_flush_writes_what_is_buffered(sink: Sink) -> None:
    lifecycle_log.info("stop")
    assert sink.getvalue() == ""
    logs.flush()
    assert [line["msg"] for line in sink.lines()] == ["stop"]
    await asyncio.sleep(2 * logs.FLUSH_INTERVAL)  # the cancelled timer writes nothing twice
    assert len(sink.lines()) == 1


async def test_the_buffer_is_bounded(sink: Sink) -> None:
    for n in range(logs.MAX_BUFFERED):
        access_log.info("request", extra={"fields": {"n": n}})
    assert sink.writes == 1  # reaching the bound wrote the batch at once
    assert len(sink.lines()) == logs.MAX_BUFFERED


def test_off_the_loop_lines_are_written_at_once(sink: Sink) -> None:
    lifecycle_log.warning("start-up", extra={"fields": {"port": 8080}})
    assert sink.lines()[0]["port"] == 8080


async def test_reconfiguring_writes_the_old_handlers_lines_first(sink: Sink) -> None:
    lifecycle_log.info("before reload")
    logs.configure(Log(level="info"), {}, stream=sink)
    lifecycle_log.info("after reload")
    await until_written(sink, 2)
    assert [line["msg"] for line in sink.lines()] == ["before reload", "after reload"]


FORMATTER = JsonFormatter()  # one, so its per-second cache is crossed back and forth


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_timestamps_read_as_datetime_writes_them(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert FORMATTER.timestamp(created) == expected


@pytest.mark.parametrize(
    ("path", "cut", "logged"),
    [
        ("/v1/chat/completions", False, "/v1/chat/completions"),
        ("//u:s3cret@evil/v1/models", False, "//evil/v1/models"),
        ("/v1//u:s3cret@evil/x", False, "/v1//evil/x"),
        ("/v1/%2F%2Fu:s3cret%40evil/x", False, "/v1/%2F%2Fevil/x"),
        ("/v1/models;key=s3cret", False, "/v1/models"),
        ("/v1/a;key=s3cret/b;x=s3cret", False, "/v1/a/b"),
        ("/v1/a%3Bkey=s3cret", False, "/v1/a"),
        ("//u:s3cret", True, "//"),  # cut before its `@`
        ("/v1/models/gpt-4o", True, "/v1/models/gpt-4o"),
    ],
)
def test_logged_paths_carry_no_userinfo_or_params(path: str, cut: bool, logged: str) -> None:
    assert logs.log_path(path, cut) == logged
    assert "s3cret" not in logs.log_path(path, cut)
