"""The servers a scenario needs: fake upstream, nginx, bare relay, llm-sidecar, Redis, LiteLLM.

A `Lab` starts each on a free loopback port, pinned to the server cores,
and kills everything it started when its `async with` block ends, however
it ends. Policies and configs are generated into the lab's scratch folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import orjson
import yaml

from bench.procs import (
    Placement,
    Server,
    free_port,
    http_probe,
    kill,
    spawn,
    tcp_probe,
    wait_ready,
)
from proxy.policy import DEFAULT_POLICY_PATH

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TOOLS_VENV = Path("/tmp/bench-tools-venv")
LITELLM = TOOLS_VENV / "bin" / "litellm"
# Portkey's gateway, installed by `ensure_portkey` (full runs only), never into the repo.
PORTKEY_VERSION = "1.15.2"
NODE_TOOLS = Path("/tmp/bench-tools-node")
PORTKEY = NODE_TOOLS / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
# Portkey 1.15.2 under Node 20 answers every stream with 500 ("tryTargetsRecursively error:
# immutable"): it appends its x-portkey-* headers to the upstream's fetch Response, whose
# headers are immutable. The one-line fix: hand on a copy of the response instead.
PORTKEY_STREAM_FIX = ("r?(i=t,c=s)", "r?(i=new Response(t.body,t),c=s)")

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream fake {{
        server 127.0.0.1:{upstream};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def sidecar_policy(
    upstream_port: int,
    *,
    backend: str = "memory",
    redis_port: int | None = None,
    stages: dict[str, Any] | None = None,
    local_tier: bool = True,
) -> dict[str, Any]:
    """The policy every llm-sidecar in the bench runs: coalescing on, chat completions cached."""
    cache: dict[str, Any] = {"backend": backend}
    if backend == "redis":
        cache["url"] = f"redis://127.0.0.1:{redis_port}/0"
        if not local_tier:
            cache["local_tier"] = None
    policy: dict[str, Any] = {
        "upstreams": {"fake": {"base_url": f"http://127.0.0.1:{upstream_port}/v1"}},
        "routes": [
            {"match": {"path": "/v1/chat/completions"}, "upstream": "fake", "cache": {"ttl": "1h"}},
            {"match": {"path": "/v1/*"}, "upstream": "fake"},
        ],
        "cache": cache,
        "log": {"level": "warning", "access": False},
    }
    if stages:
        policy["stages"] = stages
    return policy


def shipped_policy(upstream_port: int, *, quiet: bool = False) -> dict[str, Any]:
    """The default policy as shipped (access log on), its upstream pointed at the fake.

    `quiet` turns the access log off and the level to warning: the variant
    earlier reports measured.
    """
    policy: dict[str, Any] = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    for upstream in policy["upstreams"].values():
        upstream["base_url"] = f"http://127.0.0.1:{upstream_port}/v1"
    if quiet:
        policy["log"] = {"level": "warning", "access": False}
    return policy


def ensure_portkey() -> str | None:
    """Install (once) and patch Portkey's gateway under /tmp; None when ready, else why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    if not PORTKEY.exists():
        NODE_TOOLS.mkdir(parents=True, exist_ok=True)
        argv = ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_TOOLS)]
        argv.append(f"@portkey-ai/gateway@{PORTKEY_VERSION}")
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"npm install failed: {exc}"
        if done.returncode != 0 or not PORTKEY.exists():
            return f"npm install failed: {(done.stderr or done.stdout).strip()[-300:]}"
    source = PORTKEY.read_text(encoding="utf-8")
    broken, fixed = PORTKEY_STREAM_FIX
    if broken in source:
        PORTKEY.write_text(source.replace(broken, fixed, 1), encoding="utf-8")
    elif fixed not in source:
        return "the stream fix no longer applies to this Portkey build"
    return None


class Lab:
    """Servers for one scenario; all of them are killed when the block ends."""

    def __init__(self, placement: Placement, log_root: Path) -> None:
        self.placement = placement
        self._log_root = log_root
        self.tmp = Path(tempfile.mkdtemp(prefix="llm-sidecar-bench-"))
        self.servers: list[Server] = []
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
        )

    async def __aenter__(self) -> Lab:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        while self.servers:
            kill(self.servers.pop())
        await self.session.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stop(self, server: Server) -> None:
        if server in self.servers:
            self.servers.remove(server)
        kill(server)

    def _spawn(self, name: str, argv: list[str], port: int, **kwargs: Any) -> Server:
        self._log_root.mkdir(parents=True, exist_ok=True)
        server = spawn(
            name,
            argv,
            port=port,
            log_dir=self._log_root,
            cores=self.placement.servers,
            **kwargs,
        )
        self.servers.append(server)
        return server

    # -- the servers

    async def fake(self, *args: str) -> Server:
        port = free_port()
        argv = [str(VENV_BIN / "llm-sidecar"), "fake-upstream", "--port", str(port), *args]
        server = self._spawn(f"fake-{port}", argv, port)
        await wait_ready(server, http_probe(self.session, f"{server.url}/_fake/stats"))
        return server

    async def nginx(self, upstream: Server) -> Server:
        port = free_port()
        prefix = self.tmp / f"nginx-{port}"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=prefix, upstream=upstream.port, port=port))
        argv = ["nginx", "-p", str(prefix), "-e", str(prefix / "nginx-error.log"), "-c", str(conf)]
        server = self._spawn(f"nginx-{port}", argv, port)
        await wait_ready(server, http_probe(self.session, f"{server.url}/_fake/stats"))
        return server

    async def bare_relay(self, upstream: Server) -> Server:
        port = free_port()
        argv = [sys.executable, "-m", "bench.bare_relay", upstream.url, str(port)]
        server = self._spawn(f"bare-relay-{port}", argv, port, cwd=REPO)
        await wait_ready(server, http_probe(self.session, f"{server.url}/_fake/stats"))
        return server

    async def redis(self) -> Server:
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.tmp)]
        server = self._spawn(f"redis-{port}", argv, port)
        await wait_ready(server, tcp_probe(port, b"PING\r\n", b"+PONG"))
        return server

    async def sidecar(self, policy: dict[str, Any], name: str = "llm-sidecar") -> Server:
        port = free_port()
        path = self.tmp / f"policy-{port}.yaml"
        path.write_text(yaml.safe_dump(policy))
        argv = [str(VENV_BIN / "llm-sidecar"), "serve", "--policy", str(path)]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
        server = self._spawn(f"{name}-{port}", argv, port, env=env)
        try:
            await wait_ready(server, http_probe(self.session, f"{server.url}/readyz"))
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n(check the policy with: llm-sidecar check {path})") from exc
        return server

    async def litellm(self, upstream: Server) -> Server:
        port = free_port()
        config = {
            "model_list": [
                {
                    "model_name": "fake-model",
                    "litellm_params": {
                        "model": "openai/fake-model",
                        "api_base": f"{upstream.url}/v1",
                        "api_key": "sk-fake",
                    },
                }
            ],
            "litellm_settings": {"telemetry": False},
        }
        path = self.tmp / f"litellm-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [str(LITELLM), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--num_workers", "1"]
        # A throwaway key for this process only: LiteLLM refuses to start without one.
        master_key = f"sk-bench-{secrets.token_hex(24)}"
        env = {
            **os.environ,
            "LITELLM_MASTER_KEY": master_key,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "PATH": f"{LITELLM.parent}:{os.environ.get('PATH', '')}",
        }
        server = self._spawn(f"litellm-{port}", argv, port, env=env)
        server.extra["bearer"] = master_key
        await wait_ready(
            server, http_probe(self.session, f"{server.url}/health/liveliness"), timeout=120
        )
        return server

    async def portkey(self, upstream: Server) -> Server:
        """Portkey's gateway (see `ensure_portkey`), routed to the fake by its own headers."""
        port = free_port()
        argv = ["node", str(PORTKEY), f"--port={port}", "--headless"]
        env = {**os.environ, "NODE_ENV": "production"}
        server = self._spawn(f"portkey-{port}", argv, port, env=env, cwd=NODE_TOOLS)
        server.extra["bearer"] = "sk-fake"
        server.extra["headers"] = (
            f"x-portkey-provider: openai|x-portkey-custom-host: {upstream.url}/v1"
        )
        await wait_ready(server, http_probe(self.session, f"{server.url}/"), timeout=60)
        return server

    # -- control calls to the fake upstream and the proxy

    async def fake_stats(self, fake: Server) -> dict[str, Any]:
        async with self.session.get(f"{fake.url}/_fake/stats") as response:
            stats: dict[str, Any] = orjson.loads(await response.read())
            return stats

    async def fake_reset(self, fake: Server) -> None:
        async with self.session.post(f"{fake.url}/_fake/reset") as response:
            await response.read()

    async def get_json(self, url: str) -> dict[str, Any]:
        async with self.session.get(url) as response:
            body: dict[str, Any] = orjson.loads(await response.read())
            return body

    async def get_text(self, url: str) -> str:
        async with self.session.get(url) as response:
            return await response.text()
