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
import os
import queue
import signal
import socket
import sys
import threading

from proxy.testing.fake_answers import FakeSettings
from proxy.testing.fake_upstream import FakeUpstream, header_knobs

__all__ = ["main"]


# What each setting does, for --help; the same words describe the matching
# x-fake-* request header, so the two can never disagree.
SETTING_HELP = {
    "tokens": "content tokens per answer (default: %(default)s)",
    "token_delay": "seconds between two stream events (default: %(default)s)",
    "ttft": "seconds after the response headers before the first event (default: %(default)s)",
    "header_delay": "seconds before sending the response headers at all (default: %(default)s)",
    "error_status": "answer every completion, embedding and response POST with this "
    "status (400-599) and an OpenAI-style error body, e.g. 429 or 500 (default: off)",
    "error_times": "with --status: only the first N such POSTs get the error, later ones "
    "answer normally (default: every one)",
    "retry_after": "the Retry-After header on error answers, seconds or an HTTP date "
    '(default: "1" on a 429, none otherwise)',
    "retry_after_ms": "the retry-after-ms header on error answers, as OpenAI sends it "
    "(default: none)",
    "token_padding": "characters added to every content token, for large answers "
    "(default: %(default)s)",
    "endless": "never end: `events` streams events forever (a plain body: bytes forever), "
    "`line` streams one line that never ends (default: off)",
    "drop_after": "streams only: cut the connection after N events, mid-stream (default: off)",
    "require_key": "answer 401 unless the request has `Authorization: Bearer KEY` "
    "(default: any key, or none, is accepted)",
    "embedding_dims": "length of each embedding vector (default: %(default)s)",
    "refuse": "answer 400 as an upstream that cannot stream does: `stream` refuses "
    "`stream: true`, `stream_options` refuses a body with stream_options (default: off)",
}
_FLAGS = {"error_status": "--status", "require_key": "--require-key"}
_TEXT_SETTINGS = frozenset({"require_key", "retry_after", "endless", "refuse"})
_METAVARS = {
    "endless": "events|line",
    "refuse": "stream|stream_options",
    "require_key": "KEY",
    "retry_after": "S|DATE",
    "retry_after_ms": "MS",
}


def _epilog() -> str:
    lines = [
        "Per-request knobs: these request headers override the flags above for one",
        "request (the proxy relays them upstream like any other header);",
        "x-fake-error-times counts the errors sent to that request's body, so a",
        "retried request fails its first N tries:",
    ]
    for header, name in header_knobs().items():
        lines.append(f"  {header:<22} {_FLAGS.get(name, '--' + name.replace('_', '-'))}")
    lines += [
        "",
        "Control endpoints (never under /v1, so the proxy never relays them):",
        "  GET  /_fake/stats      calls received: total, by path, in flight",
        "  POST /_fake/reset      forget the calls received",
        '  POST /_fake/settings   change settings live: a JSON object, e.g. {"ttft": 2}',
        "",
        "Serves POST /v1/chat/completions, /v1/completions, /v1/embeddings and",
        "/v1/responses (stream and not), and GET /v1/models.",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-sidecar fake-upstream",
        description="Run a fake OpenAI-compatible upstream, for trying the proxy without\n"
        "spending tokens and for tests and benchmarks. Answers are deterministic:\n"
        "the same request gets the same text.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = FakeSettings()
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9000, help="listen port (default: %(default)s)")
    for name, text in SETTING_HELP.items():
        default = getattr(defaults, name)
        kind = str if name in _TEXT_SETTINGS else type(default) if default is not None else int
        parser.add_argument(
            _FLAGS.get(name, "--" + name.replace("_", "-")),
            dest=name,
            type=float if kind is float else kind,
            default=default,
            metavar=_METAVARS.get(name, "N"),
            help=text,
        )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes sharing the port with SO_REUSEPORT (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = FakeSettings(**{name: getattr(args, name) for name in SETTING_HELP})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workers <= 1:
        import uvloop

        try:
            uvloop.run(_serve(args.host, args.port, settings, reuse_port=False, ready=None))
        except OSError as exc:
            print(_cannot_listen(args.host, args.port, exc), file=sys.stderr)
            return 2
        return 0
    return _run_workers(args.host, args.port, settings, args.workers)


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return f"error: cannot listen on {host}:{port}: {reason}"


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
        print(_cannot_listen(host, port, exc), file=sys.stderr)
        return 2
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
