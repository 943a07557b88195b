"""`python -m bench [--quick] [--only NAME,...]`: run the scenarios, write the report.

A full run writes `bench/results/latest.md` and the PNGs beside it; a
`--quick` run writes into `bench/results/quick/` and a run with `--only`
into `bench/results/raw/only-NAMES/` (both git-ignored), so neither ever
overwrites the committed report. Every server is a subprocess
killed at the end of its scenario, and again at exit whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import time
import traceback
from pathlib import Path

import uvloop

from bench import report
from bench.common import Context, Section
from bench.procs import choose_placement, kill_all, raise_nofile
from bench.scenarios import SCENARIOS

RESULTS = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs (under a minute); the report goes to bench/results/quick/",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated scenarios to run (of: {', '.join(SCENARIOS)})",
    )
    parser.add_argument("--out", type=Path, help="where the report and plots go")
    return parser


async def _main(ctx: Context, names: list[str], argv: list[str]) -> int:
    started = time.monotonic()
    env = report.environment(ctx)
    print(f"bench: {env['mode']}; {env['placement']}", flush=True)
    sections: list[Section] = []
    failures: dict[str, str] = {}
    for name in names:
        print(f"bench: {name} ...", flush=True)
        began = time.monotonic()
        try:
            async with asyncio.timeout(ctx.pick(600, 180)):
                section = await SCENARIOS[name](ctx)
        except (Exception, TimeoutError):  # one scenario failing must not lose the others
            failures[name] = traceback.format_exc()
            print(f"bench: {name} FAILED\n{failures[name]}", file=sys.stderr, flush=True)
            continue
        sections.append(section)
        print(f"bench: {name} done in {time.monotonic() - began:.0f} s", flush=True)
        for line in section.headline:
            print(f"  {line}", flush=True)
        for target in section.targets:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[target.met]
            print(f"  target {verdict}: {target.goal} ({target.value})", flush=True)
    path = report.write(ctx, env, sections, failures, time.monotonic() - started, argv)
    print(f"bench: wrote {path}", flush=True)
    return 1 if failures else 0


def output_dir(out: Path | None, *, quick: bool, only: list[str] | None) -> Path:
    """Where a run's report goes: only a full run of every scenario replaces
    the committed one; a partial or quick run's noisy figures go aside."""
    if out is not None:
        return out
    if only is not None:
        return RESULTS / "raw" / f"only-{'-'.join(only)}"
    if quick:
        return RESULTS / "quick"
    return RESULTS


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(args_list)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
        return 2
    out = output_dir(args.out, quick=args.quick, only=names if args.only else None)
    out.mkdir(parents=True, exist_ok=True)
    placement = choose_placement()
    if placement.pinned:
        os.sched_setaffinity(0, placement.client)  # wrk, inherited, runs there too
    raise_nofile()
    ctx = Context(
        quick=args.quick,
        placement=placement,
        out_dir=out,
        raw_dir=RESULTS / "raw",
        nonce=secrets.token_hex(4),
    )
    # SIGTERM unwinds like ^C does, so every `finally` (and every kill) runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return uvloop.run(_main(ctx, names, args_list))
    except KeyboardInterrupt:
        print("bench: interrupted; servers killed", file=sys.stderr)
        return 130
    finally:
        kill_all()


if __name__ == "__main__":
    raise SystemExit(main())
