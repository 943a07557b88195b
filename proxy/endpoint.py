"""What an endpoint is: one frozen `Endpoint` per coalescible API path.

Chosen once at intake (`endpoint_of`) and carried on the request, so no
later stage re-derives from the path whether a call is coalesced, how it is
asked upstream, how an answer converts to the other mode (events folded into
the object, the object re-chunked into events), or what marks it complete.
A new dialect or path shape (Azure deployment paths, say) is a new row in
`_ROWS`, not a new branch elsewhere.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy import jsonbody, rechunk
from proxy.assemble import (
    assemble_chat,
    assemble_completion,
    assemble_response,
    choices_finished,
)

Payloads = Sequence[dict[str, Any]]
# The object a non-stream caller gets, and whether the answer is whole.
Assembler = Callable[[Payloads], tuple[dict[str, Any] | None, bool]]
# A parsed non-stream answer as its stream; None when it is not of the endpoint's shape.
Rechunker = Callable[[Any], rechunk.Rechunked | None]

_USAGE_OPTION = b'"stream_options":{"include_usage":true},'


class EndMarker(enum.Enum):
    """What tells a streamed answer arrived whole rather than cut."""

    DONE = "data: [DONE]"  # chat and text completions
    TERMINAL = "response.completed|incomplete|failed"  # the Responses API


def _choices(fold: Callable[[Payloads], dict[str, Any]]) -> Assembler:
    def assemble(payloads: Payloads) -> tuple[dict[str, Any] | None, bool]:
        return fold(payloads), choices_finished(payloads)

    return assemble


def _response(payloads: Payloads) -> tuple[dict[str, Any] | None, bool]:
    final = assemble_response(payloads)
    return final, final is not None and final.get("status") == "completed"


def _choices_whole(answer: Any) -> bool:
    """A plain answer is whole as a stream would be: every choice has a finish reason."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)
    )


def _response_whole(answer: Any) -> bool:
    return isinstance(answer, dict) and answer.get("status") == "completed"


def _whole(answer: Any) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # for logs and tests: chat, completions, embeddings, responses
    adds_usage: bool  # stream_options.include_usage added to a streamed call
    end: EndMarker  # what "complete" means for a streamed answer
    assemble: Assembler | None  # events -> the non-stream object; None: none is built
    restream: Rechunker | None  # the non-stream object -> its events; None: no stream form
    plain_whole: Callable[[Any], bool]  # a parsed non-stream answer is whole (cacheable)
    max_tokens_field: str | None  # where a clamp sets an absent limit; None: no tokens here
    has_instructions: bool  # a system message goes in `instructions` when there are no messages
    answer_list: str  # the list every answer of this type holds: choices, data, output
    # Fields that make a call change state upstream: never coalesced or cached.
    stateful_fields: tuple[str, ...] = ()

    def well_formed(self, content_type: str, body: bytes | None) -> bool:
        """A plain answer is this endpoint's own: a JSON object holding its list.

        Only such an answer is cached; anything else (text/plain, JSON that
        does not parse, another object) reaches its callers as sent, once.
        """
        media = content_type.partition(";")[0].strip().lower()
        if body is None or not (media == "application/json" or media.endswith("+json")):
            return False
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        return isinstance(answer, dict) and isinstance(answer.get(self.answer_list), list)

    def stateful(self, body: dict[str, Any]) -> bool:
        """A call whose every copy must reach the upstream (a Responses background
        create, or one that adds to a conversation): relayed as sent."""
        return any(body.get(name) not in (None, False) for name in self.stateful_fields)

    def upstream_bytes(self, body: dict[str, Any], raw: bytes, wants_stream: bool) -> bytes:
        """What goes upstream for a caller whose request is `raw` (parsed: `body`).

        The caller's own bytes in the caller's own mode; only a streamed call
        on an endpoint that reports usage also asks for the usage chunk, so
        that readers who asked for it get it whoever leads. Where the caller
        sent no `stream_options`, or sent it as an object or null, the option
        is spliced into the bytes; only what the scanner cannot read (an
        escaped member name, a repeated one) is re-serialised, exactly.
        """
        if not (wants_stream and self.adds_usage):
            return raw
        if "stream_options" not in body:
            # `raw` parsed into a non-empty object (it holds "stream": true), so
            # its first "{" opens it and a member follows.
            at = raw.index(b"{") + 1
            return raw[:at] + _USAGE_OPTION + raw[at:]
        options = body["stream_options"]
        if isinstance(options, dict) and options.get("include_usage") is True:
            return raw
        spliced = jsonbody.with_usage(raw)
        if spliced is not None:
            return spliced
        merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return jsonbody.dumps({**body, "stream_options": merged})


CHAT = Endpoint(
    name="chat",
    adds_usage=True,
    end=EndMarker.DONE,
    assemble=_choices(assemble_chat),
    restream=functools.partial(rechunk.rechunk, rechunk.CHAT_PATH),
    plain_whole=_choices_whole,
    max_tokens_field="max_tokens",
    has_instructions=False,
    answer_list="choices",
)
COMPLETIONS = Endpoint(
    name="completions",
    adds_usage=True,
    end=EndMarker.DONE,
    assemble=_choices(assemble_completion),
    restream=functools.partial(rechunk.rechunk, rechunk.COMPLETIONS_PATH),
    plain_whole=_choices_whole,
    max_tokens_field="max_tokens",
    has_instructions=False,
    answer_list="choices",
)
EMBEDDINGS = Endpoint(
    name="embeddings",
    adds_usage=False,
    end=EndMarker.DONE,
    assemble=None,
    restream=None,
    plain_whole=_whole,
    max_tokens_field=None,
    has_instructions=False,
    answer_list="data",
)
RESPONSES = Endpoint(
    name="responses",
    adds_usage=False,
    end=EndMarker.TERMINAL,
    assemble=_response,
    restream=functools.partial(rechunk.rechunk, rechunk.RESPONSES_PATH),
    plain_whole=_response_whole,
    max_tokens_field="max_output_tokens",
    has_instructions=True,
    answer_list="output",
    # `store` and `previous_response_id` are not here: they read state that
    # never changes, and are part of the key (README, "Stateful Responses calls").
    stateful_fields=("background", "conversation"),
)

# (method, path template, endpoint). A `{name}` segment matches one path
# segment; rows without one are looked up exactly, so the common case costs a
# dict lookup and no regex.
_ROWS: tuple[tuple[str, str, Endpoint], ...] = (
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", COMPLETIONS),
    ("POST", "/v1/embeddings", EMBEDDINGS),
    ("POST", "/v1/responses", RESPONSES),
    # Azure OpenAI: the AzureOpenAI client's paths (the deployment in the
    # path, `?api-version=` in the query, both in the key), its Responses
    # path, and the v1 API's.
    ("POST", "/openai/deployments/{deployment}/chat/completions", CHAT),
    ("POST", "/openai/deployments/{deployment}/completions", COMPLETIONS),
    ("POST", "/openai/deployments/{deployment}/embeddings", EMBEDDINGS),
    ("POST", "/openai/deployments/{deployment}/responses", RESPONSES),
    ("POST", "/openai/responses", RESPONSES),
    ("POST", "/openai/v1/chat/completions", CHAT),
    ("POST", "/openai/v1/completions", COMPLETIONS),
    ("POST", "/openai/v1/embeddings", EMBEDDINGS),
    ("POST", "/openai/v1/responses", RESPONSES),
)

_SEGMENT = re.compile(r"\{[a-z_]+\}")


def _compile(
    rows: Sequence[tuple[str, str, Endpoint]],
) -> tuple[Mapping[tuple[str, str], Endpoint], tuple[tuple[str, re.Pattern[str], Endpoint], ...]]:
    exact: dict[tuple[str, str], Endpoint] = {}
    templated: list[tuple[str, re.Pattern[str], Endpoint]] = []
    for method, template, endpoint in rows:
        if _SEGMENT.search(template) is None:
            exact[(method, template)] = endpoint
            continue
        parts = _SEGMENT.split(template)
        pattern = "[^/]+".join(re.escape(part) for part in parts)
        templated.append((method, re.compile(pattern), endpoint))
    return exact, tuple(templated)


_EXACT, _TEMPLATED = _compile(_ROWS)


def endpoint_of(method: str, path: str) -> Endpoint | None:
    """The coalescible endpoint at `method path`; None: relay it as is."""
    endpoint = _EXACT.get((method, path))
    if endpoint is not None or not _TEMPLATED:
        return endpoint
    for row_method, pattern, candidate in _TEMPLATED:
        if row_method == method and pattern.fullmatch(path) is not None:
            return candidate
    return None
