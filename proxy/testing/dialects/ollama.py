"""Ollama's wire quirks: whole tool calls all at index 0, role in every delta."""

from __future__ import annotations

from proxy.testing.dialects.openai import Dialect
from proxy.testing.fake_answers import JSON, Choice, ToolCall


class Ollama(Dialect):
    """Ollama's OpenAI layer (ollama/openai/openai.go: ToChunk, ToChatCompletion).

    Every delta repeats `role` and `content`; no role-only chunk; no
    `logprobs`; `n` is ignored. Each tool call comes whole in its own chunk
    and, with several calls, all say `index: 0` (ollama/ollama#15457), so
    only their ids tell them apart; the whole object's calls keep `index`.
    """

    name = "ollama"

    def adjust(self, body: JSON) -> JSON:
        return {k: v for k, v in body.items() if k != "n"}

    def head(self, meta: JSON, kind: str) -> JSON:
        base = {"id": meta["id"], "object": kind, "created": meta["created"]}
        return {**base, "model": meta["model"], "system_fingerprint": "fp_ollama"}

    def chat_parts(self, c: Choice) -> list[JSON]:
        parts = [self.part(c.index, {"role": "assistant", "content": p}) for p in c.pieces]
        for call in c.calls:
            delta = {"role": "assistant", "content": "", "tool_calls": [self.whole_call(0, call)]}
            parts.append(self.part(c.index, delta))
        return [*parts, self.finish_part(c)]

    def part(self, index: int, delta: JSON, logprobs: JSON | None = None) -> JSON:
        return {"index": index, "delta": delta, "finish_reason": None}

    def finish_part(self, c: Choice) -> JSON:
        delta = {"role": "assistant", "content": ""}
        return {"index": c.index, "delta": delta, "finish_reason": c.finish}

    def chat_choice(self, c: Choice) -> JSON:
        return {"index": c.index, "message": self.message(c), "finish_reason": c.finish}

    def message(self, c: Choice) -> JSON:
        message: JSON = {"role": "assistant", "content": "".join(c.pieces)}
        if c.calls:
            message["tool_calls"] = [self.whole_call(0, call) for call in c.calls]
        return message

    def whole_call(self, k: int, call: ToolCall) -> JSON:
        function = {"name": call.name, "arguments": call.arguments}
        return {"id": call.id, "index": k, "type": "function", "function": function}

    def text_part(self, c: Choice, piece: str) -> JSON:
        return {"text": piece, "index": c.index, "finish_reason": None}

    def foldable(self, whole: JSON) -> JSON:
        # Each call's `index` is always 0: a fold cannot (and need not) say it.
        choices = []
        for c in whole["choices"]:
            message = c.get("message") or {}
            if message.get("tool_calls"):
                calls = [
                    {k: v for k, v in t.items() if k != "index"} for t in message["tool_calls"]
                ]
                c = {**c, "message": {**message, "tool_calls": calls}}
            choices.append(c)
        return {**whole, "choices": choices}
