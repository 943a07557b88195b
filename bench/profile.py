"""Profile llm-sidecar (or the bare relay) under scenario 1's load with py-spy.

Usage: python -m bench.profile [--seconds 10] [--connections 16] [--hop llm-sidecar|bare-relay]
[--cache-hits | --stream] [--redis] [--shipped]. py-spy comes from /tmp/bench-tools-venv
(pip install py-spy there; never into the project). It samples the hop without pausing it
(--nonblocking) while wrk drives `distinct.lua` (every request a miss) or,
with --cache-hits, `fixed.lua`. The collapsed stacks are kept in
bench/results/raw/ and summarised: the functions with the most samples on
top of the stack (self) and anywhere on it (inclusive).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import secrets
import sys
from pathlib import Path

import uvloop

from bench.procs import choose_placement, kill_all, raise_nofile
from bench.servers import TOOLS_VENV, Lab, shipped_policy, sidecar_policy
from bench.sse_client import chat_body, post_json, session
from bench.wrk import run_wrk

PY_SPY = TOOLS_VENV / "bin" / "py-spy"
RAW = Path(__file__).resolve().parent / "results" / "raw"


def summarise(collapsed: str, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "self (top of stack):"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in own.most_common(top)]
    lines += ["", "inclusive (anywhere on the stack):"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"; line numbers vary.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"


async def _main(args: argparse.Namespace) -> int:
    placement = choose_placement()
    if placement.pinned:
        os.sched_setaffinity(0, placement.client)
    raise_nofile()
    if not PY_SPY.exists():
        print(f"py-spy not found at {PY_SPY}: pip install py-spy into {TOOLS_VENV}")
        return 2
    RAW.mkdir(parents=True, exist_ok=True)
    async with Lab(placement, RAW / "logs") as lab:
        fake = await lab.fake()
        if args.hop == "bare-relay":
            hop = await lab.bare_relay(fake)
        elif args.redis:
            redis = await lab.redis()
            hop = await lab.sidecar(
                sidecar_policy(fake.port, backend="redis", redis_port=redis.port)
            )
        elif args.shipped:
            hop = await lab.sidecar(shipped_policy(fake.port))
        else:
            hop = await lab.sidecar(sidecar_policy(fake.port))
        nonce = secrets.token_hex(4)
        prompt = f"profile {nonce}"
        async with session() as client:
            for index in range(200):
                body = chat_body(
                    prompt if args.cache_hits else f"warm {nonce} {index}", stream=False
                )
                headers = {"Content-Type": "application/json"}
                await post_json(client, f"{hop.url}/v1/chat/completions", body, headers)
        kind = "-hits" if args.cache_hits else "-stream" if args.stream else ""
        policy = "-redis" if args.redis else "-shipped" if args.shipped else ""
        label = f"{args.hop}{policy}{kind}-c{args.connections}"
        out = RAW / f"profile-{label}.txt"
        argv = [str(PY_SPY), "record", "--nonblocking", "--rate", "250", "--format", "raw"]
        argv += ["--duration", str(args.seconds), "--pid", str(hop.pid), "--output", str(out)]
        spy = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            await asyncio.sleep(0.5)
            cpu_before = hop.cpu_seconds()
            script = "fixed.lua" if args.cache_hits else "distinct.lua"
            result = await run_wrk(
                hop.url,
                script,
                [prompt if args.cache_hits else nonce, "8", "-", "stream" if args.stream else ""],
                connections=args.connections,
                seconds=args.seconds - 1,
            )
            async with asyncio.timeout(args.seconds + 30):
                _, err = await spy.communicate()
        finally:
            if spy.returncode is None:
                spy.kill()
                await spy.wait()
        cpu_us = (hop.cpu_seconds() - cpu_before) / max(result.requests, 1) * 1e6
        print(
            f"{label}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.3f} ms, "
            f"{cpu_us:.0f} CPU-µs/request under py-spy"
        )
        if not out.exists():
            print(f"py-spy wrote nothing: {err.decode(errors='replace')[-1000:]}")
            return 1
        summary = summarise(out.read_text())
        (RAW / f"profile-{label}-summary.txt").write_text(summary + "\n")
        print(summary)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--hop", choices=("llm-sidecar", "bare-relay"), default="llm-sidecar")
    parser.add_argument("--cache-hits", action="store_true")
    parser.add_argument("--stream", action="store_true", help="misses ask for SSE, not JSON")
    parser.add_argument("--redis", action="store_true", help="llm-sidecar with the Redis cache")
    parser.add_argument(
        "--shipped", action="store_true", help="llm-sidecar on the default policy (access log on)"
    )
    args = parser.parse_args()
    try:
        return uvloop.run(_main(args))
    finally:
        kill_all()


if __name__ == "__main__":
    sys.exit(main())
