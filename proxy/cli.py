"""The `llm-sidecar` command: serve, check, fake-upstream."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from proxy import __version__
from proxy.policy import PolicyError, load_policy


def version() -> str:
    """The installed distribution's version; the package's own when run from a checkout."""
    try:
        return metadata.version("llm-sidecar")
    except metadata.PackageNotFoundError:
        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--policy",
        help="policy YAML (default: $LLM_SIDECAR_POLICY, else the embedded default policy)",
    )
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    check = sub.add_parser(
        "check",
        help="validate a policy file without serving",
        description="Validate a policy file exactly as `serve` would, without serving: the YAML, "
        "the schema, the cross-references, and every environment variable the policy names "
        "(api_key_env, prepare steps' env, cache.password_env). Prints `ok: FILE (version V)` "
        "and exits 0, or one `error: FILE: PATH: REASON` line per problem and exits 2.",
    )
    check.add_argument(
        "file", metavar="FILE", help="the policy YAML to validate, e.g. policies/default.yaml"
    )
    sub.add_parser(
        "fake-upstream",
        help="run a fake OpenAI-compatible upstream (see `fake-upstream --help` for its knobs)",
        add_help=False,
    )
    return parser


def _report(error: PolicyError) -> None:
    for line in error.lines():
        print(f"error: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["fake-upstream"]:
        from proxy.testing.fake_workers import main as fake_main

        return fake_main(args_list[1:])
    args = _parser().parse_args(args_list)
    if args.command == "check":
        try:
            loaded = load_policy(args.file)
            from proxy.routing import compile_policy
            from proxy.runtime import HookSession

            compile_policy(loaded, HookSession())
        except PolicyError as exc:
            _report(exc)
            return 2
        print(f"ok: {args.file} (version {loaded.version})")
        return 0
    path = args.policy or os.environ.get("LLM_SIDECAR_POLICY") or None
    try:
        loaded = load_policy(path)
    except PolicyError as exc:
        _report(exc)
        return 2
    from proxy.lifecycle import ListenError, serve

    try:
        serve(loaded, args.host, args.port)
    except PolicyError as exc:
        _report(exc)
        return 2
    except ListenError as exc:  # a busy port is the operator's to fix: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
