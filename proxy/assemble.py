"""Folding a recorded SSE stream into the non-stream JSON object.

A `stream: false` caller who shares a streamed call gets the chunks folded
back into the object the upstream would have returned. Every dialect
(OpenAI, Azure, vLLM, llama.cpp, Ollama, LiteLLM) folds by the same rules:

* a string field streamed in pieces is concatenated (content, refusal,
  reasoning text, legacy `function_call.arguments`, audio `transcript` and
  `data`, and any field not known today), except identifiers (`id`, `name`,
  `type`, `role`...), which are set once: llama.cpp repeats a tool call's
  name in every delta;
* any other field keeps its latest value that is not null or empty: Azure's
  content-filter chunks carry `id: ""`, `model: ""` and `created: 0`, and
  its last chunk an empty `content_filter_results`;
* a tool call is found by its `index`, but a new non-empty `id` at an
  occupied index opens a new call: Ollama sends parallel calls all at
  index 0, each whole, with its own id.

`is_usage_chunk` says which chunk is the usage chunk whatever its `choices`
look like (LiteLLM sends `[{"index": 0, "delta": {}}]`, not `[]`).
`assemble_response` rebuilds a Responses object from its
`response.output_item.done` events when the terminal event's snapshot has no
output. Pure functions over parsed payloads; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

JSON = dict[str, Any]

# Identifiers repeat (whole) in every piece that carries them; they are never pieces.
_SET_ONCE = frozenset({"id", "name", "type", "role", "call_id", "object", "model"})
_LAST = frozenset({"choices", "object", "usage"})  # _finish puts these last
_CHOICE_OWN = frozenset({"index", "delta", "logprobs", "finish_reason", "text"})
# Fields a stream's chunks carry and the whole answer does not: OpenAI pads
# every chunk with random `obfuscation` text (against length side channels).
_STREAM_ONLY = frozenset({"obfuscation"})


class _Pieces(list[str]):
    """A string still arriving in pieces; joined once, when the fold is done."""


_MISSING = object()


def _empty(value: Any) -> bool:
    if value is None:
        return True
    kind = type(value)
    return (kind is str or kind is dict or kind is list) and not value


def _keep_latest(target: JSON, name: str, value: Any) -> None:
    """Latest non-empty value wins; an empty one only fills a gap."""
    if not _empty(value) or name not in target:
        target[name] = value


def _top_fields(chunk: JSON, top: JSON) -> None:
    """Fields of the whole answer (id, model, created, usage, timings...)."""
    for name, value in chunk.items():
        if name in _STREAM_ONLY:
            continue
        old = top.get(name, _MISSING)
        if old is _MISSING:
            top[name] = value
        elif value == old or value is None or name == "choices":
            continue  # most fields repeat in every chunk
        elif not _empty(value) and not (value == 0 and type(value) is int):
            top[name] = value  # but not Azure's blank `id: ""`, `created: 0`


def _merge(target: JSON, piece: JSON) -> None:
    """Fold one streamed piece (a delta, or a part of one) into `target`."""
    for name, value in piece.items():
        kind = type(value)
        if kind is str:
            current = target.get(name)
            if name in _SET_ONCE:
                if not current:
                    target[name] = value
            elif type(current) is _Pieces:
                current.append(value)
            else:
                target[name] = _Pieces((current, value) if type(current) is str else (value,))
        elif kind is dict:
            inner = target.get(name)
            if type(inner) is not dict:
                inner = target[name] = {}
            _merge(inner, value)
        else:
            _keep_latest(target, name, value)


def _settle(value: Any) -> Any:
    """Join the pieces of every string still arriving, in place."""
    if type(value) is dict:
        for name, inner in value.items():
            if type(inner) is _Pieces:
                value[name] = "".join(inner)
            elif type(inner) is dict or type(inner) is list:
                _settle(inner)
    elif type(value) is list:
        for inner in value:
            _settle(inner)
    return value


def _merge_logprobs(choice: JSON, logprobs: Any) -> None:
    if not isinstance(logprobs, dict):
        _keep_latest(choice, "logprobs", logprobs)
        return
    merged = choice.get("logprobs")
    if not isinstance(merged, dict):
        merged = choice["logprobs"] = {}
    for name, value in logprobs.items():
        if isinstance(value, list):
            entries = merged.get(name)
            if isinstance(entries, list):
                entries.extend(value)  # one entry per token
            else:
                merged[name] = list(value)  # a copy: the chunk's own list stays as it was
        else:
            _keep_latest(merged, name, value)


def _choice_fields(choice: JSON, part: JSON) -> None:
    """Choice-level fields besides the delta: finish reason, filter results, stop_reason..."""
    for name, value in part.items():
        if name not in _CHOICE_OWN:
            _keep_latest(choice, name, value)
    logprobs = part.get("logprobs", _MISSING)
    if logprobs is None:
        choice.setdefault("logprobs", None)
    elif logprobs is not _MISSING:
        _merge_logprobs(choice, logprobs)
    finish = part.get("finish_reason")
    if finish is not None:
        choice["finish_reason"] = finish


def _finish(top: JSON, kind: str, choices: list[JSON]) -> JSON:
    out = {name: value for name, value in top.items() if name not in _LAST}
    out["object"] = kind
    out["choices"] = choices
    out["usage"] = top.get("usage")
    return out


class _ToolCalls:
    """One choice's tool calls, in the order they appeared."""

    __slots__ = ("at", "calls")

    def __init__(self) -> None:
        self.calls: list[tuple[int, JSON]] = []  # (streamed index, call)
        self.at: dict[int, JSON] = {}  # streamed index -> the call it now means

    def merge(self, delta: JSON) -> None:
        index = delta.get("index")
        if not isinstance(index, int):
            index = -1  # no index at all: the call in progress, unless the id says otherwise
        call = self.at.get(index)
        new_id = delta.get("id")
        if call is None or (new_id and call["id"] and new_id != call["id"]):
            call = {"id": None, "type": None, "function": {"name": "", "arguments": ""}}
            self.calls.append((index, call))
            self.at[index] = call
        _merge(call, {name: value for name, value in delta.items() if name != "index"})

    def result(self) -> list[JSON]:
        # Stable: calls that shared one index keep the order they came in.
        calls = [call for _, call in sorted(self.calls, key=lambda pair: pair[0])]
        for call in calls:
            call["type"] = call["type"] or "function"
        return calls


def assemble_chat(chunks: Iterable[JSON]) -> JSON:
    top: JSON = {}
    choices: dict[int, JSON] = {}
    tools: dict[int, _ToolCalls] = {}
    for chunk in chunks:
        _top_fields(chunk, top)
        for part in chunk.get("choices") or ():
            index = part.get("index", 0)
            choice = choices.get(index)
            if choice is None:
                # `logprobs` appears as the stream says it (llama.cpp and Ollama never do).
                message = {"role": None, "content": None}
                choice = choices[index] = {"index": index, "message": message}
                choice["finish_reason"] = None
            delta = part.get("delta") or {}
            calls = delta.get("tool_calls")
            if calls:
                merged = tools.setdefault(index, _ToolCalls())
                for call in calls:
                    merged.merge(call)
            # Calls merge by index and id; `tool_calls: []` or null is just a value.
            if calls:
                delta = {k: v for k, v in delta.items() if k != "tool_calls"}
            _merge(choice["message"], delta)
            _choice_fields(choice, part)
    for index, choice in choices.items():
        message = _settle(choice["message"])
        message["role"] = message["role"] or "assistant"
        if index in tools:
            message["tool_calls"] = _settle(tools[index].result())
    return _finish(top, "chat.completion", [choices[i] for i in sorted(choices)])


def assemble_completion(chunks: Iterable[JSON]) -> JSON:
    top: JSON = {}
    choices: dict[int, JSON] = {}
    for chunk in chunks:
        _top_fields(chunk, top)
        for part in chunk.get("choices") or ():
            index = part.get("index", 0)
            choice = choices.get(index)
            if choice is None:
                choice = choices[index] = {"text": _Pieces(), "index": index}
                choice["finish_reason"] = None
            text = part.get("text")
            if text:
                choice["text"].append(text)
            _choice_fields(choice, part)
    return _finish(top, "text_completion", [_settle(choices[i]) for i in sorted(choices)])


def is_usage_chunk(chunk: JSON) -> bool:
    """The chunk that only reports usage, whatever its `choices` look like.

    It carries `usage` and no content, tool call, logprobs or finish reason:
    OpenAI sends `choices: []`, LiteLLM `[{"index": 0, "delta": {}}]`.
    """
    if not isinstance(chunk.get("usage"), dict):
        return False
    for part in chunk.get("choices") or ():
        if not isinstance(part, dict):
            return False
        if part.get("finish_reason") is not None or not _empty(part.get("logprobs")):
            return False
        if part.get("text") or any(not _empty(v) for v in (part.get("delta") or {}).values()):
            return False
    return True


RESPONSE_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def assemble_response(events: Iterable[JSON]) -> JSON | None:
    """The terminal event's response; its output rebuilt from the item events if it has none."""
    final: JSON | None = None
    items: dict[int, JSON] = {}
    for event in events:
        kind = event.get("type")
        if kind == "response.output_item.done" and isinstance(event.get("item"), dict):
            # llama.cpp sends no output_index: the order of arrival is the order.
            position = event.get("output_index")
            items[position if isinstance(position, int) else len(items)] = event["item"]
        elif kind in RESPONSE_TERMINAL and isinstance(event.get("response"), dict):
            final = event["response"]
    if final is not None and not final.get("output") and items:
        final = {**final, "output": [items[i] for i in sorted(items)]}
    return final


def choices_finished(chunks: Iterable[JSON]) -> bool:
    """Every choice that appeared got a finish reason: the answer is whole."""
    seen: set[int] = set()
    finished: set[int] = set()
    for chunk in chunks:
        for part in chunk.get("choices") or ():
            index = part.get("index", 0)
            seen.add(index)
            if part.get("finish_reason") is not None:
                finished.add(index)
    return bool(seen) and seen == finished
