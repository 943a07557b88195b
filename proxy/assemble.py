"""Assembling a recorded SSE stream into the non-stream JSON object.

Chat and text completions are always requested upstream as streams so that
stream and non-stream callers share one call; a `stream: false` caller gets
the events folded back into the object the upstream would have returned.
Pure functions over parsed event payloads; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_SKIP_TOP = frozenset({"choices", "object", "usage"})


def _top_fields(chunk: dict[str, Any], top: dict[str, Any]) -> None:
    """Fields shared by every chunk (id, model, created...), first value wins."""
    for name, value in chunk.items():
        if name not in _SKIP_TOP and name not in top:
            top[name] = value
    if chunk.get("usage") is not None:
        top["usage"] = chunk["usage"]


def _finish(top: dict[str, Any], kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    out = {name: value for name, value in top.items() if name != "usage"}
    out["object"] = kind
    out["choices"] = choices
    out["usage"] = top.get("usage")
    return out


def assemble_chat(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    top: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        _top_fields(chunk, top)
        for part in chunk.get("choices") or ():
            choice = choices.setdefault(
                part.get("index", 0),
                {
                    "message": {"role": "assistant", "content": None},
                    "logprobs": None,
                    "finish_reason": None,
                    "_tools": {},
                },
            )
            _merge_chat_delta(choice, part)
    return _finish(
        top, "chat.completion", [_finish_chat_choice(i, choices[i]) for i in sorted(choices)]
    )


def _merge_chat_delta(choice: dict[str, Any], part: dict[str, Any]) -> None:
    delta = part.get("delta") or {}
    message = choice["message"]
    for name, value in delta.items():
        if name == "role":
            message["role"] = value or message["role"]
        elif name == "content":
            if value is not None:
                message["content"] = (message["content"] or "") + value
        elif name == "refusal":
            if value is not None:
                message["refusal"] = (message.get("refusal") or "") + value
            else:
                message.setdefault("refusal", None)
        elif name == "tool_calls":
            for call in value or ():
                _merge_tool_call(choice["_tools"], call)
        elif name not in message:
            message[name] = value
    logprobs = part.get("logprobs")
    if logprobs:
        merged = choice["logprobs"] or {}
        for name, value in logprobs.items():
            if isinstance(value, list):
                merged[name] = (merged.get(name) or []) + value
            else:
                merged.setdefault(name, value)
        choice["logprobs"] = merged
    if part.get("finish_reason") is not None:
        choice["finish_reason"] = part["finish_reason"]


def _merge_tool_call(tools: dict[int, dict[str, Any]], call: dict[str, Any]) -> None:
    index = call.get("index", 0)
    current = tools.get(index)
    if current is None:
        current = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        tools[index] = current
    if call.get("id"):
        current["id"] = call["id"]
    if call.get("type"):
        current["type"] = call["type"]
    function = call.get("function") or {}
    if function.get("name"):
        current["function"]["name"] += function["name"]
    if function.get("arguments"):
        current["function"]["arguments"] += function["arguments"]


def _finish_chat_choice(index: int, choice: dict[str, Any]) -> dict[str, Any]:
    tools = choice.pop("_tools")
    if tools:
        choice["message"]["tool_calls"] = [tools[i] for i in sorted(tools)]
    return {"index": index, **choice}


def assemble_completion(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    top: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        _top_fields(chunk, top)
        for part in chunk.get("choices") or ():
            index = part.get("index", 0)
            choice = choices.setdefault(
                index, {"text": "", "index": index, "logprobs": None, "finish_reason": None}
            )
            choice["text"] += part.get("text") or ""
            logprobs = part.get("logprobs")
            if logprobs:
                merged = choice["logprobs"] or {}
                for name, value in logprobs.items():
                    merged[name] = (
                        (merged.get(name) or []) + value if isinstance(value, list) else value
                    )
                choice["logprobs"] = merged
            if part.get("finish_reason") is not None:
                choice["finish_reason"] = part["finish_reason"]
    return _finish(top, "text_completion", [choices[i] for i in sorted(choices)])


RESPONSE_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def assemble_response(events: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The Responses API carries the whole object in its terminal event."""
    final: dict[str, Any] | None = None
    for event in events:
        if event.get("type") in RESPONSE_TERMINAL and isinstance(event.get("response"), dict):
            final = event["response"]
    return final


def choices_finished(chunks: Iterable[dict[str, Any]]) -> bool:
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
