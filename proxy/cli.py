"""The `llm-sidecar` command: serve, check, fake-upstream."""

from __future__ import annotations

import argparse
import os
import sys

from proxy.policy import PolicyError, load_policy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-sidecar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--policy",
        help="policy YAML (default: $LLM_SIDECAR_POLICY, else the embedded default policy)",
    )
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    check = sub.add_parser("check", help="validate a policy file without serving")
    check.add_argument("file")
    sub.add_parser("fake-upstream", help="run the fake OpenAI-compatible upstream", add_help=False)
    return parser


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
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"ok: {args.file} (version {loaded.version})")
        return 0
    path = args.policy or os.environ.get("LLM_SIDECAR_POLICY") or None
    try:
        loaded = load_policy(path)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from proxy.lifecycle import serve

    try:
        serve(loaded, args.host, args.port)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
