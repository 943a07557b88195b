"""A real, throwaway 3-master Redis Cluster on loopback, for tests.

Three `redis-server --cluster-enabled yes` nodes (tests/redis_server.py, each
on free ports in its own temp dir, no persistence), joined exactly as an
operator would: `redis-cli --cluster create ... --cluster-replicas 0
--cluster-yes`, which spreads the 16384 slots over the three masters. Ready
when every node's `CLUSTER INFO` says `cluster_state:ok` and knows all three.

Start-up is dominated by redis-cli's own join wait (one fixed second, then
polls once a second): about 2 to 4 s, so the fixture in
tests/conftest_redis.py builds one cluster per session and gives each test
a healthy, empty one (`heal`).

`nodes[i].pause()` freezes node i (SIGSTOP) until `resume()`; `kill(i)`
crashes it (SIGKILL); `restart(i)` brings it back on the same
ports with the same node table, so it rejoins as the same master of the same
slots (empty: nothing is persisted). A restarted master refuses commands for
Redis's fixed 2 s "writable delay" before it reports `cluster_state:ok`
again; `restart` waits for that, every wait bounded.
"""

from __future__ import annotations

import shutil
import subprocess
import time

from redis import Redis
from redis.exceptions import RedisError

from tests.redis_server import RedisServer

READY_TIMEOUT = 30.0
MASTERS = 3


class RedisClusterNodes:
    def __init__(self, masters: int = MASTERS) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed")
        started = time.monotonic()
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters):
                self.nodes.append(RedisServer(cluster_node=True))
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=READY_TIMEOUT,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    @property
    def urls(self) -> list[str]:
        """One URL per master; a cluster client needs any one of them."""
        return [f"redis://127.0.0.1:{node.port}/0" for node in self.nodes]

    @property
    def url(self) -> str:
        return self.urls[0]

    def client(self, index: int) -> Redis:
        """A plain (not cluster) client of node `index`, to ask it about itself."""
        return Redis(host="127.0.0.1", port=self.nodes[index].port, socket_timeout=5)

    def slots_of(self, *names: str) -> list[int]:
        """The slot Redis hashes each name to (CLUSTER KEYSLOT, asked of a live node)."""
        with self.client(self._live()) as client:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.execute_command("CLUSTER KEYSLOT", name)
            return [int(slot) for slot in pipe.execute()]

    def nodes_of(self, *names: str) -> list[int]:
        """Index of the master serving each name's slot, from the cluster's own slot map."""
        slots = self.slots_of(*names)
        with self.client(self._live()) as client:
            ranges = client.execute_command("CLUSTER SLOTS")
        ports = [node.port for node in self.nodes]
        owner = {}
        for start, end, master, *_ in ranges:
            owner.update(dict.fromkeys(range(start, end + 1), ports.index(int(master[1]))))
        return [owner[slot] for slot in slots]

    def _live(self) -> int:
        return next(i for i, node in enumerate(self.nodes) if node.running)

    def _info(self, index: int) -> dict[str, str]:
        try:
            with self.client(index) as client:
                info = client.execute_command("CLUSTER INFO")  # parsed by redis-py
        except (OSError, RedisError):  # a node still starting
            return {}
        return {str(name): str(value) for name, value in dict(info).items()}

    def healthy(self) -> bool:
        for index, node in enumerate(self.nodes):
            if not node.running:
                return False
            info = self._info(index)
            if info.get("cluster_state") != "ok":
                return False
            if info.get("cluster_known_nodes") != str(len(self.nodes)):
                return False
        return True

    def wait_ok(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok after {READY_TIMEOUT}s: {self.urls}")
            time.sleep(0.02)

    def kill(self, index: int) -> None:
        """Crash node `index` (SIGKILL); its slots stay assigned to it."""
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        self.nodes[index].restart()
        self.wait_ok()

    def heal(self) -> None:
        """Every node back and the cluster ok, every key gone."""
        for node in self.nodes:
            node.resume()
            if not node.running:
                node.restart()
        self.wait_ok()
        for index in range(len(self.nodes)):
            with self.client(index) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
