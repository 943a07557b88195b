"""A real, throwaway redis-server for tests: a free port, a temp dir, no persistence.

`kill()` simulates a crash (SIGKILL) and keeps the port; `restart()` starts
a new server on the same port; `stop()` ends it for good; `pause()` freezes
it (SIGSTOP: connections stay open, nothing is answered) until `resume()`. Every wait is
bounded. The fixture that uses it lives in tests/conftest_redis.py.

`cluster_node=True` starts it as a Redis Cluster node (not yet part of any
cluster: tests/redis_cluster.py joins three), its cluster bus on a second
free port and its node table in its temp dir, both kept across `restart`, so
a restarted node rejoins its cluster with the same id and slots.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

READY_TIMEOUT = 10.0


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free (held together while probing)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, executable: str = "redis-server", *, cluster_node: bool = False) -> None:
        found = shutil.which(executable)
        if found is None:
            raise RuntimeError(f"{executable} is not installed")
        self._executable = found
        self.dir = Path(tempfile.mkdtemp(prefix="llm-sidecar-redis-"))
        self.port = 0
        self.cluster_node = cluster_node
        self.bus_port = 0
        self.paused = False
        self._process: subprocess.Popen[bytes] | None = None
        # The port is free when probed, not necessarily when redis binds it:
        # try a few ports before giving up.
        for _ in range(5):
            self.port, self.bus_port = _free_ports(2)
            # A node table left by a failed attempt would name the old ports.
            (self.dir / "nodes.conf").unlink(missing_ok=True)
            if self._start():
                return
        self._cleanup_dir()
        raise RuntimeError(f"redis-server would not start; see {self.dir}/redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _start(self) -> bool:
        cluster = (
            [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.bus_port),
            ]
            if self.cluster_node
            else []
        )  # fmt: skip
        self._process = subprocess.Popen(
            [
                self._executable,
                *cluster,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log"),
                "--daemonize", "no",
                "--enable-debug-command", "local",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False  # exited: most likely the port was taken
            if _ping(self.port):
                return True
            time.sleep(0.01)
        self.kill()
        return False

    def pause(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self._process is not None and self.paused:
            self._process.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """Crash it (SIGKILL); the port stays reserved for `restart`."""
        process, self._process = self._process, None
        self.paused = False  # SIGKILL ends a stopped process too
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=READY_TIMEOUT)

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self.kill()
        if not self._start():
            raise RuntimeError(f"redis-server would not restart on port {self.port}")

    def stop(self) -> None:
        self.kill()
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
