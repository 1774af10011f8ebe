"""Runs one request's strategy in a task of its own, and collects it when nobody streams.

Why a task of its own: the HTTP side is cancelled through anyio cancel scopes (Starlette cancels
a stream whose client left), and those re-cancel every await until the scope exits, so a
strategy's `finally: await engine.release(...)` would never finish there. In its own asyncio
task a strategy is cancelled once, plainly, and frees its sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from alignserve.engine.protocol import Engine
from alignserve.server.metrics import RequestTracker
from alignserve.server.prepare import Prepared

log = logging.getLogger("alignserve.server")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


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
                 resources: Any = None) -> None:
        self.prepared = prepared
        self.tracker = tracker
        self.ctx = DecodeContext(engine=engine, request=prepared.decode, resources=resources)
        self.queue: asyncio.Queue[DecodeEvent | _End | _Failure] = asyncio.Queue()
        self.task = asyncio.create_task(self._produce(), name=prepared.request_id)

    async def _produce(self) -> None:
        try:
            agen = self.prepared.strategy.run(self.ctx)
            async with contextlib.aclosing(agen):
                async for event in agen:
                    if _is_output(event):
                        self.tracker.output()
                    self.queue.put_nowait(event)
            self.queue.put_nowait(_End())
        except asyncio.CancelledError:
            self.queue.put_nowait(_Failure(ClientGone()))  # a consumer still waiting must wake
            raise
        except BaseException as exc:  # noqa: BLE001  (the consumer answers with an error)
            self.queue.put_nowait(_Failure(exc))

    async def events(self) -> AsyncIterator[DecodeEvent]:
        while True:
            item = await self.queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def cancel(self) -> None:
        # No await: the caller may itself be inside a cancelled scope. The task cleans up alone.
        if not self.task.done():
            self.task.cancel()

    def reward_seconds(self) -> dict[str, float]:
        """Seconds per reward name over the whole request (ComposedReward.seconds)."""
        reward = self.prepared.decode.reward
        seconds: Any = getattr(reward, "seconds", None) or getattr(reward, "last_seconds", None)
        return dict(seconds) if isinstance(seconds, dict) else {}


@dataclass
class Collected:
    finals: list[ChoiceFinal] = field(default_factory=list)
    summary: RequestSummary | None = None


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
    out.finals.sort(key=lambda f: f.index)
    return out
