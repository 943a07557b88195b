"""The upstream dialects the fake upstream speaks, and SSE framing.

Each dialect renders one plan (`proxy.testing.fake_answers`) as stream chunks
and as the whole non-stream object, for chat, text completions and the
Responses API, the way its real server does; the source of every quirk is in
its class's docstring. Each dialect's stream folds, by the proxy's assembly
rules, into its own whole object, except for the few fields `foldable`
removes: values its stream has no way to say.
"""

from __future__ import annotations

import orjson

from proxy.testing.dialects.azure import Azure
from proxy.testing.dialects.litellm import LiteLLM
from proxy.testing.dialects.llamacpp import LlamaCpp
from proxy.testing.dialects.ollama import Ollama
from proxy.testing.dialects.openai import REASONING, Dialect, NoDone
from proxy.testing.dialects.vllm import VLLM
from proxy.testing.fake_answers import DIALECTS, JSON, LINE_ENDINGS

__all__ = ["DIALECT", "REASONING", "Dialect", "frame"]

DIALECT: dict[str, Dialect] = {
    d.name: d for d in (Dialect(), Azure(), VLLM(), LlamaCpp(), Ollama(), LiteLLM(), NoDone())
}
assert tuple(DIALECT) == DIALECTS, "fake_answers.DIALECTS names every dialect, in order"


def frame(payload: JSON | bytes, ending: str = "lf", typed: bool = False) -> bytes:
    """One SSE event: the JSON (with an `event:` line if typed), or raw data like `[DONE]`."""
    end = LINE_ENDINGS[ending]
    if isinstance(payload, bytes):
        return b"data: " + payload + end + end
    head = b"event: " + str(payload["type"]).encode() + end if typed else b""
    return head + b"data: " + orjson.dumps(payload) + end + end
