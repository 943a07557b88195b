"""JSON log lines: one per request, one per lifecycle event, one per anything else.

`configure` puts one JSON handler on the root logger, so aiohttp's and
asyncio's records come out as JSON lines too. Structured fields travel in
`extra={"fields": {...}}` and are merged into the line; callers check
`isEnabledFor` first, so nothing is built for a level that is off.

The level is the policy's `log.level`, unless `LLM_SIDECAR_LOG_LEVEL` is set:
the environment wins, so an operator can turn on debug without editing the
policy. No line carries a credential: request headers are never logged.

Writing is off the request path. On the event loop the handler only keeps
the record; a timer `FLUSH_INTERVAL` later formats every record kept since
and writes them in one system call, so a request's response goes out before
its access line is even formatted, and a busy proxy writes many lines per
call. Lines keep their order (one buffer, and a line logged off the loop
first writes what is buffered); `flush()` writes the rest, and runs at
shutdown (`logging.shutdown` at exit too). The buffer is bounded: past
`MAX_BUFFERED` records it is written at once. Lifecycle lines, warnings and
errors are written at once: they are rare, and read as they happen.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from proxy.policy import Log

ENV_LEVEL = "LLM_SIDECAR_LOG_LEVEL"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Userinfo after `//` (a scheme-relative or absolute target's authority, or
# a path that merely looks like one), plain or percent-encoded, up to its last `@`.
_USERINFO = re.compile(r"(//|%2[Ff]%2[Ff])[^/?#]*(?:@|%40)")
# An authority the logged text ends inside (a target cut short): its `@` may be past the cut.
_OPEN_AUTHORITY = re.compile(r"(//|%2[Ff]%2[Ff])[^/?#]*\Z")
# A path parameter (`;key=...`), plain or encoded, up to the end of its segment.
_PARAMS = re.compile(r"(?:;|%3[Bb])[^/]*")

access_log = logging.getLogger("llm_sidecar.access")
lifecycle_log = logging.getLogger("llm_sidecar.lifecycle")


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record: ts, level, logger, msg, fields."""

    def __init__(self) -> None:
        super().__init__()
        # The date and time to the second, built once per second: a busy proxy
        # writes thousands of lines a second and datetime showed in profiles.
        self._second = -1
        self._prefix = ""

    def timestamp(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond, as `datetime.isoformat` writes it."""
        frac, whole = math.modf(created)
        micros = round(frac * 1e6)  # datetime.fromtimestamp's rounding
        second = int(whole) + micros // 1_000_000
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micros % 1_000_000 // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for name, value in fields.items():
                line.setdefault(name, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


FLUSH_INTERVAL = 0.01  # seconds a line may wait for the batch it is written with
MAX_BUFFERED = 1024  # records; past it the batch is written at once


class _JsonHandler(logging.StreamHandler[TextIO]):
    """The handler `configure` owns (a second call replaces it); writes in batches.

    Guarded by the handler's own lock (`handle` holds it around `emit`), so a
    record logged from another thread is written in order with the rest.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[logging.LogRecord] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self._pending.append(record)
        # Warnings and errors go out at once: an operator (or a test) reading
        # the log right after a failure must find it there.
        if len(self._pending) >= MAX_BUFFERED or record.levelno >= logging.WARNING:
            self._write_pending()
            return
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: start-up, shutdown, other threads
            self._write_pending()
            return
        self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr] # created in Handler.__init__
            self._write_pending()
            super().flush()

    def _write_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        records, self._pending = self._pending, []
        lines = []
        for record in records:
            try:
                lines.append(self.format(record) + self.terminator)
            except Exception:
                self.handleError(record)
        try:
            self.stream.write("".join(lines))
        except Exception:
            self.handleError(records[-1])


def log_path(path: str, cut: bool = False) -> str:
    """`path` as a log line may show it: without userinfo (`//user:pass@host`)
    and without `;params`, in any encoding, for they may hold credentials.
    `cut`: the path may have been cut short, so an authority it ends in is
    dropped whole."""
    if "@" in path or ";" in path or "%" in path:
        path = _PARAMS.sub("", _USERINFO.sub(r"\1", path))
    if cut:
        path = _OPEN_AUTHORITY.sub(r"\1", path)
    return path


def level_of(log: Log, environ: Mapping[str, str]) -> tuple[int, str | None]:
    """The level to use, and a complaint when the environment names no level."""
    wanted = environ.get(ENV_LEVEL, "").strip().lower()
    if wanted in LEVELS:
        return LEVELS[wanted], None
    complaint = f"{ENV_LEVEL}={wanted!r} is not one of {', '.join(LEVELS)}" if wanted else None
    return LEVELS[log.level], complaint


def configure(log: Log, environ: Mapping[str, str], stream: TextIO | None = None) -> None:
    """Install (or replace) the JSON handler and set the level; safe to repeat on reload."""
    level, complaint = level_of(log, environ)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        handler.flush()  # what the old one holds goes out before anything new
        root.removeHandler(handler)
    handler = _JsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    # Records skip what no line shows (caller frame, thread, process names):
    # the logging HOWTO's own "Optimization" switches, a third of a record's cost.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(level)
    # aiohttp's own access log is off (ours replaces it); its other records stay.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if complaint is not None:
        lifecycle_log.warning("bad log level", extra={"fields": {"reason": complaint}})


def flush() -> None:
    """Write every buffered line now (shutdown calls it; so does `logging.shutdown`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _JsonHandler):
            handler.flush()


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """A lifecycle line: `msg` is the event's name, the rest are fields."""
    if lifecycle_log.isEnabledFor(level):
        lifecycle_log.log(level, name, extra={"fields": fields})
        # Rare and read as they happen (start, reload, drain): not batched.
        flush()
