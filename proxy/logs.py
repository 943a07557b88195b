"""JSON log lines: one per request, one per lifecycle event, one per anything else.

`configure` puts one JSON handler on the root logger, so aiohttp's and
asyncio's records come out as JSON lines too. Structured fields travel in
`extra={"fields": {...}}` and are merged into the line; callers check
`isEnabledFor` first, so nothing is built for a level that is off.

The level is the policy's `log.level`, unless `LLM_SIDECAR_LOG_LEVEL` is set:
the environment wins, so an operator can turn on debug without editing the
policy. No line carries a credential: request headers are never logged.
"""

from __future__ import annotations

import logging
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

access_log = logging.getLogger("llm_sidecar.access")
lifecycle_log = logging.getLogger("llm_sidecar.lifecycle")


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record: ts, level, logger, msg, fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
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


class _JsonHandler(logging.StreamHandler[TextIO]):
    """Marks the handler `configure` owns, so a second call replaces it."""


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
        root.removeHandler(handler)
    handler = _JsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's own access log is off (ours replaces it); its other records stay.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if complaint is not None:
        lifecycle_log.warning("bad log level", extra={"fields": {"reason": complaint}})


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """A lifecycle line: `msg` is the event's name, the rest are fields."""
    if lifecycle_log.isEnabledFor(level):
        lifecycle_log.log(level, name, extra={"fields": fields})
