"""vLLM's wire quirks: pydantic `exclude_unset` chunks, reasoning, `stop_reason`."""

from __future__ import annotations

from proxy.testing.dialects.openai import REASONING, Dialect
from proxy.testing.fake_answers import JSON, Choice, ToolCall


class VLLM(Dialect):
    """vLLM's OpenAI server, run with a reasoning parser.

    Chunks are dumped with `exclude_unset`: no `usage` key but on the usage
    chunk (`choices: []`, only when `include_usage`), no `system_fingerprint`;
    the role chunk says `content: ""`, though a tool-call answer says
    `content: null` (tool_parsers/hermes_tool_parser.py, extract_tool_calls:
    `content=content if content else None`); reasoning streams as
    `reasoning_content` before the content; a tool call opens with its name
    and no arguments; the last chunk adds `stop_reason`. The whole object
    adds `prompt_logprobs`, `kv_transfer_params` and `tool_calls: []`.
    Source: vllm/entrypoints/openai/serving_chat.py and protocol.py
    (chat_completion_stream_generator, chat_completion_full_generator).
    """

    name = "vllm"

    def head(self, meta: JSON, kind: str) -> JSON:
        return {"id": meta["id"], "object": kind, **{k: meta[k] for k in ("created", "model")}}

    def chunk(self, head: JSON, part: JSON, include_usage: bool) -> JSON:
        return {**head, "choices": [part]}

    def role_delta(self, c: Choice) -> JSON:
        return {"role": "assistant", "content": ""}

    def reasoning_deltas(self, c: Choice) -> list[JSON]:
        return [] if c.calls else [{"reasoning_content": piece} for piece in REASONING]

    def call_deltas(self, k: int, call: ToolCall) -> list[JSON]:
        opening = {"id": call.id, "type": "function", "index": k, "function": {"name": call.name}}
        rest = [{"index": k, "function": {"arguments": piece}} for piece in call.pieces]
        return [{"tool_calls": [call]} for call in [opening, *rest]]

    def finish_part(self, c: Choice) -> JSON:
        return {**super().finish_part(c), "stop_reason": None}

    def text_end(self, c: Choice) -> JSON:
        return {**super().text_end(c), "stop_reason": None}

    def whole_usage(self, usage: JSON) -> JSON:
        return {**usage, "prompt_tokens_details": None}

    def chat_object(self, meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
        whole = super().chat_object(meta, choices, usage)
        return {**whole, "prompt_logprobs": None, "kv_transfer_params": None}

    def chat_choice(self, c: Choice) -> JSON:
        return {**super().chat_choice(c), "stop_reason": None}

    def message(self, c: Choice) -> JSON:
        calls = [self.whole_call(k, call) for k, call in enumerate(c.calls)]
        reasoning = None if c.calls else "".join(REASONING)
        # Its tool parsers answer `content: None` when no text came before the calls.
        text = "".join(c.pieces) or (None if c.calls else "")
        message = {"role": "assistant", "reasoning_content": reasoning, "content": text}
        return {**message, "tool_calls": calls}

    def completion_object(self, meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
        return {**super().completion_object(meta, choices, usage), "kv_transfer_params": None}

    def foldable(self, whole: JSON) -> JSON:
        # An answer without tool calls says `tool_calls: []`; its stream never mentions them.
        choices = []
        for c in whole["choices"]:
            message = c.get("message")
            if message is not None and message.get("tool_calls") == []:
                c = {**c, "message": {k: v for k, v in message.items() if k != "tool_calls"}}
            choices.append(c)
        return {**whole, "choices": choices}
