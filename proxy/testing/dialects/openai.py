"""OpenAI's own wire shapes: the reference every other dialect departs from.

`Dialect` renders a plan (`proxy.testing.fake_answers`) as stream chunks and
as the whole non-stream object, for chat, text completions and the Responses
API, through small hooks (the chunk head, each kind of delta, the usage
chunk...) that the other dialects override.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

from proxy.testing.fake_answers import JSON, Choice, ToolCall

REASONING = ("The user ", "wants ", "an answer.")  # what a reasoning model thinks first


def _interleave(per_choice: list[list[JSON]]) -> list[JSON]:
    # Round robin, like OpenAI: every chunk carries one choice.
    return [p for step in itertools.zip_longest(*per_choice) for p in step if p is not None]


def _token_logprobs(token: str, logprob: float) -> JSON:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}


class Dialect:
    """OpenAI itself: the reference every other dialect departs from."""

    name: ClassVar[str] = "openai"
    done: ClassVar[bool] = True  # chat and completion streams end with `data: [DONE]`

    def adjust(self, body: JSON) -> JSON:
        """The request as this server understands it (what it ignores, its defaults)."""
        return body

    def head(self, meta: JSON, kind: str) -> JSON:
        return {"id": meta["id"], "object": kind, **{k: v for k, v in meta.items() if k != "id"}}

    def prelude(self, meta: JSON) -> list[JSON]:
        return []

    def chunk(self, head: JSON, part: JSON, include_usage: bool) -> JSON:
        return {**head, "choices": [part], **({"usage": None} if include_usage else {})}

    def usage_chunk(self, head: JSON, usage: JSON, kind: str) -> JSON:
        return {**head, "choices": [], "usage": usage}

    def end(self, chunks: list[JSON], head: JSON, usage: JSON, include: bool, kind: str) -> None:
        if include:
            chunks.append(self.usage_chunk(head, usage, kind))

    def whole_usage(self, usage: JSON) -> JSON:
        return usage

    def foldable(self, whole: JSON) -> JSON:
        """`whole` without what its stream cannot say (the proxy's assembly cannot know it)."""
        return whole

    def unasked_usage_chunks(self, chunks: list[JSON]) -> list[JSON]:
        """A chat stream without `include_usage`, less what this server moves onto the
        usage chunk when usage is asked: the proxy asks, and withholds that chunk from
        a reader who did not, so such a reader gets it nowhere (README)."""
        return chunks

    # -- chat

    def chat_chunks(
        self, meta: JSON, choices: list[Choice], usage: JSON, include_usage: bool
    ) -> list[JSON]:
        head = self.head(meta, "chat.completion.chunk")
        parts = _interleave([self.chat_parts(c) for c in choices])
        chunks = [self.chunk(head, p, include_usage) for p in parts]
        self.end(chunks, head, usage, include_usage, "chat")
        return self.prelude(meta) + chunks

    def chat_parts(self, c: Choice) -> list[JSON]:
        parts = [self.part(c.index, self.role_delta(c))]
        parts += [self.part(c.index, delta) for delta in self.reasoning_deltas(c)]
        for i, piece in enumerate(c.pieces):
            logprobs = None
            if c.logprobs is not None:
                logprobs = {"content": [_token_logprobs(piece, c.logprobs[i])], "refusal": None}
            parts.append(self.part(c.index, self.content_delta(piece), logprobs))
        for k, call in enumerate(c.calls):
            parts += [self.part(c.index, delta) for delta in self.call_deltas(k, call)]
        parts.append(self.finish_part(c))
        return parts

    def part(self, index: int, delta: JSON, logprobs: JSON | None = None) -> JSON:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}

    def role_delta(self, c: Choice) -> JSON:
        # A tool-call answer has no content at all, so its message content is null.
        return {"role": "assistant", "content": None if c.calls else "", "refusal": None}

    def reasoning_deltas(self, c: Choice) -> list[JSON]:
        return []

    def content_delta(self, piece: str) -> JSON:
        return {"content": piece}

    def call_deltas(self, k: int, call: ToolCall) -> list[JSON]:
        opening = {"index": k, "id": call.id, "type": "function"}
        first = {**opening, "function": {"name": call.name, "arguments": ""}}
        rest = [{"index": k, "function": {"arguments": piece}} for piece in call.pieces]
        return [{"tool_calls": [call]} for call in [first, *rest]]

    def finish_part(self, c: Choice) -> JSON:
        return {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish}

    def chat_object(self, meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
        out = [self.chat_choice(c) for c in choices]
        usage = self.whole_usage(usage)
        return {**self.head(meta, "chat.completion"), "choices": out, "usage": usage}

    def chat_choice(self, c: Choice) -> JSON:
        logprobs = None
        if c.logprobs is not None:
            content = [_token_logprobs(p, lp) for p, lp in zip(c.pieces, c.logprobs, strict=True)]
            logprobs = {"content": content, "refusal": None}
        whole = {"index": c.index, "message": self.message(c), "logprobs": logprobs}
        return {**whole, "finish_reason": c.finish}

    def message(self, c: Choice) -> JSON:
        content = None if c.calls else "".join(c.pieces)
        message: JSON = {"role": "assistant", "content": content, "refusal": None}
        if c.calls:
            message["tool_calls"] = [self.whole_call(k, call) for k, call in enumerate(c.calls)]
        return message

    def whole_call(self, k: int, call: ToolCall) -> JSON:
        function = {"name": call.name, "arguments": call.arguments}
        return {"id": call.id, "type": "function", "function": function}

    # -- text completions

    def completion_chunks(
        self, meta: JSON, choices: list[Choice], usage: JSON, include_usage: bool
    ) -> list[JSON]:
        head = self.head(meta, "text_completion")
        per_choice = [self.text_parts(c) for c in choices]
        chunks = [self.chunk(head, p, include_usage) for p in _interleave(per_choice)]
        self.end(chunks, head, usage, include_usage, "text")
        return self.prelude(meta) + chunks

    def text_parts(self, c: Choice) -> list[JSON]:
        return [*(self.text_part(c, piece) for piece in c.pieces), self.text_end(c)]

    def text_part(self, c: Choice, piece: str) -> JSON:
        return {"text": piece, "index": c.index, "logprobs": None, "finish_reason": None}

    def text_end(self, c: Choice) -> JSON:
        return {**self.text_part(c, ""), "finish_reason": c.finish}

    def completion_object(self, meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
        out = [self.text_choice(c) for c in choices]
        usage = self.whole_usage(usage)
        return {**self.head(meta, "text_completion"), "choices": out, "usage": usage}

    def text_choice(self, c: Choice) -> JSON:
        return {**self.text_end(c), "text": "".join(c.pieces)}

    # -- the Responses API

    def response_events(self, meta: JSON, item_id: str, plan: Choice, usage: JSON) -> list[JSON]:
        """The Responses API stream; the last event carries the whole response object."""
        text = "".join(plan.pieces)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant"}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        opening = {**item, "content": []}
        events: list[JSON] = [
            {"type": "response.created", "response": _response(meta, "in_progress", [], None)},
            {"type": "response.in_progress", "response": _response(meta, "in_progress", [], None)},
            {"type": "response.output_item.added", "output_index": 0, "item": opening},
            {"type": "response.content_part.added", **where, "part": part},
        ]
        events += [
            {"type": "response.output_text.delta", **where, "delta": p, "logprobs": []}
            for p in plan.pieces
        ]
        final = self.response_object(meta, item_id, plan, usage)
        events += [
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
            {"type": "response.output_item.done", "output_index": 0, "item": final["output"][0]},
            {"type": f"response.{final['status']}", "response": final},
        ]
        return [{**event, "sequence_number": seq} for seq, event in enumerate(events)]

    def response_object(self, meta: JSON, item_id: str, plan: Choice, usage: JSON) -> JSON:
        status = "completed" if plan.finish == "stop" else "incomplete"
        text = "".join(plan.pieces)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {"id": item_id, "type": "message", "status": status, "role": "assistant"}
        return _response(meta, status, [{**item, "content": [part]}], usage)


def _response(meta: JSON, status: str, output: list[JSON], usage: JSON | None) -> JSON:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        **meta,
        "object": "response",
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "output": output,
        "usage": usage,
    }


class NoDone(Dialect):
    """OpenAI's shapes from a server that closes the stream without `data: [DONE]`."""

    name = "no_done"
    done = False
