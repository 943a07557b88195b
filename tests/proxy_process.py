"""The proxy as a real subprocess, for tests that send it signals.

`run_proxy` writes the policy to a file, starts `python -m proxy serve` on a
free port with its output (JSON log lines) going to a file, and always
reaps the process. Helpers read `/metrics` with prometheus-client's own
parser and `/status` as JSON. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import base_policy, merge

REPO = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def policy_for(fake: FakeUpstream, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return merge(base_policy(f"http://127.0.0.1:{fake.port}/v1"), extra or {})


def write_policy(path: Path, policy: dict[str, Any] | str) -> None:
    """Write a whole new file (a new inode, as an editor or a ConfigMap would)."""
    text = policy if isinstance(policy, str) else yaml.safe_dump(policy)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    port: int
    policy_path: Path
    log_path: Path
    session: aiohttp.ClientSession
    admin_port: int | None = None  # the policy's admin listener, when it has one

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        """Where /healthz, /readyz, /metrics and /status answer."""
        return self.url if self.admin_port is None else f"http://127.0.0.1:{self.admin_port}"

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"the proxy exited: {self.log_path.read_text()}")
                try:
                    async with self.session.get(f"{self.ops_url}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.02)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET an operator endpoint."""
        async with self.session.get(f"{self.ops_url}{path}") as response:
            return response.status, await response.read()

    async def metrics(self) -> Samples:
        status, body = await self.get("/metrics")
        assert status == 200
        return parse_metrics(body.decode())

    async def status(self) -> dict[str, Any]:
        status, body = await self.get("/status")
        assert status == 200
        result: dict[str, Any] = orjson.loads(body)
        return result

    async def until_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                current = await self.status()
                if predicate(current):
                    return current
                await asyncio.sleep(0.02)

    async def until_metrics(
        self, predicate: Callable[[Samples], bool], timeout: float = 10.0
    ) -> Samples:
        async with asyncio.timeout(timeout):
            while True:
                current = await self.metrics()
                if predicate(current):
                    return current
                await asyncio.sleep(0.02)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """Every output line, parsed: each must be one JSON object."""
        lines = []
        for raw in self.log_text().splitlines():
            if raw.strip():
                line = orjson.loads(raw)
                assert isinstance(line, dict), raw
                lines.append(line)
        return lines

    def events(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("msg") == msg]


@asynccontextmanager
async def run_proxy(
    tmp_path: Path,
    policy: dict[str, Any],
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ProxyProcess]:
    policy_path = tmp_path / "policy.yaml"
    write_policy(policy_path, policy)
    log_path = tmp_path / "proxy.log"
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
    environ.update(env or {})
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--policy",
            str(policy_path),
            "--port",
            str(port),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=environ,
            cwd=REPO,
        )
    try:
        admin = policy.get("admin")
        admin_port = admin.get("port") if isinstance(admin, dict) else None
        async with aiohttp.ClientSession() as session:
            yield ProxyProcess(proc, port, policy_path, log_path, session, admin_port)
    finally:
        if proc.returncode is None:
            proc.kill()
        async with asyncio.timeout(10):
            await proc.wait()
