"""What an endpoint is: one frozen `Endpoint` per coalescible API path.

Chosen once at intake (`endpoint_of`) and carried on the request, so no
later stage re-derives from the path whether a call is coalesced, how it is
asked upstream, which assembler folds its events back into an object, or
what marks it complete. A new dialect or path shape (Azure deployment paths,
say) is a new row in `_ROWS`, not a new branch elsewhere.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.assemble import (
    RESPONSE_TERMINAL,
    assemble_chat,
    assemble_completion,
    assemble_response,
    choices_finished,
)

Payloads = Sequence[dict[str, Any]]
# The object a non-stream caller gets, and whether the answer is whole.
Assembler = Callable[[Payloads], tuple[dict[str, Any] | None, bool]]


class EndMarker(enum.Enum):
    """What tells a streamed answer arrived whole rather than cut."""

    DONE = "data: [DONE]"  # chat and text completions
    TERMINAL = "response.completed|incomplete|failed"  # the Responses API

    def ends(self, done: bool, payload: dict[str, Any] | None) -> bool:
        if self is EndMarker.DONE:
            return done
        return payload is not None and payload.get("type") in RESPONSE_TERMINAL


def _choices(fold: Callable[[Payloads], dict[str, Any]]) -> Assembler:
    def assemble(payloads: Payloads) -> tuple[dict[str, Any] | None, bool]:
        return fold(payloads), choices_finished(payloads)

    return assemble


def _response(payloads: Payloads) -> tuple[dict[str, Any] | None, bool]:
    final = assemble_response(payloads)
    return final, final is not None and final.get("status") == "completed"


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # for logs and tests: chat, completions, embeddings, responses
    streams: bool  # asked upstream as a stream, whatever the caller asked
    adds_usage: bool  # stream_options.include_usage added to a streamed call
    end: EndMarker  # what "complete" means for a streamed answer
    assemble: Assembler | None  # events -> the non-stream object; None: none is built
    max_tokens_field: str | None  # where a clamp sets an absent limit; None: no tokens here
    has_instructions: bool  # a system message goes in `instructions` when there are no messages

    def upstream_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ask for a stream (with usage) so stream and non-stream callers share one call."""
        if not self.streams:
            return body
        out = {**body, "stream": True}
        if self.adds_usage:
            options = body.get("stream_options")
            out["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        return out


CHAT = Endpoint(
    name="chat",
    streams=True,
    adds_usage=True,
    end=EndMarker.DONE,
    assemble=_choices(assemble_chat),
    max_tokens_field="max_tokens",
    has_instructions=False,
)
COMPLETIONS = Endpoint(
    name="completions",
    streams=True,
    adds_usage=True,
    end=EndMarker.DONE,
    assemble=_choices(assemble_completion),
    max_tokens_field="max_tokens",
    has_instructions=False,
)
EMBEDDINGS = Endpoint(
    name="embeddings",
    streams=False,
    adds_usage=False,
    end=EndMarker.DONE,
    assemble=None,
    max_tokens_field=None,
    has_instructions=False,
)
RESPONSES = Endpoint(
    name="responses",
    streams=True,
    adds_usage=False,
    end=EndMarker.TERMINAL,
    assemble=_response,
    max_tokens_field="max_output_tokens",
    has_instructions=True,
)

# (method, path template, endpoint). A `{name}` segment matches one path
# segment; rows without one are looked up exactly, so the common case costs a
# dict lookup and no regex.
_ROWS: tuple[tuple[str, str, Endpoint], ...] = (
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", COMPLETIONS),
    ("POST", "/v1/embeddings", EMBEDDINGS),
    ("POST", "/v1/responses", RESPONSES),
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
