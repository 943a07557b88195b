"""Parsing of the human units a policy file uses: durations and byte sizes.

Pure functions; no I/O. Errors are ValueError with a message fit for the
policy loader to show next to the file and the path inside it.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_SCALE = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


DURATION_FORMS = "a number with ms, s, m or h (250ms, 5s, 2m, 1h), or a bare number of seconds"
SIZE_FORMS = (
    "a number with KiB, MiB, GiB (powers of 1024) or KB, MB, GB (powers of 1000), "
    "or a bare number of bytes"
)


def parse_duration(value: object) -> float:
    """Seconds from `250ms`, `5s`, `2m`, `1h` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration: {DURATION_FORMS}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"invalid duration {value!r}; use {DURATION_FORMS}")
        seconds = float(match.group(1)) * _DURATION_SCALE[match.group(2)]
    else:
        raise ValueError(f"expected a duration: {DURATION_FORMS}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from `512`, `64KiB`, `10MiB`, `1GiB` (or the decimal KB/MB/GB)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size: {SIZE_FORMS}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"invalid size {value!r}; use {SIZE_FORMS}")
        size = int(float(match.group(1)) * _SIZE_SCALE[match.group(2)])
    else:
        raise ValueError(f"expected a size: {SIZE_FORMS}")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size
