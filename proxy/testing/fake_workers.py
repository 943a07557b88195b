"""The fake upstream's command line: one process, or several sharing one port.

`main` parses the flags into `FakeSettings` and serves one `FakeUpstream` per
process; with `--workers N` it reserves the port, starts N spawned workers
that bind it with SO_REUSEPORT, reports the URL once all are up, and stops
them all when it is signalled or one of them dies.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.queues
import queue
import signal
import socket
import sys
import threading

from proxy.testing.fake_answers import DIALECTS, LINE_ENDINGS, FakeSettings
from proxy.testing.fake_upstream import FakeUpstream

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-sidecar fake-upstream", description="Run the fake OpenAI-compatible upstream."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first event")
    parser.add_argument("--header-delay", type=float, default=0.0)
    parser.add_argument("--require-key", default=None)
    parser.add_argument(
        "--dialect", default="openai", choices=DIALECTS, help="whose wire quirks to speak"
    )
    parser.add_argument("--line-ending", default="lf", choices=tuple(LINE_ENDINGS))
    parser.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = FakeSettings(
            tokens=args.tokens,
            token_delay=args.token_delay,
            ttft=args.ttft,
            header_delay=args.header_delay,
            require_key=args.require_key,
            dialect=args.dialect,
            line_ending=args.line_ending,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workers <= 1:
        import uvloop

        uvloop.run(_serve(args.host, args.port, settings, reuse_port=False, ready=None))
        return 0
    return _run_workers(args.host, args.port, settings, args.workers)


async def _serve(
    host: str,
    port: int,
    settings: FakeSettings,
    *,
    reuse_port: bool,
    ready: multiprocessing.queues.Queue[str] | None,
) -> None:
    fake = FakeUpstream(settings)
    url = await fake.start(host, port, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is None:
        print(f"fake upstream listening on {url}", flush=True)
    else:
        ready.put(url)
    try:
        await stop.wait()
    finally:
        await fake.close()


def _worker(
    host: str, port: int, settings: FakeSettings, ready: multiprocessing.queues.Queue[str]
) -> None:
    import uvloop

    uvloop.run(_serve(host, port, settings, reuse_port=True, ready=ready))


def _run_workers(host: str, port: int, settings: FakeSettings, workers: int) -> int:
    # Port 0 must become one concrete port every worker shares: a bound socket
    # that never listens reserves it without taking any connections.
    reserve = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserve.bind((host, port))
    except OSError as exc:
        reserve.close()
        print(f"error: cannot bind {host}:{port}: {exc}", file=sys.stderr)
        return 1
    port = reserve.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    ready: multiprocessing.queues.Queue[str] = context.Queue()
    procs = [
        context.Process(target=_worker, args=(host, port, settings, ready), daemon=True)
        for _ in range(workers)
    ]
    stopping = threading.Event()
    # Signal handlers only set the flag; the loop below does the work.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    for proc in procs:
        proc.start()
    try:
        started: list[str] = []
        while len(started) < workers and not stopping.is_set():
            try:
                started.append(ready.get(timeout=0.2))
            except queue.Empty:
                if not all(proc.is_alive() for proc in procs):
                    print("error: a worker did not start", file=sys.stderr)
                    return 1
        reserve.close()
        if started:
            print(f"fake upstream listening on {started[0]} ({workers} workers)", flush=True)
        while not stopping.wait(0.5):
            if not all(proc.is_alive() for proc in procs):
                break
    finally:
        reserve.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    return 0 if stopping.is_set() else 1


if __name__ == "__main__":
    raise SystemExit(main())
