"""Run `wrk` with one of the Lua scripts in bench/lua and parse its JSON summary line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import orjson

LUA = Path(__file__).resolve().parent / "lua"
MARKER = "BENCH_JSON "


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()[0]
    return first.split(" [")[0].removeprefix("wrk ").strip()


async def run_wrk(
    url: str,
    script: str,
    args: list[str],
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    stop_after: int | None = None,
) -> WrkResult:
    """Closed-loop load: `connections` keep-alive connections for `seconds` seconds.

    `stop_after` (with `counted.lua`) ends the run after that many responses;
    `seconds` is then only the bound.
    """
    argv = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections)]
    argv += ["-d", f"{max(1, round(seconds))}s", "--timeout", "10s"]
    argv += ["-s", str(LUA / script), url, "--", *args]
    env = {**os.environ, "BENCH_STOP_AFTER": str(stop_after)} if stop_after else None
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    try:
        async with asyncio.timeout(seconds + 30):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith(MARKER)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{text[-2000:]}")
    data = orjson.loads(line.removeprefix(MARKER))
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        mean_ms=data["mean"] / 1000,
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        non_2xx=data["status"],
    )
