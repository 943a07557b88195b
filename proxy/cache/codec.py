"""The cache record: how a `CachedAnswer` is laid out as bytes in a shared store.

A record is `MAGIC + VERSION`, a fixed header, a CRC-32 of everything else,
then the content type, the body and the events (a table of lengths followed
by the concatenated event bytes, so decoding is one `unpack_from` plus
slicing). Many sidecars, possibly of different versions,
share one Redis: a record with another magic or version, a truncated one or a
flipped bit decodes to None, never to a wrong answer and never to an
exception. The caller treats that as a miss, deletes the record and counts it.

The record says which mode it holds (the SSE flag): the upstream's events
(with the assembled object), or the plain body. Version 2 is the first in
which a plain body may answer a streaming reader (re-chunked), as a chat,
completion or Responses answer asked without `stream`; a version-1 reader
would serve it to a streaming caller as JSON, so it must not read these.
Version-1 records mean the same under version 2 and are still read.

Pure: no I/O, no redis import.
"""

from __future__ import annotations

import enum
import struct
import zlib
from itertools import accumulate

from proxy.cache.base import CachedAnswer

MAGIC = b"LSC\x00"
VERSION = 2
_PREFIX = MAGIC + bytes((VERSION,))
_READS = frozenset({MAGIC + b"\x01", _PREFIX})  # same layout; see the docstring

# status, flags, usage_event, stored_at, event count, content-type length,
# body length.
_HEADER = struct.Struct(">HBIdIHI")
_CRC = struct.Struct(">I")  # of prefix + header + payload
_FLAG_SSE = 1
_FLAG_USAGE = 2
_FLAG_BODY = 4
_KNOWN_FLAGS = _FLAG_SSE | _FLAG_USAGE | _FLAG_BODY
_CRC_AT = len(_PREFIX) + _HEADER.size
_PAYLOAD_AT = _CRC_AT + _CRC.size


class Corrupt(enum.Enum):
    """What a backend answers for a record that exists but does not decode."""

    RECORD = "corrupt"


CORRUPT = Corrupt.RECORD


def encode(answer: CachedAnswer) -> bytes:
    content_type = answer.content_type.encode()
    body = answer.body if answer.body is not None else b""
    events = answer.events
    lengths = struct.pack(f">{len(events)}I", *map(len, events))
    payload = b"".join((content_type, body, lengths, *events))
    flags = (
        (_FLAG_SSE if answer.is_sse else 0)
        | (_FLAG_USAGE if answer.usage_event is not None else 0)
        | (_FLAG_BODY if answer.body is not None else 0)
    )
    head = _PREFIX + _HEADER.pack(
        answer.status,
        flags,
        answer.usage_event if answer.usage_event is not None else 0,
        answer.stored_at,
        len(events),
        len(content_type),
        len(body),
    )
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, _CRC.pack(crc), payload))


def decode(record: bytes) -> CachedAnswer | None:
    """The answer in `record`, or None for anything this version did not write."""
    if len(record) < _PAYLOAD_AT or record[: len(_PREFIX)] not in _READS:
        return None
    view = memoryview(record)
    (crc,) = _CRC.unpack_from(record, _CRC_AT)
    if zlib.crc32(view[_PAYLOAD_AT:], zlib.crc32(view[:_CRC_AT])) != crc:
        return None
    status, flags, usage, stored_at, count, ct_len, body_len = _HEADER.unpack_from(
        record, len(_PREFIX)
    )
    # Check every length against what is there before slicing or unpacking:
    # a record must not make us build a huge format or table.
    if flags & ~_KNOWN_FLAGS or ct_len + body_len + 4 * count > len(record) - _PAYLOAD_AT:
        return None
    if body_len and not flags & _FLAG_BODY:
        return None
    at = _PAYLOAD_AT
    try:
        content_type = str(view[at : at + ct_len], "utf-8")
    except UnicodeDecodeError:
        return None
    at += ct_len
    body = record[at : at + body_len] if flags & _FLAG_BODY else None
    at += body_len
    lengths = struct.unpack_from(f">{count}I", record, at)
    at += 4 * count
    if at + sum(lengths) != len(record):
        return None
    ends = tuple(accumulate(lengths, initial=at))
    events = tuple(map(record.__getitem__, map(slice, ends, ends[1:])))
    if flags & _FLAG_USAGE and usage >= count:
        return None
    return CachedAnswer(
        status=status,
        content_type=content_type,
        is_sse=bool(flags & _FLAG_SSE),
        events=events,
        usage_event=usage if flags & _FLAG_USAGE else None,
        body=body,
        stored_at=stored_at,
    )
