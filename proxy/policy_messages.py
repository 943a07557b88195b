"""How policy errors read: one `path: reason` per problem, every problem at once.

pydantic says what its types expected ("Field required", "Input should be a
valid tuple"); the user wrote YAML. This module turns each pydantic error
into the path the user wrote and a reason in the file's own terms:

* an unknown key is named, with the closest valid keys (difflib) or the list
  of valid ones; the "required" error for the key it was meant to be is the
  same mistake and is not reported twice;
* a list-typed field given a scalar shows the list form (`[POST]`), a
  section given a scalar lists the keys it takes;
* a prepare step with an unknown `step:` gets the closest step name;
* a count error on a list whose items already failed is dropped: the items'
  own errors say what is wrong.

Pure: no I/O, nothing about files (the loader adds the file name).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

Loc = tuple[str | int, ...]

# What a list-typed field holds, for "expected a list of ..., e.g. [...]".
_LIST_OF: dict[str, tuple[str, str]] = {
    "methods": ("HTTP methods", "POST"),
    "ignore_fields": ("body field names", "stream, user"),
    "remove": ("header names", "X-Debug"),
    "vary_headers": ("header names", "OpenAI-Organization"),
    "prepare": ("prepare steps", "{step: model_alias, aliases: {gpt-4: gpt-4o}}"),
    "routes": ("routes", '{match: {path: "/v1/*"}, upstream: openai}'),
}
# Keys that moved, by the model that had them: the unknown-key error says where to.
_MOVED: dict[tuple[str, str], str] = {
    ("Retry", name): f"ejection is per upstream: set upstreams.NAME.{name}"
    for name in ("eject_after", "eject_for", "max_eject_for")
}
_LIST_ERRORS = frozenset({"tuple_type", "list_type", "iterable_type", "set_type"})
_MAPPING_ERRORS = frozenset({"model_type", "model_attributes_type", "dict_type"})
_LENGTH_ERRORS = frozenset({"too_short", "too_long"})


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a policy: where (as the user wrote it) and why."""

    loc: Loc
    reason: str

    @property
    def path(self) -> str:
        return format_loc(self.loc)


class PathError(ValueError):
    """Cross-field problems found by a model validator, each with its place in the file."""

    def __init__(self, problems: Sequence[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(reason for _, reason in problems))
        self.problems = tuple(Problem(loc, reason) for loc, reason in problems)


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def problems_of(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """Every problem in `exc`, in pydantic's order, each once, in the file's terms."""
    errors = exc.errors()
    unknown: dict[Loc, Problem] = {}
    meant: set[Loc] = set()  # required keys that a misspelt key was meant to be
    for error in errors:
        if error["type"] == "extra_forbidden":
            loc: Loc = tuple(error["loc"])
            unknown[loc], close = _unknown_key(root, loc)
            meant.update(close)
    failed = [tuple(error["loc"]) for error in errors]
    out: list[Problem] = []
    for error in errors:
        loc = tuple(error["loc"])
        kind = error["type"]
        # A key missing because it was misspelt is the unknown key's problem; a
        # list too short because its items failed is theirs.
        repeated = (kind == "missing" and loc in meant) or (
            kind in _LENGTH_ERRORS and _items_failed(loc, failed)
        )
        if kind == "extra_forbidden":
            out.append(unknown[loc])
        elif not repeated:
            out.extend(_translate(root, error, loc))
    return out


def _items_failed(loc: Loc, failed: list[Loc]) -> bool:
    return any(len(other) > len(loc) and other[: len(loc)] == loc for other in failed)


def _translate(root: type[BaseModel], error: ErrorDetails, loc: Loc) -> list[Problem]:
    kind = error["type"]
    shown = _display_loc(root, loc)
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, PathError):
        return list(cause.problems)
    if kind == "missing":
        return [Problem(shown, "required, but missing")]
    if kind in _LIST_ERRORS:
        return [Problem(shown, _list_reason(loc, error["input"]))]
    if kind in _MAPPING_ERRORS:
        target = _type_at(root, loc)
        if isinstance(target, type) and issubclass(target, BaseModel):
            keys = ", ".join(target.model_fields)
            return [Problem(shown, f"expected a mapping with keys such as: {keys}")]
        if _is_union(target):
            tags = ", ".join(_step_tags(root, loc))
            return [Problem(shown, f"expected a mapping with `step:`, one of: {tags}")]
        return [Problem(shown, "expected a mapping (name: value, ...)")]
    if kind == "union_tag_invalid":
        tag = str(error.get("ctx", {}).get("tag", ""))
        return [Problem((*shown, "step"), _unknown_name("step", tag, _step_tags(root, loc)))]
    if kind == "union_tag_not_found":
        tags = ", ".join(_step_tags(root, loc))
        return [Problem(shown, f"a prepare step needs `step:`, one of: {tags}")]
    reason = error["msg"].removeprefix("Value error, ")
    return [Problem(shown, reason)]


def _unknown_key(root: type[BaseModel], loc: Loc) -> tuple[Problem, list[Loc]]:
    """The problem for an unknown key at `loc`, and the valid keys it may have meant."""
    key = str(loc[-1])
    parent = _type_at(root, loc[:-1])
    shown = _display_loc(root, loc)
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return Problem(shown, f"unknown key {key!r}"), []
    moved = _MOVED.get((parent.__name__, key))
    if moved is not None:
        return Problem(shown, f"unknown key {key!r}; {moved}"), []
    valid = list(parent.model_fields)
    close = _closest(key, valid)
    return Problem(shown, _unknown_name("key", key, valid, close)), [
        (*loc[:-1], name) for name in close
    ]


def _unknown_name(what: str, name: str, valid: Sequence[str], close: Sequence[str] = ()) -> str:
    close = close or _closest(name, valid)
    # difflib weighs whole strings: `clamp` is too short to match `clamp_max_tokens`.
    close = close or [v for v in valid if name and name.lower() in v][:2]
    if close:
        return f"unknown {what} {name!r}; did you mean {' or '.join(map(repr, close))}?"
    return f"unknown {what} {name!r}; valid: {', '.join(valid)}"


def _closest(name: str, valid: Sequence[str]) -> list[str]:
    """The valid names nearest `name`: the best match, and a second only when
    it is nearly as close (so `idle_timout` suggests `idle_timeout` alone)."""
    scored = sorted(
        ((difflib.SequenceMatcher(None, name, v).ratio(), v) for v in valid), reverse=True
    )
    best = scored[0][0] if scored else 0.0
    return [v for ratio, v in scored[:2] if ratio >= 0.6 and ratio >= best - 0.1]


def _list_reason(loc: Loc, value: object) -> str:
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    noun, example = _LIST_OF.get(field, ("values", "a, b"))
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        example = str(value)
    return f"expected a list of {noun}, e.g. [{example}]"


# -- the model's type at a path -------------------------------------------------


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if _is_union(tp):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _tag_member(tp: Any, tag: str) -> type[BaseModel] | None:
    """The member of a tagged union of models whose Literal field is `tag`."""
    for member in get_args(tp):
        if isinstance(member, type) and issubclass(member, BaseModel):
            for field in member.model_fields.values():
                if get_origin(field.annotation) is Literal and tag in get_args(field.annotation):
                    return member
    return None


def _walk(root: type[BaseModel], loc: Loc) -> Iterable[tuple[str | int, Any, bool]]:
    """Each part of `loc` with the type it leads to, and whether the user wrote it
    (False for the union tag pydantic inserts into a prepare step's path)."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        if _is_union(tp) and isinstance(part, str):
            member = _tag_member(tp, part)
            if member is not None:
                tp = member
                yield part, tp, False
                continue
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            field = tp.model_fields.get(part)
            tp = field.annotation if field is not None else None
        elif origin is dict and isinstance(part, str):
            tp = get_args(tp)[1]
        elif origin in (tuple, list) and isinstance(part, int):
            tp = get_args(tp)[0]
        else:
            tp = None
        yield part, tp, True


def _type_at(root: type[BaseModel], loc: Loc) -> Any:
    steps = list(_walk(root, loc))
    return _unwrap(steps[-1][1] if steps else root)


def _display_loc(root: type[BaseModel], loc: Loc) -> Loc:
    return tuple(part for part, _, written in _walk(root, loc) if written)


def _step_tags(root: type[BaseModel], loc: Loc) -> list[str]:
    union = _unwrap(_type_at(root, loc)) if loc else None
    tags: list[str] = []
    for member in get_args(union) if _is_union(union) else ():
        for field in getattr(member, "model_fields", {}).values():
            if get_origin(field.annotation) is Literal:
                tags.extend(str(t) for t in get_args(field.annotation))
    return tags
