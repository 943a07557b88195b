"""A real, throwaway redis-server for tests: a free port, a temp dir, no persistence.

`kill()` simulates a crash (SIGKILL) and keeps the port; `restart()` starts
a new server on the same port; `stop()` ends it for good. Every wait is
bounded. The fixture that uses it lives in tests/conftest_redis.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

READY_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, executable: str = "redis-server") -> None:
        found = shutil.which(executable)
        if found is None:
            raise RuntimeError(f"{executable} is not installed")
        self._executable = found
        self.dir = Path(tempfile.mkdtemp(prefix="llm-sidecar-redis-"))
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        # The port is free when probed, not necessarily when redis binds it:
        # try a few ports before giving up.
        for _ in range(5):
            self.port = _free_port()
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
        self._process = subprocess.Popen(
            [
                self._executable,
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

    def kill(self) -> None:
        """Crash it (SIGKILL); the port stays reserved for `restart`."""
        process, self._process = self._process, None
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
