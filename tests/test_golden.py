"""A golden corpus of streams in the shapes real servers were seen to send.

Each file in tests/golden/ holds one stream as a real server framed it (its
source, an issue or a server's code, is named in the file), which chunks of
it are usage-only, and the object a `stream: false` caller must get from it.
Both directions are pinned: the stream folds into the object, and the
object re-chunked folds back into itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from proxy.assemble import assemble_chat, assemble_response, is_usage_chunk
from proxy.rechunk import chat_chunks, response_events

CORPUS = sorted((Path(__file__).parent / "golden").glob("*.json"))


def _load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text())
    return case


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_the_stream_folds_into_its_object(path: Path) -> None:
    case = _load(path)
    fold = assemble_chat if case["endpoint"] == "chat" else assemble_response
    assert fold(case["stream"]) == case["expected"]
    if case["endpoint"] == "chat":
        ChatCompletion.model_validate(case["expected"])


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_the_usage_chunks_are_the_ones_that_only_carry_usage(path: Path) -> None:
    case = _load(path)
    usage = [i for i, chunk in enumerate(case["stream"]) if is_usage_chunk(chunk)]
    assert usage == case["usage_chunks"]


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_the_object_rechunked_folds_back_into_itself(path: Path) -> None:
    case = _load(path)
    whole = case["expected"]
    if case["endpoint"] == "chat":
        chunks = chat_chunks(whole)
        assert chunks is not None
        # As the SDK reads it: the re-chunked stream says `logprobs: null`, as
        # OpenAI's does, where llama.cpp's or Ollama's object says nothing.
        assert _without_nulls(assemble_chat(chunks)) == _without_nulls(whole)
    else:
        assert assemble_response(response_events(whole)) == whole


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def test_the_corpus_covers_every_dialect() -> None:
    names = " ".join(p.stem for p in CORPUS)
    for dialect in ("openai", "azure", "vllm", "llamacpp", "ollama", "litellm", "responses"):
        assert dialect in names
