"""Graceful shutdown: stop accepting, let in-flight requests finish for a grace period, then
abort what is left so every stream still ends with an error event and [DONE], close the engine
and exit 0.

uvicorn closes the listening sockets and waits for open connections when it gets SIGTERM; this
adds what it cannot know: the app's own runs. `GracefulServer` marks the app as draining (new
requests on kept-alive connections get 503, /health turns 503 so balancers stop routing here),
and after `shutdown_grace` seconds aborts every run still going. uvicorn re-raises a captured
SIGTERM after its graceful exit, which would end the process with status 143; a drained SIGTERM
is a clean exit, so it is not re-raised.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from alignserve.server.runner import DecodeRun

log = logging.getLogger("alignserve.server")


class Lifecycle:
    """The app's in-flight runs and whether it is shutting down."""

    def __init__(self) -> None:
        self.draining = False
        self.aborted: BaseException | None = None  # set once in-flight work was aborted
        self.runs: set[DecodeRun] = set()

    def add(self, run: DecodeRun) -> None:
        self.runs.add(run)
        run.task.add_done_callback(lambda _: self.runs.discard(run))
        if self.aborted is not None:  # a stream that only starts now
            run.abort(self.aborted)

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            log.info("draining: %d request(s) in flight", len(self.runs))

    def abort_all(self, exc: BaseException) -> None:
        self.aborted = exc
        for run in list(self.runs):
            run.abort(exc)

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for the runs to end, then abort the rest."""
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.runs and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.runs:
            from alignserve.server.errors import APIError

            log.warning("shutdown grace of %.1f s is over: aborting %d request(s)", grace,
                        len(self.runs))
            self.abort_all(APIError("The server is shutting down; retry the request.",
                                    status=503, headers={"Retry-After": "1"}))


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace: float) -> None:
        # uvicorn cancels what is left once its own timeout is over: leave aborted runs time
        # to send their last event.
        config.timeout_graceful_shutdown = grace + 5.0
        super().__init__(config)
        self.lifecycle = lifecycle
        self.grace = grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)  # a drained SIGTERM exits 0

    async def shutdown(self, sockets: Any = None) -> None:
        self.lifecycle.begin_drain()
        drainer = asyncio.create_task(self.lifecycle.drain(self.grace))
        try:
            await super().shutdown(sockets)
        finally:
            drainer.cancel()
