"""The proxy's one small exception tree and its OpenAI-style error bodies.

Every error the proxy itself answers is one of these; the HTTP status, the
OpenAI `type` and `code`, and any `Retry-After` live here and nowhere else.
"""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    """An error the proxy answers itself, as OpenAI-style JSON."""

    status = 500
    type = "server_error"
    code: str | None = None
    retry_after: float | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        # Whichever path failed (lead, follow, relay), the answer is the proxy's own.
        headers = {"Content-Type": "application/json", "x-llm-sidecar": "error"}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return headers

    def sse_event(self) -> bytes:
        """The same error as one SSE event: the SDK raises on an `error` key."""
        return b"data: " + self.body() + b"\n\n"


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BadPath(BadRequest):
    """A path that is malformed or leaves its prefix: refused, never forwarded."""

    code = "invalid_path"


class RequestTimeout(ProxyError):
    """The caller stopped sending its body; the SDKs retry a 408."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(ProxyError):
    """A stage's queue is at its bound: shed load, and tell the SDK when to retry."""

    status = 429
    type = "rate_limit_error"
    code = "proxy_queue_full"

    def __init__(self, stage: str, retry_after: float) -> None:
        super().__init__(f"llm-sidecar: the {stage} stage queue is full; retry later")
        self.retry_after = retry_after


class QueueTimeout(ProxyError):
    status = 503
    type = "server_error"
    code = "proxy_queue_timeout"

    def __init__(self, stage: str, retry_after: float) -> None:
        super().__init__(f"llm-sidecar: timed out waiting for the {stage} stage")
        self.retry_after = retry_after


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "server_error"
    code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamBroken(ProxyError):
    """The upstream stream ended early or went idle: ends a stream with an error event."""

    status = 502
    type = "server_error"
    code = "upstream_stream_error"


class UpstreamIdle(UpstreamBroken):
    """The upstream sent nothing for longer than its `idle_timeout`."""


class UpstreamTooLarge(UpstreamBroken):
    """The upstream's response passed `max_response_bytes`."""

    code = "upstream_response_too_large"


class UpstreamEventTooLarge(UpstreamBroken):
    """One event of the upstream's stream passed `max_event_bytes`."""

    code = "upstream_event_too_large"


class UpstreamTooLong(UpstreamBroken):
    """The upstream's response was still running after `max_duration`."""

    code = "upstream_response_too_long"


class HookRejected(ProxyError):
    """A prepare hook answered with an error status; that status is ours too."""

    type = "invalid_request_error"
    code = "rejected_by_hook"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ShuttingDown(ProxyError):
    status = 503
    type = "server_error"
    code = "proxy_shutting_down"
    retry_after = 1.0
