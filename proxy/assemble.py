"""Folding a recorded SSE stream into the non-stream JSON object.

A `stream: false` caller who shares a streamed call gets the chunks folded
back into the object the upstream would have returned. Every dialect
(OpenAI, Azure, vLLM, llama.cpp, Ollama, LiteLLM) folds by the same rules:

* a string field of the delta streamed in pieces is concatenated (content,
  refusal, reasoning text, and any field not known today), except
  identifiers (`id`, `name`, `type`, `role`...), which are set once:
  llama.cpp repeats a tool call's name in every delta;
* inside a nested object only the known text positions are pieces
  (`text`, `thinking`, `arguments`, `transcript`, `data`...: legacy
  `function_call.arguments`, audio); any other string there keeps its
  latest value, since LiteLLM repeats `provider_specific_fields` whole;
* a list of objects (OpenRouter's `reasoning_details`, LiteLLM's
  `thinking_blocks`) is merged element by element, by each element's
  `index`, or, without one, into the last element of the same `type`;
* any other field keeps its latest value that is not null or empty: Azure's
  content-filter chunks carry `id: ""`, `model: ""` and `created: 0`, and
  its last chunk an empty `content_filter_results`;
* a tool call is found by its `index`, but a new non-empty `id` at an
  occupied index opens a new call: Ollama sends parallel calls all at
  index 0, each whole, with its own id; a message with tool calls whose only
  content was the role chunk's `""` has `content: null`, as vLLM answers.

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
# Inside a nested object, the strings that arrive in pieces; any other keeps its latest value.
_TEXT = frozenset(
    {"content", "text", "thinking", "reasoning", "reasoning_content", "refusal", "summary"}
    | {"arguments", "transcript", "data"}
)
_LAST = frozenset({"choices", "object", "usage"})  # _finish puts these last
_CHOICE_OWN = frozenset({"index", "delta", "logprobs", "finish_reason", "text"})
# Fields a stream's chunks carry and the whole answer does not: OpenAI pads
# every chunk with random `obfuscation` text (against length side channels).
_STREAM_ONLY = frozenset({"obfuscation"})


class _Pieces(list[str]):
    """A string still arriving in pieces; joined once, when the fold is done."""


class _Elements(list[JSON]):
    """A list of objects still arriving in pieces, and its elements by their `index`."""

    __slots__ = ("by_index",)

    def __init__(self) -> None:
        super().__init__()
        self.by_index: dict[int, JSON] = {}


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


def _merge(target: JSON, piece: JSON, nested: bool = False) -> None:
    """Fold one streamed piece (a delta, or a part of one) into `target`.

    At a delta's own level every string but an identifier is a piece; inside
    a nested object only the known text positions are (`_TEXT`): LiteLLM
    repeats `provider_specific_fields` whole in every chunk.
    """
    for name, value in piece.items():
        kind = type(value)
        if kind is str:
            current = target.get(name)
            if name in _SET_ONCE:
                if not current:
                    target[name] = value
            elif nested and name not in _TEXT:
                _keep_latest(target, name, value)
            elif type(current) is _Pieces:
                current.append(value)
            else:
                target[name] = _Pieces((current, value) if type(current) is str else (value,))
        elif kind is dict:
            inner = target.get(name)
            if type(inner) is not dict:
                inner = target[name] = {}
            _merge(inner, value, True)
        elif kind is list and value and all(type(v) is dict for v in value):
            _merge_elements(target, name, value)
        else:
            _keep_latest(target, name, value)


def _merge_elements(target: JSON, name: str, elements: list[JSON]) -> None:
    """A list of objects streamed in pieces: each element merged into the one it continues.

    An element with an integer `index` continues the element of that index
    (OpenAI's SDK accumulates every list delta this way, openai-python
    lib/streaming/_deltas.py; OpenRouter numbers its `reasoning_details`).
    Without one, a delta's first element continues the last element so far
    when their `type` agrees (LiteLLM's `thinking_blocks` pieces carry no
    index, and its own stream_chunk_builder joins them into one block); any
    other element is a new one.
    """
    merged = target.get(name)
    if type(merged) is not _Elements:
        merged = target[name] = _Elements()
    for position, element in enumerate(elements):
        index = element.get("index")
        if type(index) is int:
            into = merged.by_index.get(index)
            if into is None:
                into = merged.by_index[index] = {}
                merged.append(into)
        elif position == 0 and merged and merged[-1].get("type") == element.get("type"):
            into = merged[-1]
        else:
            into = {}
            merged.append(into)
        _merge(into, element, True)


def _settle(value: Any) -> Any:
    """Join the pieces of every string still arriving, in place."""
    if type(value) is dict:
        for name, inner in value.items():
            if type(inner) is _Pieces:
                value[name] = "".join(inner)
            elif type(inner) is _Elements:
                value[name] = _settle(list(inner))
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
    said_with_calls: set[int] = set()  # choices whose tool-call deltas also said `content`
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
                if delta.get("content") is not None:
                    said_with_calls.add(index)
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
            if message["content"] == "" and index not in said_with_calls:
                # vLLM opens every stream with `content: ""` but answers a tool
                # call with `content: null`, as OpenAI does; Ollama says `""`
                # beside each call, and in its whole answer too.
                message["content"] = None
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

    It carries `usage` and no content, tool call, refusal, reasoning text,
    logprobs or finish reason, whatever `role` it repeats: OpenAI sends
    `choices: []`, LiteLLM `[{"index": 0, "delta": {}}]`, OpenRouter
    `[{"index": 0, "delta": {"role": "assistant", "content": ""}}]`.
    """
    if not isinstance(chunk.get("usage"), dict):
        return False
    for part in chunk.get("choices") or ():
        if not isinstance(part, dict):
            return False
        if part.get("finish_reason") is not None or not _empty(part.get("logprobs")):
            return False
        delta = part.get("delta") or {}
        # `role` says nothing: OpenRouter's usage chunk repeats `role: "assistant"`.
        if part.get("text") or any(not _empty(v) for k, v in delta.items() if k != "role"):
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
