"""The Dockerfile's promises, checked without a Docker engine.

Static: a multi-stage build on a slim Python 3.11 base, a non-root numeric
user, no compilers in the final image, `llm-sidecar serve` as the exec-form
entrypoint listening on the exposed port, SIGTERM as the stop signal, and a
`.dockerignore` that sends the package (and the file its symlink points at)
but not the venv, git or tests. Live: the HEALTHCHECK command itself, run
against stub servers and against the app started with the image's entrypoint.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
APP_PORT = 8080  # the app's default listen port and the chart's `port`
HEALTH_PATH = "/healthz"


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def _logical_lines(text: str) -> Iterator[str]:
    """Dockerfile lines with comments dropped and `\\` continuations joined."""
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield pending + stripped
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ${ARG} in FROM resolved."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], rest)
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", image, re.I)
            assert match, f"cannot parse FROM {rest!r}"
            stages.append(Stage(base=match[1], name=match[2]))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction (fails for shell form)."""
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"{instruction.keyword} must use the exec (JSON) form"
    assert all(isinstance(item, str) for item in value)
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _healthcheck_command(final: Stage) -> list[str]:
    args = final.last("HEALTHCHECK").args
    options, sep, command = args.partition("CMD ")
    assert sep, "HEALTHCHECK must run a command"
    assert "--interval=" in options and "--timeout=" in options
    return exec_form(Instruction("CMD", command))


def _entrypoint(final: Stage) -> list[str]:
    return exec_form(final.last("ENTRYPOINT"))


def _option(argv: list[str], name: str) -> str:
    """The last value given for `name` (argparse: the last one wins)."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]
    assert values, f"{name} not in {argv}"
    return values[-1]


# ---- static ----------------------------------------------------------------


def test_multi_stage_on_slim_python_311(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", stage.base)
    copies = [c.args for c in final.all("COPY")]
    assert copies == [f"--from={stages[0].name} /opt/venv /opt/venv"], (
        "the final stage takes only the built venv from the build stage"
    )


def test_no_compilers_or_package_installs_in_final_image(final: Stage) -> None:
    runs = " ".join(r.args for r in final.all("RUN"))
    for tool in ("apt-get", "apt ", "apk ", "pip ", "gcc", "g++", "build-essential", "make"):
        assert tool not in runs, f"the final stage runs {tool!r}"


def test_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    user = final.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric UID lets Kubernetes verify runAsNonRoot"
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    # USER comes after every RUN, so nothing after it runs as root.
    keywords = [i.keyword for i in final.instructions]
    assert max(i for i, k in enumerate(keywords) if k == "RUN") < keywords.index("USER")
    # The chart's securityContext names the same user.
    values = yaml.safe_load((ROOT / "helm/llm-sidecar/values.yaml").read_text(encoding="utf-8"))
    assert values["securityContext"]["runAsUser"] == int(uid)


def test_entrypoint_serves_on_the_exposed_port(final: Stage) -> None:
    entrypoint = _entrypoint(final)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert entrypoint[0] in scripts, "the entrypoint is the project's console script"
    assert entrypoint[1] == "serve"
    assert _option(entrypoint, "--host") == "0.0.0.0", "127.0.0.1 is unreachable from outside"
    assert int(_option(entrypoint, "--port")) == APP_PORT
    assert [e.args for e in final.all("EXPOSE")] == [str(APP_PORT)]
    assert "--policy" not in entrypoint, "the policy comes from $LLM_SIDECAR_POLICY or an argument"
    assert exec_form(final.last("CMD")) == []


def test_entrypoint_options_exist_in_the_cli(final: Stage) -> None:
    cli = Path(sys.executable).with_name("llm-sidecar")
    result = subprocess.run(
        [str(cli), *_entrypoint(final)[1:2], "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for option in ("--policy", "--host", "--port"):
        assert option in result.stdout


def test_stop_signal_and_healthcheck_path(final: Stage) -> None:
    assert final.last("STOPSIGNAL").args == "SIGTERM"
    command = " ".join(_healthcheck_command(final))
    assert "curl" not in command and "wget" not in command, "the slim image has neither"
    urls = re.findall(r"https?://[^'\"\s]+", command)
    assert urls == [f"http://127.0.0.1:{APP_PORT}{HEALTH_PATH}"]


def _dockerignore_matcher(text: str) -> list[tuple[re.Pattern[str], bool]]:
    """Docker's rules: patterns in order, last match wins, `!` re-includes,
    and a pattern matching a parent directory covers everything below it."""
    rules: list[tuple[re.Pattern[str], bool]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex), include))
    return rules


def _sent_to_docker(rules: list[tuple[re.Pattern[str], bool]], path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    sent = True
    for regex, include in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            sent = include
    return sent


def _context_copies(stages: list[Stage]) -> list[str]:
    """Sources of COPY instructions that read the build context."""
    sources: list[str] = []
    for stage in stages:
        for copy in stage.all("COPY"):
            words = [w for w in shlex.split(copy.args) if not w.startswith("--")]
            if "--from=" not in copy.args:
                sources.extend(words[:-1])
    return sources


def test_dockerignore_sends_what_copy_needs_and_nothing_else(stages: list[Stage]) -> None:
    rules = _dockerignore_matcher(DOCKERIGNORE.read_text(encoding="utf-8"))
    sources = _context_copies(stages)
    assert "pyproject.toml" in sources and "proxy" in sources
    tracked = subprocess.run(
        ["git", "ls-files", "--", *sources],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert any(path.startswith("proxy/") for path in tracked)
    for path in tracked:
        assert _sent_to_docker(rules, path), f"{path} is copied but .dockerignore drops it"
        # COPY keeps a symlink as a link: its target must be copied to the same place.
        if (ROOT / path).is_symlink():
            target = os.path.relpath((ROOT / path).resolve(), ROOT)
            assert _sent_to_docker(rules, target), f"{path} -> {target}, which is not sent"
            assert any(target == s or target.startswith(s.rstrip("/") + "/") for s in sources), (
                f"{path} -> {target}, which no COPY brings into the image"
            )
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".tools/bin/helm",
        "tests/test_dockerfile.py",
        "helm/llm-sidecar/Chart.yaml",
        "proxy/__pycache__/cli.cpython-311.pyc",
        "policies/examples/redis.yaml",
    ):
        assert not _sent_to_docker(rules, path), f"{path} would be sent to the Docker daemon"


# ---- the HEALTHCHECK command, run ------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_healthcheck(final: Stage, port: int) -> int:
    command = [
        sys.executable if word == "python" else word.replace(f":{APP_PORT}/", f":{port}/")
        for word in _healthcheck_command(final)
    ]
    assert command[0] == sys.executable, "the healthcheck runs the image's python"
    return subprocess.run(command, capture_output=True, timeout=30).returncode


class _Stub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == HEALTH_PATH else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_follows_the_status(final: Stage, status: int, healthy: bool) -> None:
    handler = type("Handler", (_Stub,), {"status": status})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            code = _run_healthcheck(final, server.server_address[1])
        finally:
            server.shutdown()
            thread.join(timeout=10)
    assert (code == 0) is healthy


def test_healthcheck_command_fails_when_nothing_listens(final: Stage) -> None:
    assert _run_healthcheck(final, _free_port()) != 0


def test_app_started_like_the_image_is_healthy_and_stops_on_sigterm(
    final: Stage, tmp_path: Path
) -> None:
    """The entrypoint's argv (plus a later --port, which must win) starts the
    app; the HEALTHCHECK passes against it; the STOPSIGNAL ends it with 0."""
    port = _free_port()
    cli = Path(sys.executable).with_name("llm-sidecar")
    argv = [str(cli), *_entrypoint(final)[1:], "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "LLM_SIDECAR_POLICY"}
    log = tmp_path / "app.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"the app exited: {log.read_text(errors='replace')}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH_PATH}", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the app did not serve /healthz within 20s"
                time.sleep(0.1)
        assert _run_healthcheck(final, port) == 0
        proc.send_signal(getattr(signal, final.last("STOPSIGNAL").args))
        assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
