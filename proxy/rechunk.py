"""Re-chunking: a finished non-stream answer as the endpoint's own SSE stream.

The other half of `proxy.assemble`. A streaming reader of a plain upstream
call (or of a cached plain answer) gets the finished object as the events
the upstream would have streamed for it, framed as the upstream frames
them:

* chat completions: a role chunk first (`role`, `content`, `refusal` and
  any other message field), then the refusal and the content (one chunk
  per logprobs token when the tokens spell the content, else one chunk),
  each tool call as an opening chunk (`index`, `id`, `type`, `name`) and
  an arguments chunk, a finish chunk (`delta: {}`, the choice's own extra
  fields), choices interleaved round robin; `data: [DONE]` last;
* text completions: a text chunk per choice (per logprobs token when they
  spell it) and a finish chunk, then `data: [DONE]`;
* Responses: `response.created`, `response.in_progress`, per output item
  `output_item.added`, its parts' `content_part.added`, `output_text.delta`
  (or `refusal.delta`, `function_call_arguments.delta`) and `...done`
  events, `output_item.done`, and the terminal `response.completed`
  (`.incomplete`, `.failed`) carrying the whole object, each with its
  `event:` line and a `sequence_number`; no `[DONE]`.

When the object carries `usage`, every chat or completion chunk carries
`"usage": null` and one usage chunk (`choices: []`, OpenAI's shape) comes
before `[DONE]`: the stream the proxy asks for with `include_usage`. Its
index is returned so that readers who did not ask never get it.

The round trip object -> events -> `proxy.assemble` -> object is the
identity for objects of the upstreams' shape (tests/test_rechunk.py).
Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

JSON = dict[str, Any]

DONE_EVENT = b"data: [DONE]\n\n"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESPONSES_PATH = "/v1/responses"
_TERMINAL_STATUS = frozenset({"completed", "incomplete", "failed"})
_CHOICE_FIELDS = frozenset({"index", "message", "text", "logprobs", "finish_reason"})


@dataclass(frozen=True, slots=True)
class Rechunked:
    """The events of one answer, each framed as the upstream frames it."""

    events: tuple[bytes, ...]
    usage_event: int | None  # index of the include_usage chunk: only for readers who asked


def rechunk(path: str, answer: Any) -> Rechunked | None:
    """The stream for `answer` (a parsed non-stream body) at `path`.

    None when the path has no stream form or the object is not of the
    shape its endpoint returns: the caller then has nothing to convert.
    """
    if not isinstance(answer, dict):
        return None
    if path == RESPONSES_PATH:
        if not isinstance(answer.get("output"), list):
            return None
        return Rechunked(tuple(map(_typed_event, response_events(answer))), None)
    if path == CHAT_PATH:
        chunks = chat_chunks(answer)
    elif path == COMPLETIONS_PATH:
        chunks = completion_chunks(answer)
    else:
        return None
    if chunks is None:
        return None
    usage_at = len(chunks) - 1 if answer.get("usage") is not None else None
    return Rechunked((*map(_data_event, chunks), DONE_EVENT), usage_at)


def _data_event(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _typed_event(payload: JSON) -> bytes:
    return b"event: " + str(payload["type"]).encode() + b"\n" + _data_event(payload)


# -- chat and text completions ------------------------------------------------------------------


def _chunk_maker(answer: JSON, kind: str) -> tuple[JSON, JSON | None]:
    """The fields every chunk repeats (in the object's order), and the usage chunk."""
    head: JSON = {}
    if "object" not in answer:
        head["object"] = kind
    for name, value in answer.items():
        if name == "object":
            head[name] = kind
        elif name == "usage":
            head[name] = None  # the placeholder `include_usage` puts on every chunk
        elif name == "choices":
            head[name] = []
        else:
            head[name] = value
    usage = answer.get("usage")
    return head, (None if usage is None else {**head, "usage": usage})


def _frames(head: JSON, parts: Iterator[JSON]) -> list[JSON]:
    return [{**head, "choices": [part]} for part in parts]


def _round_robin(per_choice: list[list[JSON]]) -> Iterator[JSON]:
    # Like OpenAI: one choice per chunk, choices taking turns.
    for step in itertools.zip_longest(*per_choice):
        yield from (part for part in step if part is not None)


def _choices(answer: JSON) -> list[JSON] | None:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        return None
    return choices


def _split_logprobs(logprobs: Any, text: Any) -> list[JSON] | None:
    """Per-token chat logprobs when their tokens (`logprobs.content`) spell `text` exactly.

    The first piece keeps every other field; later pieces keep only the
    non-list ones, so the assembler's concatenation gives the lists back.
    """
    if not isinstance(logprobs, dict) or not isinstance(text, str) or not text:
        return None
    entries = logprobs.get("content")
    if not isinstance(entries, list) or not entries:
        return None
    tokens = [e.get("token") if isinstance(e, dict) else None for e in entries]
    if not all(isinstance(t, str) for t in tokens) or "".join(map(str, tokens)) != text:
        return None
    pieces = []
    for i, entry in enumerate(entries):
        piece: JSON = {}
        for name, value in logprobs.items():
            if name == "content":
                piece[name] = [entry]
            elif i == 0 or not isinstance(value, list):
                piece[name] = value
        pieces.append(piece)
    return pieces


def chat_chunks(answer: JSON) -> list[JSON] | None:
    """The `chat.completion.chunk` payloads for a `chat.completion`, usage chunk last."""
    choices = _choices(answer)
    if choices is None:
        return None
    head, usage = _chunk_maker(answer, "chat.completion.chunk")
    per_choice = []
    for choice in choices:
        parts = _chat_parts(choice)
        if parts is None:
            return None
        per_choice.append(parts)
    chunks = _frames(head, _round_robin(per_choice))
    if usage is not None:
        chunks.append(usage)
    return chunks


def _chat_part(index: Any, delta: JSON, logprobs: Any = None) -> JSON:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}


def _chat_parts(choice: JSON) -> list[JSON] | None:
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    index = choice.get("index", 0)
    content = message.get("content")
    refusal = message.get("refusal")
    role: JSON = {"role": message.get("role", "assistant")}
    if "content" in message:
        role["content"] = "" if isinstance(content, str) else None
    for name, value in message.items():
        if name == "refusal":
            role[name] = None  # the text, if any, follows as its own delta
        elif name not in ("role", "content", "tool_calls"):
            role[name] = value
    parts = [_chat_part(index, role)]
    logprobs = choice.get("logprobs")
    logprobs_sent = logprobs is None
    if isinstance(refusal, str):
        parts.append(_chat_part(index, {"refusal": refusal}))
    if isinstance(content, str) and content:
        split = _split_logprobs(logprobs, content)
        if split is not None:
            parts += [
                _chat_part(index, {"content": piece["content"][0]["token"]}, piece)
                for piece in split
            ]
        else:
            parts.append(_chat_part(index, {"content": content}, logprobs))
        logprobs_sent = True
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            return None
        for position, call in enumerate(tool_calls):
            if not isinstance(call, dict):
                return None
            function = call.get("function")
            function = function if isinstance(function, dict) else {}
            opening: JSON = {"index": position}
            for name, value in call.items():
                if name == "function":
                    opening[name] = {**function, "arguments": ""}
                elif name != "index":
                    # The stream's index is the call's place in the list: Ollama's
                    # whole answer numbers every parallel call 0, which would glue
                    # their arguments together.
                    opening[name] = value
            delta: JSON = {"tool_calls": [opening]}
            if position == 0 and content == "":
                # Said beside a call, an empty content folds back to "" (Ollama's
                # answers), where a role chunk's "" folds to null (vLLM's).
                delta = {"content": "", **delta}
            parts.append(_chat_part(index, delta))
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                more = {"index": position, "function": {"arguments": arguments}}
                parts.append(_chat_part(index, {"tool_calls": [more]}))
    finish: JSON = {
        "index": index,
        "delta": {},
        "logprobs": None if logprobs_sent else logprobs,
        "finish_reason": choice.get("finish_reason"),
    }
    # A dialect's own choice fields (vLLM's stop_reason...) come with the finish, as they do.
    finish.update((k, v) for k, v in choice.items() if k not in _CHOICE_FIELDS)
    parts.append(finish)
    return parts


def completion_chunks(answer: JSON) -> list[JSON] | None:
    """The `text_completion` chunk payloads for a `text_completion`, usage chunk last."""
    choices = _choices(answer)
    if choices is None:
        return None
    head, usage = _chunk_maker(answer, "text_completion")
    per_choice = []
    for choice in choices:
        index = choice.get("index", 0)
        text = choice.get("text")
        logprobs = choice.get("logprobs")
        parts: list[JSON] = []
        if isinstance(text, str) and text:
            split = _split_text_logprobs(logprobs, text)
            if split is not None:
                parts += [
                    {"text": token, "index": index, "logprobs": piece, "finish_reason": None}
                    for token, piece in split
                ]
            else:
                parts.append(
                    {"text": text, "index": index, "logprobs": logprobs, "finish_reason": None}
                )
            logprobs = None
        finish = {
            "text": "",
            "index": index,
            "logprobs": logprobs,
            "finish_reason": choice.get("finish_reason"),
        }
        finish.update((k, v) for k, v in choice.items() if k not in _CHOICE_FIELDS)
        parts.append(finish)
        per_choice.append(parts)
    chunks = _frames(head, _round_robin(per_choice))
    if usage is not None:
        chunks.append(usage)
    return chunks


def _split_text_logprobs(logprobs: Any, text: str) -> list[tuple[str, JSON]] | None:
    """Completion logprobs are parallel lists; split them per token when they spell `text`."""
    if not isinstance(logprobs, dict):
        return None
    tokens = logprobs.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        return None
    if "".join(tokens) != text:
        return None
    count = len(tokens)
    if not all(isinstance(v, list) and len(v) == count for v in logprobs.values()):
        return None
    return [(tokens[i], {name: [v[i]] for name, v in logprobs.items()}) for i in range(count)]


# -- the Responses API --------------------------------------------------------------------------


def response_events(answer: JSON) -> list[JSON]:
    """The Responses stream for a finished `response` object, sequence numbers included."""
    status = answer.get("status")
    starting: JSON = {}
    for name, value in answer.items():
        if name == "status":
            starting[name] = "in_progress"
        elif name == "output":
            starting[name] = []
        elif name in ("usage", "incomplete_details", "error"):
            starting[name] = None
        else:
            starting[name] = value
    events: list[JSON] = [
        {"type": "response.created", "response": starting},
        {"type": "response.in_progress", "response": starting},
    ]
    for position, item in enumerate(answer["output"]):
        events += _item_events(position, item)
    terminal = status if status in _TERMINAL_STATUS else "completed"
    events.append({"type": f"response.{terminal}", "response": answer})
    return [{**event, "sequence_number": seq} for seq, event in enumerate(events)]


def _in_progress(item: JSON, emptied: tuple[str, ...]) -> JSON:
    out: JSON = {}
    for name, value in item.items():
        if name == "status":
            out[name] = "in_progress"
        elif name in emptied:
            out[name] = "" if isinstance(value, str) else []
        else:
            out[name] = value
    return out


def _item_events(position: int, item: Any) -> list[JSON]:
    if not isinstance(item, dict):
        return []
    kind = item.get("type")
    item_id = item.get("id", "")
    events: list[JSON]
    if kind == "message" and isinstance(item.get("content"), list):
        events = [
            {
                "type": "response.output_item.added",
                "output_index": position,
                "item": _in_progress(item, ("content",)),
            }
        ]
        for content_index, part in enumerate(item["content"]):
            if isinstance(part, dict):
                where = {
                    "item_id": item_id,
                    "output_index": position,
                    "content_index": content_index,
                }
                events += _part_events(where, part)
    elif kind == "function_call" and isinstance(item.get("arguments"), str):
        where = {"item_id": item_id, "output_index": position}
        arguments = item["arguments"]
        events = [
            {
                "type": "response.output_item.added",
                "output_index": position,
                "item": _in_progress(item, ("arguments",)),
            }
        ]
        if arguments:
            events.append(
                {"type": "response.function_call_arguments.delta", **where, "delta": arguments}
            )
        events.append(
            {"type": "response.function_call_arguments.done", **where, "arguments": arguments}
        )
    else:
        # Other items (reasoning, tool calls run by the server) arrive whole at their end.
        events = [
            {
                "type": "response.output_item.added",
                "output_index": position,
                "item": _in_progress(item, ()),
            }
        ]
    events.append({"type": "response.output_item.done", "output_index": position, "item": item})
    return events


def _part_events(where: JSON, part: JSON) -> list[JSON]:
    kind = part.get("type")
    if kind == "output_text" and isinstance(part.get("text"), str):
        text = part["text"]
        logprobs = part.get("logprobs", [])
        started = {
            name: ("" if name == "text" else [] if name in ("annotations", "logprobs") else value)
            for name, value in part.items()
        }
        events: list[JSON] = [{"type": "response.content_part.added", **where, "part": started}]
        if text:
            events.append(
                {"type": "response.output_text.delta", **where, "delta": text, "logprobs": logprobs}
            )
        annotations = part.get("annotations")
        for number, annotation in enumerate(annotations if isinstance(annotations, list) else ()):
            events.append(
                {
                    "type": "response.output_text.annotation.added",
                    **where,
                    "annotation_index": number,
                    "annotation": annotation,
                }
            )
        events.append(
            {"type": "response.output_text.done", **where, "text": text, "logprobs": logprobs}
        )
    elif kind == "refusal" and isinstance(part.get("refusal"), str):
        refusal = part["refusal"]
        started = {**part, "refusal": ""}
        events = [{"type": "response.content_part.added", **where, "part": started}]
        if refusal:
            events.append({"type": "response.refusal.delta", **where, "delta": refusal})
        events.append({"type": "response.refusal.done", **where, "refusal": refusal})
    else:
        events = [{"type": "response.content_part.added", **where, "part": part}]
    events.append({"type": "response.content_part.done", **where, "part": part})
    return events
