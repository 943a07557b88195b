"""LiteLLM proxy's wire quirks: a usage chunk with a choice, Responses without output."""

from __future__ import annotations

from proxy.testing.dialects.openai import Dialect
from proxy.testing.fake_answers import JSON, Choice


class LiteLLM(Dialect):
    """LiteLLM's proxy: null fields dropped from chunks, and a usage chunk with a choice.

    With `include_usage` the last chunk is `choices: [{"index": 0, "delta": {}}]`
    plus `usage`, not `choices: []` (BerriAI/litellm#28735, #8450). Its
    Responses bridge, like other gateways, ends with a `response.completed`
    whose `output` is empty, the items having gone by in
    `response.output_item.done` (QuantumNous/new-api#4362, BerriAI/litellm#32724).
    """

    name = "litellm"

    def head(self, meta: JSON, kind: str) -> JSON:
        base = {"id": meta["id"], "created": meta["created"], "model": meta["model"]}
        return {**base, "object": kind, "system_fingerprint": meta["system_fingerprint"]}

    def chunk(self, head: JSON, part: JSON, include_usage: bool) -> JSON:
        return {**head, "choices": [{k: v for k, v in part.items() if v is not None}]}

    def usage_chunk(self, head: JSON, usage: JSON, kind: str) -> JSON:
        empty = {"index": 0, "delta": {}} if kind == "chat" else {"text": "", "index": 0}
        return {**head, "choices": [empty], "usage": usage}

    def role_delta(self, c: Choice) -> JSON:
        return {"role": "assistant"} if c.calls else {"content": "", "role": "assistant"}

    def chat_choice(self, c: Choice) -> JSON:
        message = {k: v for k, v in self.message(c).items() if k != "refusal"}
        message = {"tool_calls": None, "function_call": None, **message}
        whole = {"finish_reason": c.finish, "index": c.index, "message": message}
        logprobs = super().chat_choice(c)["logprobs"]
        return {**whole, "logprobs": logprobs} if logprobs is not None else whole

    def response_events(self, meta: JSON, item_id: str, plan: Choice, usage: JSON) -> list[JSON]:
        events = super().response_events(meta, item_id, plan, usage)
        last = events[-1]
        return [*events[:-1], {**last, "response": {**last["response"], "output": []}}]
