"""Re-chunking a whole answer into its endpoint's own stream: the inverse of assembly.

A streaming caller who shares a plain (non-stream) call, or who hits a plain
answer in the cache, gets the finished object as the stream the endpoint
would have sent: chat completion chunks, text completion chunks, or
Responses events. The first token comes when the whole answer is there.

The chunks follow OpenAI's shapes: every chunk repeats the answer's identity
(`id`, `created`, `model`, `system_fingerprint`, `service_tier`); the first
chunk carries the other top-level fields (Azure's `prompt_filter_results`,
llama.cpp's `timings`...); each choice opens with its role, then its content
and other message fields in one delta, then each tool call, then its finish
reason with the choice's own extra fields; usage comes last in a
`choices: []` chunk, for callers who asked. Folding the chunks back with
`proxy.assemble` gives the object again, field for field (the round-trip
property the tests pin); only a tool call's own `index` field, which its
position in the stream replaces, does not survive. Pure functions; no I/O.
"""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]

_IDENTITY = ("id", "created", "model", "system_fingerprint", "service_tier")


def _heads(whole: JSON, kind: str) -> tuple[JSON, JSON]:
    """(what every chunk repeats, what the first chunk adds)."""
    head: JSON = {"object": kind, **{name: whole[name] for name in _IDENTITY if name in whole}}
    first = {
        name: value
        for name, value in whole.items()
        if name not in _IDENTITY and name not in ("object", "choices", "usage")
    }
    return head, first


def _stream(head: JSON, first: JSON, parts: list[JSON], usage: Any, with_usage: bool) -> list[JSON]:
    if with_usage:
        head = {**head, "usage": None}  # as OpenAI does on every chunk when usage is asked
    chunks = [{**head, "choices": [part]} for part in parts]
    if chunks:
        chunks[0] = {**chunks[0], **first}
    else:
        chunks.append({**head, **first, "choices": []})
    if with_usage and usage is not None:
        chunks.append({**head, "choices": [], "usage": usage})
    return chunks


def chat_chunks(whole: JSON, with_usage: bool = False) -> list[JSON]:
    head, first = _heads(whole, "chat.completion.chunk")
    parts: list[JSON] = []
    for choice in whole.get("choices") or ():
        index = choice.get("index", 0)
        message = dict(choice.get("message") or {})
        role = message.pop("role", "assistant")
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            del message["tool_calls"]  # each call gets its own delta below
        opening: JSON = {"role": role}
        if "content" in message:
            opening["content"] = None if message["content"] is None else ""
        parts.append({"index": index, "delta": opening, "finish_reason": None})
        if message:
            body = {"index": index, "delta": message, "finish_reason": None}
            if "logprobs" in choice:
                body["logprobs"] = choice["logprobs"]
            parts.append(body)
        elif "logprobs" in choice:
            parts[-1]["logprobs"] = choice["logprobs"]
        if isinstance(calls, list):
            deltas = [{**call, "index": k} for k, call in enumerate(calls)]
            parts.append({"index": index, "delta": {"tool_calls": deltas}, "finish_reason": None})
        extra = {k: v for k, v in choice.items() if k not in ("index", "message", "logprobs")}
        parts.append({"index": index, "delta": {}, **extra})
    return _stream(head, first, parts, whole.get("usage"), with_usage)


def completion_chunks(whole: JSON, with_usage: bool = False) -> list[JSON]:
    head, first = _heads(whole, "text_completion")
    parts: list[JSON] = []
    for choice in whole.get("choices") or ():
        index = choice.get("index", 0)
        text = {"text": choice.get("text") or "", "index": index, "finish_reason": None}
        if "logprobs" in choice:
            text["logprobs"] = choice["logprobs"]
        extra = {k: v for k, v in choice.items() if k not in ("index", "text", "logprobs")}
        parts += [text, {"text": "", "index": index, **extra}]
    return _stream(head, first, parts, whole.get("usage"), with_usage)


def response_events(whole: JSON) -> list[JSON]:
    """The Responses API stream of a finished response, ending in its terminal event."""
    opened = {**whole, "status": "in_progress", "output": [], "usage": None}
    events: list[JSON] = [
        {"type": "response.created", "response": opened},
        {"type": "response.in_progress", "response": opened},
    ]
    for position, item in enumerate(whole.get("output") or ()):
        events += _item_events(position, item)
    status = whole.get("status")
    terminal = status if status in ("completed", "incomplete", "failed") else "completed"
    events.append({"type": f"response.{terminal}", "response": whole})
    return [{**event, "sequence_number": seq} for seq, event in enumerate(events)]


def _item_events(position: int, item: JSON) -> list[JSON]:
    item_id = item.get("id")
    where = {"item_id": item_id, "output_index": position}
    added = {**item, "status": "in_progress"}
    events: list[JSON] = []
    if item.get("type") == "message":
        added["content"] = []
        for k, part in enumerate(item.get("content") or ()):
            at = {**where, "content_index": k}
            text = part.get("text") if part.get("type") == "output_text" else None
            empty = {**part, "text": ""} if text is not None else part
            events.append({"type": "response.content_part.added", **at, "part": empty})
            if text is not None:
                events.append({"type": "response.output_text.delta", **at, "delta": text})
                events.append({"type": "response.output_text.done", **at, "text": text})
            events.append({"type": "response.content_part.done", **at, "part": part})
    elif item.get("type") == "function_call":
        arguments = item.get("arguments") or ""
        added["arguments"] = ""
        events.append(
            {"type": "response.function_call_arguments.delta", **where, "delta": arguments}
        )
        done = {"type": "response.function_call_arguments.done", **where, "arguments": arguments}
        events.append(done)
    opening = {"type": "response.output_item.added", "output_index": position, "item": added}
    closing = {"type": "response.output_item.done", "output_index": position, "item": item}
    return [opening, *events, closing]
