"""Azure OpenAI's wire quirks: content filtering, and `api-version` required."""

from __future__ import annotations

from proxy.testing.dialects.openai import Dialect
from proxy.testing.fake_answers import JSON, Choice

_SAFE = {"filtered": False, "severity": "safe"}
_FILTERS = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
_PROMPT = [{"prompt_index": 0, "content_filter_results": _FILTERS}]


class Azure(Dialect):
    """Azure OpenAI: content filtering and `api-version` (required; the server checks it).

    The stream opens with a chunk that has empty `id`, `model` and `object`,
    `created: 0`, no choices and the prompt's `prompt_filter_results`; every
    choice then carries `content_filter_results`, empty on the role and last
    chunks. Observed: langchain-ai/langchain#18977, microsoft/autogen#6465,
    AbanteAI/mentat#429, langchain4j#2385; Azure's "Content filtering" docs.
    """

    name = "azure"

    def head(self, meta: JSON, kind: str) -> JSON:
        return {k: v for k, v in super().head(meta, kind).items() if k != "service_tier"}

    def prelude(self, meta: JSON) -> list[JSON]:
        blank = {"id": "", "object": "", "created": 0, "model": "", "system_fingerprint": None}
        return [{**blank, "choices": [], "prompt_filter_results": _PROMPT}]

    def part(self, index: int, delta: JSON, logprobs: JSON | None = None) -> JSON:
        filters = _FILTERS if delta.get("content") else {}
        return {**super().part(index, delta, logprobs), "content_filter_results": filters}

    def finish_part(self, c: Choice) -> JSON:
        return {**super().finish_part(c), "content_filter_results": {}}

    def chat_choice(self, c: Choice) -> JSON:
        return {**super().chat_choice(c), "content_filter_results": {} if c.calls else _FILTERS}

    def text_part(self, c: Choice, piece: str) -> JSON:
        return {**super().text_part(c, piece), "content_filter_results": _FILTERS}

    def text_end(self, c: Choice) -> JSON:
        return {**super().text_end(c), "content_filter_results": {}}

    def text_choice(self, c: Choice) -> JSON:
        return {**super().text_choice(c), "content_filter_results": _FILTERS}

    def chat_object(self, meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
        return {**super().chat_object(meta, choices, usage), "prompt_filter_results": _PROMPT}

    def completion_object(self, meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
        whole = super().completion_object(meta, choices, usage)
        return {**whole, "prompt_filter_results": _PROMPT}
