"""Runs one request's strategy in a task of its own, and collects it when nobody streams.

Why a task of its own: the HTTP side is cancelled through anyio cancel scopes (Starlette cancels
a stream whose client left), and those re-cancel every await until the scope exits, so a
strategy's `finally: await engine.release(...)` would never finish there. In its own asyncio
task a strategy is cancelled once, plainly, and frees its sequences.

The task first waits for its admission ticket (its turn to run and its KV reservation), then
runs the strategy, all under the request's deadline. Whatever ends it (the deadline, a client
that left, a shutdown that aborts it) cancels that one task; the consumer reads why from the
queue: `RequestTimeout` (408), `ClientGone`, or the abort's own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from alignserve.decoding.base import (
    ChoiceDelta,
    ChoiceFinal,
    DecodeContext,
    DecodeEvent,
    RequestSummary,
)
from alignserve.decoding.batch import PromptLogprobs, run_prompts
from alignserve.engine.protocol import Engine, TokenTally
from alignserve.server.admission import Ticket
from alignserve.server.errors import APIError
from alignserve.server.metrics import RequestTracker
from alignserve.server.prepare import Prepared

log = logging.getLogger("alignserve.server")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


def request_timeout(seconds: float, started: bool, retry_after: int) -> APIError:
    """The deadline passed. 408 is what the openai client treats as a timeout (it retries 408s
    with backoff): a request that timed out while queued for capacity may well succeed later,
    so it is left retryable (with Retry-After); one that was already decoding would only time
    out again, so `x-should-retry: false` tells the client not to repeat it."""
    if started:
        return APIError(f"The request did not finish within the server's request timeout of "
                        f"{seconds:g} s; its work was cancelled. Ask for less (max_tokens, "
                        "candidates, lookahead) or raise --request-timeout.", status=408,
                        headers={"x-should-retry": "false"})
    return APIError(f"The request waited for capacity longer than the server's request timeout "
                    f"of {seconds:g} s; retry later.", status=408,
                    headers={"Retry-After": str(retry_after)})


class _End:
    pass


@dataclass
class _Failure:
    exc: BaseException


def _is_output(event: DecodeEvent) -> bool:
    """Text that goes out now: streamed tokens, or a whole choice that was not streamed."""
    if isinstance(event, ChoiceDelta):
        return bool(event.token_ids)
    return isinstance(event, ChoiceFinal) and not event.streamed


class DecodeRun:
    """One strategy run; its events arrive through a queue, in order."""

    def __init__(self, prepared: Prepared, engine: Engine, tracker: RequestTracker,
                 resources: Any = None, ticket: Ticket | None = None,
                 deadline: float | None = None, timeout_s: float = 0.0,
                 retry_after: int = 1) -> None:
        """`deadline`: the event loop's time by which the request must end (None: never)."""
        self.prepared = prepared
        self.tracker = tracker
        self.ticket = ticket
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.retry_after = retry_after
        self.started = False  # the strategy began (the ticket was granted)
        self.ended_by: str | None = None  # why it stopped early: timeout | disconnect | abort
        self._abort: BaseException | None = None
        # one context per prompt (a completions batch has several), counting into one tally
        tally = TokenTally()
        self.ctxs = [DecodeContext(engine=engine, request=d, resources=resources, tally=tally)
                     for d in prepared.decodes]
        self.ctx = self.ctxs[0]
        self.queue: asyncio.Queue[DecodeEvent | _End | _Failure] = asyncio.Queue()
        self._began = False
        self.task = asyncio.create_task(self._produce(), name=prepared.request_id)
        self.task.add_done_callback(self._never_began)

    def _never_began(self, _: asyncio.Task) -> None:
        # cancelled before its first step: _produce never ran, so say why here
        if not self._began:
            self.queue.put_nowait(_Failure(self._abort or ClientGone()))

    async def _produce(self) -> None:
        self._began = True
        limit = self._limit = asyncio.timeout_at(self.deadline)
        try:
            async with limit:
                if self.ticket is not None:
                    await self.ticket.acquire()
                self.started = True
                for ctx in self.ctxs:
                    ctx.started = time.perf_counter()
                agen = run_prompts(self.prepared.strategy, self.ctxs)
                async with contextlib.aclosing(agen):
                    async for event in agen:
                        if _is_output(event):
                            self.tracker.output()
                        self.queue.put_nowait(event)
            self.queue.put_nowait(_End())
        except TimeoutError as exc:
            if not limit.expired():
                self.queue.put_nowait(_Failure(exc))
            else:
                self.ended_by = "timeout"
                log.warning("request timed out after %.3g s (%s)", self.timeout_s,
                            "decoding" if self.started else "queued")
                self.queue.put_nowait(_Failure(
                    request_timeout(self.timeout_s, self.started, self.retry_after)))
        except asyncio.CancelledError:
            # a consumer still waiting must wake
            if self._abort is not None:
                self.ended_by = "abort"
                self.queue.put_nowait(_Failure(self._abort))
            else:
                self.ended_by = "disconnect"
                self.queue.put_nowait(_Failure(ClientGone()))
            raise
        except BaseException as exc:  # noqa: BLE001  (the consumer answers with an error)
            self.queue.put_nowait(_Failure(exc))
        finally:
            if self.ticket is not None:
                self.ticket.release()

    async def events(self) -> AsyncIterator[DecodeEvent]:
        while True:
            item = await self.queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def _stop(self) -> bool:
        """Cancel the task once. A second cancel would land in the strategy's cleanup
        (`finally: await engine.release(...)`) and leave its sequences held; so a task that is
        already being cancelled (by us or by its deadline) is left alone, and once we cancel it
        its deadline is disarmed."""
        if self.task.done() or self.task.cancelling():
            return False
        limit = getattr(self, "_limit", None)
        if limit is not None:
            limit.reschedule(None)
        self.task.cancel()
        return True

    def cancel(self) -> None:
        # No await: the caller may itself be inside a cancelled scope. The task cleans up alone.
        self._stop()

    def abort(self, exc: BaseException) -> None:
        """Stop the run; its consumer gets `exc` (e.g. a 503 at shutdown)."""
        if not self.task.done() and not self.task.cancelling():
            self._abort = exc
            self._stop()

    def reward_seconds(self) -> dict[str, float]:
        """Seconds per reward name over the whole request (ComposedReward.seconds)."""
        reward = self.prepared.decode.reward
        seconds: Any = getattr(reward, "seconds", None) or getattr(reward, "last_seconds", None)
        return dict(seconds) if isinstance(seconds, dict) else {}


@dataclass
class Collected:
    finals: list[ChoiceFinal] = field(default_factory=list)
    summary: RequestSummary | None = None
    prompt_logprobs: dict[int, list] = field(default_factory=dict)  # prompt index -> entries


async def collect(run: DecodeRun, request: Request, poll_s: float) -> Collected:
    """Wait for the whole run, cancelling it if the client goes away meanwhile."""
    try:
        while not run.task.done():
            done, _ = await asyncio.wait({run.task}, timeout=poll_s)
            if not done and await request.is_disconnected():
                raise ClientGone()
    finally:
        run.cancel()
    out = Collected()
    async for event in run.events():
        if isinstance(event, ChoiceFinal):
            out.finals.append(event)
        elif isinstance(event, RequestSummary):
            out.summary = event
        elif isinstance(event, PromptLogprobs):
            out.prompt_logprobs[event.prompt] = event.entries
    out.finals.sort(key=lambda f: f.index)
    return out
