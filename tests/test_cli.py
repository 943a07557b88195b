"""The command line a newcomer meets first: --version, and help that documents every knob."""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy import __version__
from proxy.cli import main, version
from proxy.testing.fake_answers import FakeSettings
from proxy.testing.fake_upstream import header_knobs
from proxy.testing.fake_workers import _parser as fake_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _exit_output(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__ == version()
    assert _exit_output(capsys, ["--version"]) == f"llm-sidecar {__version__}\n"


def test_check_help_describes_file(capsys: pytest.CaptureFixture[str]) -> None:
    out = _exit_output(capsys, ["check", "--help"])
    assert "usage: llm-sidecar check [-h] FILE" in out
    assert "FILE        the policy YAML to validate" in out
    assert "cache.password_env" in out  # what it checks beyond the schema


def test_check_ok_names_file_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "policies" / "default.yaml"
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {path} (version ")


def test_fake_upstream_help_documents_every_setting_and_header(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = fake_parser()
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    # Every FakeSettings knob can be set from the command line, and says what it does.
    assert {f.name for f in dataclasses.fields(FakeSettings)} <= set(flags)
    assert all(action.help for action in flags.values())
    out = _exit_output(capsys, ["fake-upstream", "--help"])
    for header in header_knobs():
        assert header in out
    for endpoint in ("/_fake/stats", "/_fake/reset", "/_fake/settings"):
        assert endpoint in out


def test_readme_documents_every_fake_upstream_knob() -> None:
    for action in fake_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in README, flag
    for header in header_knobs():
        assert f"`{header}`" in README, header


def test_every_knob_header_the_readme_names_is_honoured() -> None:
    named = set(re.findall(r"`(x-fake-[a-z-]+)`", README))
    assert named and named <= set(header_knobs()), named - set(header_knobs())


@pytest.mark.parametrize("command", ["serve", "fake-upstream"])
def test_a_busy_port_is_one_plain_error_line_and_exit_2(command: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", command, "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: address already in use\n"
