"""Prepare steps: what a route does to a request before it goes upstream.

Each step is a `PrepareStep` (a Protocol): it takes the request as it stands
and returns the request to send. Steps run in the leader stage only, once
per upstream call, never for followers or cache hits.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp
import orjson
from multidict import CIMultiDict

from proxy import jsonbody
from proxy.endpoint import Endpoint
from proxy.errors import HookRejected, UpstreamUnavailable
from proxy.headers import CREDENTIAL_HEADERS
from proxy.policy import (
    ClampMaxTokens,
    HttpHook,
    InjectKey,
    ModelAlias,
    PrepareStepConfig,
    SetHeaders,
    SystemMessage,
)


class Secret:
    """A credential: usable by the code that needs it, invisible in reprs and logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Outgoing:
    """The request as it will be sent upstream."""

    path: str
    endpoint: Endpoint
    body: dict[str, Any]
    headers: CIMultiDict[str]


class HookClient(Protocol):
    def session(self) -> aiohttp.ClientSession: ...


class PrepareStep(Protocol):
    async def __call__(self, request: Outgoing) -> Outgoing: ...


@dataclass(frozen=True, slots=True)
class SetHeadersStep:
    set: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]

    async def __call__(self, request: Outgoing) -> Outgoing:
        headers = request.headers.copy()
        for name in self.remove:
            headers.popall(name, None)
        for name, value in self.set:
            headers[name] = value
        return replace(request, headers=headers)


@dataclass(frozen=True, slots=True)
class InjectKeyStep:
    header: str
    value: Secret

    async def __call__(self, request: Outgoing) -> Outgoing:
        headers = request.headers.copy()
        for name in CREDENTIAL_HEADERS:
            headers.popall(name, None)
        headers[self.header] = self.value.reveal()
        return replace(request, headers=headers)


@dataclass(frozen=True, slots=True)
class ModelAliasStep:
    aliases: tuple[tuple[str, str], ...]

    async def __call__(self, request: Outgoing) -> Outgoing:
        model = request.body.get("model")
        for alias, target in self.aliases:
            if model == alias:
                return replace(request, body={**request.body, "model": target})
        return request


_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass(frozen=True, slots=True)
class ClampMaxTokensStep:
    max: int

    async def __call__(self, request: Outgoing) -> Outgoing:
        field = request.endpoint.max_tokens_field
        if field is None:
            return request
        present = [name for name in _TOKEN_FIELDS if isinstance(request.body.get(name), int)]
        if present and all(request.body[name] <= self.max for name in present):
            return request  # unchanged: the caller's own bytes still go upstream
        body = dict(request.body)
        for name in present:
            body[name] = min(body[name], self.max)
        if not present:
            # An absent limit means "as long as the model likes": the clamp's job.
            body[field] = self.max
        return replace(request, body=body)


@dataclass(frozen=True, slots=True)
class SystemMessageStep:
    content: str

    async def __call__(self, request: Outgoing) -> Outgoing:
        body = dict(request.body)
        if isinstance(body.get("messages"), list):
            body["messages"] = [{"role": "system", "content": self.content}, *body["messages"]]
        elif request.endpoint.has_instructions:
            existing = body.get("instructions")
            body["instructions"] = f"{self.content}\n\n{existing}" if existing else self.content
        else:
            return request
        return replace(request, body=body)


@dataclass(frozen=True, slots=True)
class HttpHookStep:
    url: str
    timeout: float
    client: HookClient
    max_bytes: int  # the hook's answer becomes a request body: the same bound

    async def __call__(self, request: Outgoing) -> Outgoing:
        try:
            async with asyncio.timeout(self.timeout):
                async with self.client.session().post(
                    self.url,
                    data=jsonbody.dumps(request.body),
                    headers={"Content-Type": "application/json"},
                    # Only the configured hook host is ever contacted.
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    # Read at most one byte past the bound: a huge answer costs nothing more.
                    payload = await response.content.read(self.max_bytes + 1)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(
                f"llm-sidecar: the prepare hook did not answer ({type(exc).__name__})"
            ) from exc
        if status >= 400:
            raise HookRejected(_hook_message(payload, status), status)
        if status >= 300:
            raise UpstreamUnavailable(f"llm-sidecar: the prepare hook redirected ({status})")
        if len(payload) > self.max_bytes:
            raise UpstreamUnavailable(
                f"llm-sidecar: the prepare hook's answer is over the {self.max_bytes}-byte limit"
            )
        try:
            # Exact both ways (an integer wider than 64 bits stays one), and
            # re-encoded once here since orjson reads deeper than it writes.
            body = jsonbody.loads(payload)
            jsonbody.dumps(body)
        except (ValueError, TypeError, RecursionError) as exc:
            raise UpstreamUnavailable(
                "llm-sidecar: the prepare hook returned invalid or too deeply nested JSON"
            ) from exc
        if not isinstance(body, dict):
            raise UpstreamUnavailable("llm-sidecar: the prepare hook must return a JSON object")
        return replace(request, body=body)


def _hook_message(payload: bytes, status: int) -> str:
    try:
        data = orjson.loads(payload)
        message = data["error"]["message"]
        if isinstance(message, str):
            return message
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return f"rejected by the prepare hook (status {status})"


class MissingSecret(Exception):
    def __init__(self, env: str) -> None:
        super().__init__(f"environment variable {env} is not set")
        self.env = env


def build_step(
    config: PrepareStepConfig, environ: dict[str, str], client: HookClient, max_bytes: int
) -> PrepareStep:
    if isinstance(config, SetHeaders):
        return SetHeadersStep(tuple(config.headers.items()), config.remove)
    if isinstance(config, InjectKey):
        value = environ.get(config.env)
        if not value:
            raise MissingSecret(config.env)
        prefix = f"{config.scheme} " if config.scheme else ""
        return InjectKeyStep(config.header, Secret(prefix + value))
    if isinstance(config, ModelAlias):
        return ModelAliasStep(tuple(config.aliases.items()))
    if isinstance(config, ClampMaxTokens):
        return ClampMaxTokensStep(config.max)
    if isinstance(config, SystemMessage):
        return SystemMessageStep(config.content)
    if isinstance(config, HttpHook):
        return HttpHookStep(config.url, config.timeout, client, max_bytes)
    raise AssertionError(f"unhandled prepare step {config!r}")


async def run_steps(steps: tuple[PrepareStep, ...], request: Outgoing) -> Outgoing:
    for step in steps:
        request = await step(request)
    return request
