"""Policy for targets, strategies and retries: what is valid; errors name file, path, reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.policy import PolicyError, load_policy, parse_policy
from proxy.routing import compile_policy
from proxy.runtime import HookSession

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
            "routes[0].retry.on_status",
            "400 is never retried",
        ),
        (
            {"upstream": "a", "retry": {"on_status": [302]}},
            {},
            "routes[0].retry.on_status",
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
