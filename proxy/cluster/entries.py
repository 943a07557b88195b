"""The entries of a flight's Redis Stream: a sans-IO codec.

A flight's log records what the owner's stream told its readers, in order,
so that a stream on another replica can be told exactly the same. Each
entry is one field, named by its kind:

* `h` head: status, headers, whether the answer is SSE, and the body when
  the head carries one (a plain answer, or a cached answer replayed);
* `e` events: the events of one upstream read, as the upstream framed them;
* `d` done: whether the answer is complete, and the error that ended it
  without an error event of ours (an upstream's in-band error);
* `f` failed: the proxy's own error. Before the head every reader answers
  with it; after it, every reader's stream ends with it as an error event;
* `x` failed before the head with the upstream's own error answer.

A plain answer is `h` (with its body) then `d`; a streamed one is `h`, `e`
per read, then `d` or `f`. The codec neither parses events nor knows Redis.
A head is recorded without `Set-Cookie`: a cookie the upstream set for the
owner's connection is neither kept in Redis nor handed to other replicas'
callers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDict

from proxy.errors import ProxyError
from proxy.stream import Head

HEAD = b"h"
EVENTS = b"e"
DONE = b"d"
FAILED = b"f"
FAILED_HEAD = b"x"


class EntryError(Exception):
    """An entry this version cannot read: the log is treated as broken."""


class RemoteError(ProxyError):
    """A proxy error raised on the owner replica, told again on this one.

    Its body and SSE event are byte for byte the owner's: same status,
    type, code, param, message and Retry-After.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type_: str,
        code: str | None,
        param: str | None,
        retry_after: float | None,
    ) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.type = type_
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class HeadEntry:
    head: Head


@dataclass(frozen=True, slots=True)
class EventsEntry:
    raw: bytes  # whole events, concatenated


@dataclass(frozen=True, slots=True)
class DoneEntry:
    complete: bool
    error: ProxyError | None


@dataclass(frozen=True, slots=True)
class FailedEntry:
    error: ProxyError | Head


Entry = HeadEntry | EventsEntry | DoneEntry | FailedEntry


# -- encoding: (kind, payload) pairs, one per XADD ----------------------------------------------


def head(value: Head) -> tuple[bytes, bytes]:
    return HEAD, _head_bytes(value)


def events(raw: Sequence[bytes]) -> tuple[bytes, bytes]:
    return EVENTS, b"".join(raw)


def done(complete: bool, error: ProxyError | None) -> tuple[bytes, bytes]:
    payload = {"complete": complete, "error": None if error is None else _error_dict(error)}
    return DONE, orjson.dumps(payload)


def failed(error: ProxyError | Head) -> tuple[bytes, bytes]:
    if isinstance(error, Head):
        return FAILED_HEAD, _head_bytes(error)
    return FAILED, orjson.dumps(_error_dict(error))


def _head_bytes(value: Head) -> bytes:
    meta = {
        "status": value.status,
        "headers": [(k, v) for k, v in value.headers.items() if k.lower() != "set-cookie"],
        "sse": value.is_sse,
        "body": value.body is not None,
    }
    # orjson never writes a raw newline, so the first one ends the JSON.
    return orjson.dumps(meta) + b"\n" + (value.body or b"")


def _error_dict(error: ProxyError) -> dict[str, Any]:
    return {
        "status": error.status,
        "type": error.type,
        "code": error.code,
        "param": error.param,
        "message": error.message,
        "retry_after": error.retry_after,
    }


# -- decoding -----------------------------------------------------------------------------------


def decode(fields: Mapping[bytes, bytes]) -> Entry:
    """One entry's fields (as XREAD returns them) as an `Entry`; EntryError if unreadable."""
    if len(fields) != 1:
        raise EntryError(f"an entry has {len(fields)} fields, not one")
    ((kind, payload),) = fields.items()
    try:
        if kind == EVENTS:
            return EventsEntry(payload)
        if kind == HEAD:
            return HeadEntry(_head_of(payload))
        if kind == DONE:
            meta = orjson.loads(payload)
            error = meta["error"]
            return DoneEntry(bool(meta["complete"]), None if error is None else _error_of(error))
        if kind == FAILED:
            return FailedEntry(_error_of(orjson.loads(payload)))
        if kind == FAILED_HEAD:
            return FailedEntry(_head_of(payload))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EntryError(f"a {kind!r} entry does not decode ({type(exc).__name__})") from exc
    raise EntryError(f"unknown entry kind {kind!r}")


def _head_of(payload: bytes) -> Head:
    meta_bytes, sep, body = payload.partition(b"\n")
    if not sep:
        raise ValueError("no end to the head's JSON")
    meta = orjson.loads(meta_bytes)
    headers: CIMultiDict[str] = CIMultiDict((str(k), str(v)) for k, v in meta["headers"])
    return Head(
        int(meta["status"]),
        headers,
        is_sse=bool(meta["sse"]),
        body=body if meta["body"] else None,
    )


def _error_of(meta: dict[str, Any]) -> RemoteError:
    retry = meta["retry_after"]
    return RemoteError(
        str(meta["message"]),
        status=int(meta["status"]),
        type_=str(meta["type"]),
        code=None if meta["code"] is None else str(meta["code"]),
        param=None if meta["param"] is None else str(meta["param"]),
        retry_after=None if retry is None else float(retry),
    )
