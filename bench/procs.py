"""Server subprocesses: start on a free loopback port, wait until ready, always kill.

Every server runs in its own session (process group), pinned with `taskset`
to the server cores, so a Ctrl-C at the terminal reaches only the bench
process, which then kills each group it started, by its id. A registry of
live processes is emptied at exit too, whatever ended the run.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

_LIVE: dict[int, subprocess.Popen[bytes]] = {}  # pid -> process; only this module touches it
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Placement:
    """Which cores the load generators and the servers run on."""

    client: frozenset[int]
    servers: frozenset[int]

    @property
    def pinned(self) -> bool:
        return bool(self.client) and bool(self.servers)

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (one core): clients and servers share it"
        return (
            f"load generators (wrk, the asyncio client) on core(s) {_cores(self.client)}; "
            f"every server (fake upstream, hop under test, Redis) on core(s) "
            f"{_cores(self.servers)}"
        )


def _cores(cores: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def choose_placement() -> Placement:
    """Core 0 for the clients, the next core for the servers; nothing when only one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or shutil.which("taskset") is None:
        return Placement(frozenset(), frozenset())
    return Placement(frozenset({cores[0]}), frozenset({cores[1]}))


def raise_nofile(want: int = 16384) -> int:
    """Raise the open-file limit (inherited by every subprocess); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """One running server process."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process so far (threads included)."""
        return cpu_seconds(self.pid)

    def peak_rss_mib(self) -> float:
        """VmHWM: the peak resident set of the process so far."""
        return status_kib(self.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return status_kib(self.pid, "VmRSS") / 1024


def cpu_seconds(pid: int) -> float:
    """On-CPU time of every thread of `pid`, to the nanosecond where the kernel says
    (schedstat), else in clock ticks (10 ms: too coarse for a few thousand requests)."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command: state is field 3; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def status_kib(pid: int, name: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    log_dir: Path,
    cores: frozenset[int],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Server:
    """Start `argv` pinned to `cores`, its output in `log_dir/name.log`."""
    prefix = ["taskset", "-c", _cores(cores)] if cores else []
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own group: killed as one, spared the terminal's ^C
        )
    _LIVE[proc.pid] = proc
    return Server(name, proc, port, log_path)


def kill(server: Server, grace: float = 2.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace` seconds."""
    proc = server.proc
    _LIVE.pop(proc.pid, None)
    _kill_group(proc, grace)


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # The group may hold children (uvicorn workers, spawned processes) past the leader.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@atexit.register
def kill_all() -> None:
    """Kill every server still registered (the last line of defence)."""
    while _LIVE:
        _, proc = _LIVE.popitem()
        _kill_group(proc, 0.5)


async def wait_ready(
    server: Server,
    probe: Callable[[], Awaitable[bool]],
    timeout: float = 20.0,
) -> None:
    """Poll `probe` until it says yes; fail early when the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited during start-up:\n{server.log_tail()}")
        with contextlib.suppress(OSError, aiohttp.ClientError, asyncio.TimeoutError):
            if await probe():
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s:\n{server.log_tail()}")


def http_probe(session: aiohttp.ClientSession, url: str) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            await response.read()
            return response.status < 500

    return probe


def tcp_probe(port: int, send: bytes, expect: bytes) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(send)
                await writer.drain()
                return (await reader.read(64)).startswith(expect)
            finally:
                writer.close()

    return probe
