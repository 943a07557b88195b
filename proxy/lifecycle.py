"""The server's life: start, reload on SIGHUP, drain and stop on SIGTERM/SIGINT.

Signal handlers only set a flag or an event; the tasks here do the work.

Shutdown, in order:

1. `/readyz` answers 503 at once (`rt.draining`), so load balancers and
   Kubernetes endpoints stop sending traffic.
2. For `shutdown.accept_delay` the listener still accepts, for the clients
   that have not noticed yet; then it closes, and every connection closes
   after the request it is serving.
3. In-flight requests and streams (and pumps finishing for nobody) get up
   to `shutdown.drain_timeout` to end on their own.
4. The pumps still running are cancelled with a message: each of their
   readers gets an error event and its stream ends. The process exits 0.

A second SIGTERM/SIGINT skips whatever waiting is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable
from pathlib import Path

import uvloop
from aiohttp import web

from proxy import logs
from proxy.app import build_admin_app, build_app, make_runner, start_site
from proxy.observe import OBSERVER
from proxy.policy import LoadedPolicy
from proxy.reload import Reloader
from proxy.runtime import RUNTIME

# After the drain: how long cancelled streams get to write their error event,
# and how long aiohttp then waits for any handler left before cancelling it.
GRACE = 1.0
STOP_MESSAGE = "llm-sidecar is shutting down: the drain timeout passed"


class ListenError(Exception):
    """The listening socket could not be opened: the command line says so in one line."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        reason = os.strerror(cause.errno).lower() if cause.errno else str(cause)
        super().__init__(f"cannot listen on {host}:{port}: {reason}")


class Lifecycle:
    def __init__(self, app: web.Application, runner: web.AppRunner, policy_path: Path) -> None:
        self._runner = runner
        self._rt = app[RUNTIME]
        self._observer = app[OBSERVER]
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self.reloader = Reloader(self._rt, policy_path, on_applied=_configure_logging)

    # -- signal handlers: flags and events only ---------------------------

    def on_stop_signal(self) -> None:
        if self._stop.is_set():
            self._force.set()
            return
        self._rt.draining = True  # /readyz fails from this instant
        self._stop.set()

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_stop_signal)

    # -- the work -------------------------------------------------------

    async def run_until_stopped(self) -> None:
        reloads = asyncio.create_task(self.reloader.run(), name="llm-sidecar-reload")
        try:
            await self._stop.wait()
        finally:
            reloads.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloads
        await self.drain()

    async def drain(self) -> None:
        rt, observer = self._rt, self._observer
        settings = rt.snapshot.loaded.policy.shutdown
        started = time.monotonic()
        logs.event(
            "drain start",
            requests=observer.active,
            streams=len(rt.table),
            pumps=len(rt.pumps),
            accept_delay_s=settings.accept_delay,
            drain_timeout_s=settings.drain_timeout,
        )
        await self._unless_forced(asyncio.sleep(settings.accept_delay), settings.accept_delay)
        for site in list(self._runner.sites):
            await site.stop()
        server = self._runner.server
        if server is not None:
            server.pre_shutdown()  # idle keep-alives close now, busy ones after this request
        logs.event("listener closed", logging.DEBUG, requests=observer.active, pumps=len(rt.pumps))
        drained = await self._unless_forced(self._drained(), settings.drain_timeout)
        left = list(rt.pumps)
        for task in left:
            task.cancel(STOP_MESSAGE)
        if left:
            await asyncio.wait(left, timeout=GRACE)
        await self._unless_forced(observer.wait_idle(), GRACE)
        logs.event(
            "drain end",
            drained=drained,
            cancelled_streams=len(left),
            requests_left=observer.active,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _drained(self) -> None:
        """Return once no request is in a handler and no pump is running."""
        observer, rt = self._observer, self._rt
        while True:
            await observer.wait_idle()
            pumps = list(rt.pumps)
            if not pumps:
                if not observer.active:
                    return
                continue
            await asyncio.wait(pumps)

    async def _unless_forced(self, work: Awaitable[None], seconds: float) -> bool:
        """Run `work` for at most `seconds`, less if forced; True when it finished."""
        task = asyncio.ensure_future(work)
        forced = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait((task, forced), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, forced):
                pending.cancel()
            await asyncio.gather(task, forced, return_exceptions=True)
        return task.done() and not task.cancelled() and task.exception() is None


def _configure_logging(loaded: LoadedPolicy) -> None:
    logs.configure(loaded.policy.log, os.environ)


async def _listen(app: web.Application, host: str, port: int, runner: web.AppRunner) -> None:
    try:
        await start_site(app, host, port, runner=runner)
    except OSError as exc:  # a busy port is the operator's to fix: one line, no traceback
        raise ListenError(host, port, exc) from exc


async def run(loaded: LoadedPolicy, host: str, port: int) -> None:
    _configure_logging(loaded)
    app = build_app(loaded)
    runner = make_runner(app, shutdown_timeout=GRACE)
    lifecycle = Lifecycle(app, runner, Path(loaded.source))
    # Before the socket opens: a SIGTERM from here on drains instead of killing.
    lifecycle.install_signals()
    admin_runner: web.AppRunner | None = None
    try:
        await _listen(app, host, port, runner)
        admin = loaded.policy.admin
        if admin is not None:
            # Its own runner: the drain closes the API listener only, so probes
            # and metrics keep answering (503 from /readyz) until the exit.
            admin_app = build_admin_app(app[RUNTIME])
            admin_runner = make_runner(admin_app, shutdown_timeout=GRACE)
            await _listen(admin_app, admin.host, admin.port, admin_runner)
        # Everything built so far lives as long as the process: keep it out of
        # the collector's full passes, which otherwise rescan it under load.
        gc.freeze()
        logs.event(
            "start",
            host=host,
            port=port,
            admin_host=None if admin is None else admin.host,
            admin_port=None if admin is None else admin.port,
            version=loaded.version,
            pid=os.getpid(),
        )
        await lifecycle.run_until_stopped()
    finally:
        await runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
    logs.event("stop")
    logs.flush()  # the loop ends here: no timer will write what is buffered


def serve(loaded: LoadedPolicy, host: str | None = None, port: int | None = None) -> None:
    listen = loaded.policy.listen
    uvloop.run(run(loaded, host or listen.host, port if port is not None else listen.port))
