"""Policy loading: every broken file names the file, the path inside it and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.policy import PolicyError, Upstream, load_policy, parse_policy
from proxy.units import parse_duration, parse_size

BROKEN = sorted((Path(__file__).parent / "policies" / "broken").glob("*.yaml"))
REPO = Path(__file__).resolve().parents[1]


def _expected(path: Path) -> list[str]:
    """The fixture's `# expect:` lines: each a prefix of one error line, in order."""
    lines = path.read_text().splitlines()
    expected = [line.removeprefix("# expect: ") for line in lines if line.startswith("# expect: ")]
    assert expected and lines[0].startswith("# expect: ")
    return expected


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_policy_names_file_path_and_reason(path: Path) -> None:
    """Every problem in the file, one `error: FILE: PATH: REASON` line each, nothing else."""
    result = _run("check", str(path))
    assert result.returncode == 2, result.stdout
    lines = result.stderr.splitlines()
    expected = _expected(path)
    assert len(lines) == len(expected), result.stderr
    for line, prefix in zip(lines, expected, strict=True):
        assert line.startswith(f"error: {path}: {prefix}"), result.stderr


@pytest.mark.parametrize(
    "name", ["missing_password_env", "missing_key_env", "bad_redis_url", "every_variable_at_once"]
)
def test_serve_refuses_exactly_what_check_refuses(name: str) -> None:
    """`check` and `serve` share one validation path: the same file fails both, alike."""
    path = Path(__file__).parent / "policies" / "broken" / f"{name}.yaml"
    checked = _run("check", str(path))
    served = _run("serve", "--policy", str(path), "--port", "0")
    assert checked.returncode == served.returncode == 2
    assert served.stderr == checked.stderr


def test_broken_fixture_suite_is_not_empty() -> None:
    assert len(BROKEN) >= 15


@pytest.mark.parametrize(
    "path",
    [REPO / "policies" / "default.yaml", *sorted((REPO / "policies" / "examples").glob("*.yaml"))],
)
def test_shipped_policies_are_valid(path: Path) -> None:
    loaded = load_policy(path)
    assert loaded.policy.routes[-1].match.path == "/v1/*"


def test_embedded_default_is_the_shipped_default() -> None:
    assert load_policy(None).policy == load_policy(REPO / "policies" / "default.yaml").policy


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "absent.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'absent.yaml'}: (file): ")


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), (3, 3.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("10MiB", 10 * 2**20), ("64KiB", 65536), ("1GiB", 2**30), (512, 512)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def _problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return [f"{path}: {reason}" for path, reason in info.value.problems]


def test_a_scalar_for_a_list_shows_the_list_form() -> None:
    assert _problems(
        'upstreams: {a: {base_url: "http://x/v1"}}\n'
        'routes: [{match: {path: "/v1/*"}, upstream: a, ignore_fields: user}]\n'
    ) == ["routes[0].ignore_fields: expected a list of body field names, e.g. [user]"]


def test_a_list_whose_only_item_failed_reports_the_item_not_its_length() -> None:
    # pydantic adds "should have at least 1 item" after dropping the bad item.
    assert _problems('upstreams: {a: {base_url: "http://x/v1"}}\nroutes: [{upstream: a}]\n') == [
        "routes[0].match: required, but missing"
    ]


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    assert _problems(
        'upstreams: {a: {base_url: "http://x/v1", zzz: 1}}\n'
        'routes: [{match: {path: "/v1/*"}, upstream: a}]\n'
    ) == [f"upstreams.a.zzz: unknown key 'zzz'; valid: {', '.join(Upstream.model_fields)}"]
    assert list(Upstream.model_fields)[:3] == ["base_url", "api_key_env", "connect_timeout"]


@pytest.mark.parametrize(
    ("text", "value"), [("256MB", 256_000_000), ("512B", 512), ("1.5KiB", 1536), ("0", 0)]
)
def test_every_documented_size_form(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "seconds"), [("60", 60.0), (60, 60.0), ("1.5s", 1.5)])
def test_a_bare_duration_is_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
