"""Policy for targets, strategies and retries: what is valid; errors name file, path, reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.policy import PolicyError, load_policy, parse_policy
from proxy.routing import compile_policy
from proxy.runtime import HookSession
from proxy.units import DURATION_FORMS

REPO = Path(__file__).resolve().parents[1]
FALLBACKS = REPO / "policies" / "examples" / "fallbacks.yaml"


def policy(route: dict[str, Any], **top: Any) -> str:
    data = {
        "upstreams": {
            "a": {"base_url": "http://127.0.0.1:1/v1"},
            "b": {"base_url": "http://127.0.0.1:2/v1"},
        },
        "routes": [{"match": {"path": "/v1/*"}, **route}],
        **top,
    }
    return yaml.safe_dump(data)


def error_of(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    assert info.value.file == "p.yaml"
    return info.value


def test_upstream_stays_the_one_target_shorthand() -> None:
    loaded = parse_policy(policy({"upstream": "a"}), "p.yaml")
    route = loaded.policy.routes[0]
    assert [(t.upstream, t.model, t.weight) for t in route.target_list] == [("a", None, 1.0)]
    snapshot = compile_policy(loaded, HookSession(), {})
    compiled = snapshot.routes[0]
    assert [t.label for t in compiled.targets] == ["a"]
    assert compiled.upstream_name == "a"
    assert compiled.retry.attempts == 1  # no retry block: today's single attempt


def test_targets_compile_in_order_with_the_first_as_the_key_upstream() -> None:
    route = {
        "targets": [{"upstream": "b", "model": "dep-1", "weight": 3}, {"upstream": "a"}],
        "strategy": "balance",
        "retry": {"attempts": 4, "on_status": [429, 503], "max_retry_wait": "2s"},
    }
    snapshot = compile_policy(parse_policy(policy(route), "p.yaml"), HookSession(), {})
    compiled = snapshot.routes[0]
    assert [(t.label, t.weight) for t in compiled.targets] == [("b/dep-1", 3.0), ("a", 1.0)]
    assert compiled.upstream_name == "b"  # the key and relays use the first target
    assert compiled.strategy == "balance"
    assert compiled.retry.attempts == 4
    assert compiled.retry.on_status == frozenset({429, 503})
    assert compiled.retry.max_retry_wait == 2.0


@pytest.mark.parametrize(
    ("route", "top", "path", "reason"),
    [
        (
            {"targets": [{"upstream": "a"}, {"upstream": "nope"}]},
            {},
            "routes[0].targets[1].upstream",
            "unknown upstream 'nope' (defined: a, b)",
        ),
        (
            {"targets": [{"upstream": "a", "weight": 0}]},
            {},
            "routes[0].targets[0].weight",
            "weight must be above 0",
        ),
        (
            {"targets": [{"upstream": "a", "weight": -2}]},
            {},
            "routes[0].targets[0].weight",
            "weight must be above 0",
        ),
        ({"targets": []}, {}, "routes[0].targets", "the target list is empty"),
        (
            {"upstream": "a", "targets": [{"upstream": "b"}]},
            {},
            "routes[0]",
            "name the route's upstream, or its targets list, exactly once",
        ),
        ({}, {}, "routes[0]", "name the route's upstream, or its targets list, exactly once"),
        (
            {"upstream": "a", "retry": {"max_retry_wait": "90s"}},
            {},
            "routes[0].retry.max_retry_wait",
            "90s is above stages.upstream.queue_timeout (60s)",
        ),
        (
            {"upstream": "a", "retry": {"max_retry_wait": "3s"}},
            {"stages": {"upstream": {"max_concurrency": 4, "max_queue": 8, "queue_timeout": "2s"}}},
            "routes[0].retry.max_retry_wait",
            "3s is above stages.upstream.queue_timeout (2s)",
        ),
        (
            {"upstream": "a", "retry": {"on_status": [429, 400]}},
            {},
            "routes[0].retry.on_status[1]",
            "400 is never retried",
        ),
        (
            {"upstream": "a", "retry": {"on_status": [302]}},
            {},
            "routes[0].retry.on_status[0]",
            "302 is not an error status",
        ),
        (
            {"upstream": "a", "strategy": "random"},
            {},
            "routes[0].strategy",
            "Input should be 'fallback' or 'balance'",
        ),
    ],
)
def test_bad_targets_name_file_path_and_reason(
    route: dict[str, Any], top: dict[str, Any], path: str, reason: str
) -> None:
    error = error_of(policy(route, **top))
    assert error.path == path
    assert error.reason.startswith(reason), error.reason


def test_fallbacks_example_validates_and_compiles() -> None:
    loaded = load_policy(FALLBACKS)
    env = {"OPENAI_API_KEY": "sk-test", "AZURE_OPENAI_API_KEY": "az-test"}
    snapshot = compile_policy(loaded, HookSession(), env)
    chat = snapshot.match("POST", "/v1/chat/completions")
    assert chat is not None
    assert len(chat.targets) >= 2
    assert chat.strategy == "fallback"
    assert chat.targets[0].upstream_name == "openai"  # the primary comes first


def test_a_short_upstream_queue_timeout_keeps_a_policy_without_retry_valid() -> None:
    stages = {"upstream": {"max_concurrency": 1, "max_queue": 1, "queue_timeout": "500ms"}}
    loaded = parse_policy(policy({"upstream": "a"}, stages=stages), "p.yaml")
    compiled = compile_policy(loaded, HookSession(), {}).routes[0]
    assert compiled.retry.max_retry_wait == 0.5  # the default follows the timeout down


def test_every_bad_on_status_entry_is_reported() -> None:
    error = error_of(policy({"upstream": "a", "retry": {"on_status": [400, 503, 302, 404]}}))
    assert error.problems == (
        ("routes[0].retry.on_status[0]", "400 is never retried: the request itself is at fault"),
        ("routes[0].retry.on_status[2]", "302 is not an error status (400-599)"),
        ("routes[0].retry.on_status[3]", "404 is never retried: the request itself is at fault"),
    )


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ({"upstreams": {"a": {"first_byte_timeout": 0}}}, "upstreams.a.first_byte_timeout"),
        ({"upstreams": {"a": {"idle_timeout": "0s"}}}, "upstreams.a.idle_timeout"),
        ({"upstreams": {"a": {"connect_timeout": "0ms"}}}, "upstreams.a.connect_timeout"),
        ({"upstreams": {"a": {"max_duration": -1}}}, "upstreams.a.max_duration"),
        ({"upstreams": {"a": {"eject_for": 0}}}, "upstreams.a.eject_for"),
        ({"stream": {"keepalive_interval": 0}}, "stream.keepalive_interval"),
        ({"stream": {"write_timeout": "0s"}}, "stream.write_timeout"),
        ({"cache": {"timeout": 0}}, "cache.timeout"),
        ({"reload": {"interval": "0"}}, "reload.interval"),
    ],
)
def test_a_zero_or_negative_timeout_is_refused_with_the_forms(
    section: dict[str, Any], value: str
) -> None:
    data = yaml.safe_load(policy({"upstream": "a"}))
    for key, changes in section.items():
        if key == "upstreams":
            data["upstreams"]["a"].update(changes["a"])
        else:
            data[key] = changes
    error = error_of(yaml.safe_dump(data))
    assert error.problems == ((value, f"must be above 0; use {DURATION_FORMS}"),)
    assert "250ms, 5s" in error.reason


def test_a_zero_hook_timeout_is_refused() -> None:
    step = {"step": "http_hook", "url": "http://127.0.0.1:1/hook", "timeout": "0s"}
    error = error_of(policy({"upstream": "a", "prepare": [step]}))
    assert error.path == "routes[0].prepare[0].timeout"
    assert error.reason.startswith("must be above 0; use")


def test_zero_stays_valid_where_it_means_off() -> None:
    loaded = parse_policy(
        policy(
            {"upstream": "a", "cache": {"ttl": 0}, "retry": {"backoff": 0, "max_retry_wait": 0}},
            shutdown={"accept_delay": 0, "drain_timeout": 0},
        ),
        "p.yaml",
    )
    assert loaded.policy.shutdown.drain_timeout == 0.0


def test_a_retry_block_on_a_one_target_route_retries_once_by_default() -> None:
    route = {"upstream": "a", "retry": {"backoff": "100ms"}}
    compiled = compile_policy(parse_policy(policy(route), "p.yaml"), HookSession(), {}).routes[0]
    assert compiled.retry.attempts == 2


@pytest.mark.parametrize(
    ("route", "problems"),
    [
        (
            {"targets": [{"upstream": "a"}, {"upstream": "b"}]},
            [("routes[0].targets", "name one target")],
        ),
        ({"upstream": "a", "strategy": "balance"}, [("routes[0].strategy", "`strategy`")]),
        (
            {"upstream": "a", "retry": {"attempts": 3}, "strategy": "fallback"},
            [("routes[0].strategy", "`strategy`"), ("routes[0].retry", "`retry`")],
        ),
    ],
)
def test_a_relayed_route_names_one_upstream_and_no_retry_settings(
    route: dict[str, Any], problems: list[tuple[str, str]]
) -> None:
    error = error_of(policy({**route, "coalesce": False}))
    assert [path for path, _ in error.problems] == [path for path, _ in problems]
    for (_, reason), (_, part) in zip(error.problems, problems, strict=True):
        assert reason.startswith("a relayed route (coalesce: false) goes to one upstream, once")
        assert part in reason


def test_a_relayed_route_with_one_upstream_is_fine() -> None:
    parse_policy(policy({"upstream": "a", "coalesce": False}), "p.yaml")


@pytest.mark.parametrize(
    ("step", "path"),
    [
        ({"step": "inject_key", "env": "OPENAI_API_KEY"}, "routes[0].prepare[0]"),
        (
            {"step": "set_headers", "headers": {"Authorization": "Bearer sk-x"}},
            "routes[0].prepare[0].headers.Authorization",
        ),
        (
            {"step": "set_headers", "headers": {"X-Debug": "1", "api-key": "az"}},
            "routes[0].prepare[0].headers.api-key",
        ),
    ],
)
def test_a_route_level_credential_on_a_route_with_several_upstreams_is_refused(
    step: dict[str, Any], path: str
) -> None:
    route = {"targets": [{"upstream": "a"}, {"upstream": "b"}], "prepare": [step]}
    error = error_of(policy(route))
    assert error.path == path
    assert "would send one credential to every upstream of this route (a, b)" in error.reason
    assert "upstreams.NAME.api_key_env" in error.reason


def test_a_route_level_credential_is_fine_when_every_target_is_one_upstream() -> None:
    targets = [{"upstream": "a"}, {"upstream": "a", "model": "other"}]
    step = {"step": "set_headers", "headers": {"Authorization": "Bearer sk-x"}}
    parse_policy(policy({"targets": targets, "prepare": [step]}), "p.yaml")


def test_ejection_thresholds_are_per_upstream() -> None:
    error = error_of(policy({"upstream": "a", "retry": {"eject_after": 3, "eject_for": "1m"}}))
    assert error.problems == (
        (
            "routes[0].retry.eject_after",
            "unknown key 'eject_after'; ejection is per upstream: set upstreams.NAME.eject_after",
        ),
        (
            "routes[0].retry.eject_for",
            "unknown key 'eject_for'; ejection is per upstream: set upstreams.NAME.eject_for",
        ),
    )
