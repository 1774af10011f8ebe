"""Server-sent events as vLLM's OpenAI server sends them.

Order per request: for chat, one opening chunk per choice with `delta.role = "assistant"`;
the choices' text deltas as the strategy yields them; a choice whose text was not streamed
(`streamed=False`, e.g. best_of_n's winner) sends all of it in one delta; each choice's last
chunk has `finish_reason` and the choice's `alignment` (reward, components). The request's own
`alignment` report (strategy, candidates_scored, ...) rides on the last chunk before [DONE]:
the usage chunk (empty `choices`) when `stream_options.include_usage` is set, otherwise the
last choice's finish chunk. An error after the stream began is one `data: {"error": ...}`
chunk, then [DONE]: that is how a request deadline (408) or a shutdown that aborts the request
(503) reaches a stream whose 200 already went out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from alignserve.decoding.base import ChoiceDelta, ChoiceFinal, RequestSummary
from alignserve.decoding.batch import PromptLogprobs
from alignserve.server.errors import api_error_body, as_api_error
from alignserve.server.metrics import RequestTracker
from alignserve.server.render import Chunk, Renderer, dump_chunk, report, usage
from alignserve.server.runner import ClientGone, DecodeRun

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_events(start: Callable[[], DecodeRun], renderer: Renderer,
                        tracker: RequestTracker, record: Any = None) -> AsyncIterator[str]:
    """The chunks as server-sent events, ending in [DONE]."""
    async with aclosing(stream_chunks(start, renderer, tracker, record)) as chunks:
        async for data in chunks:
            yield sse(data)
    yield DONE


async def stream_chunks(start: Callable[[], DecodeRun], renderer: Renderer,
                        tracker: RequestTracker, record: Any = None
                        ) -> AsyncIterator[dict[str, Any]]:
    """Each chunk (or the error body) as a dict. `start` begins the run once the response
    starts, so an unsent stream costs nothing. `record` (the access log's AccessRecord) gets
    the token counts or the error."""
    run = start()
    reason = "disconnect"  # why it ended early, for the metrics
    finals: list[ChoiceFinal] = []
    summary: RequestSummary | None = None
    held: Chunk | None = None  # the newest finish chunk: the last one carries the report
    completed = False
    try:
        n = run.prepared.decode.n
        if not run.prepared.prompt_logprobs:  # else each opens once its prompt is scored
            for index in range(run.prepared.choices):
                opening = renderer.opening(index)
                if opening is not None:
                    yield dump_chunk(opening)
        async for event in run.events():
            if isinstance(event, PromptLogprobs):
                for index in range(event.prompt * n, event.prompt * n + n):
                    opening = renderer.opening(index, event.entries)
                    if opening is not None:
                        yield dump_chunk(opening)
            elif isinstance(event, ChoiceDelta):
                if renderer.holds_text or not _says_something(event, run):
                    continue
                if held is not None:
                    yield dump_chunk(held)
                    held = None
                yield dump_chunk(renderer.delta(event.index, event.text, event.logprobs,
                                                event.token_ids))
            elif isinstance(event, ChoiceFinal):
                finals.append(event)
                if held is not None:
                    yield dump_chunk(held)
                    held = None
                if renderer.holds_text:
                    for chunk in renderer.tool_call_chunks(event):
                        yield dump_chunk(chunk)
                elif not event.streamed and _says_something(event, run):
                    yield dump_chunk(renderer.delta(event.index, event.text, event.logprobs,
                                                    event.token_ids))
                held = renderer.finish(event)
            elif isinstance(event, RequestSummary):
                summary = event
        if summary is None:
            raise RuntimeError(f"strategy {run.prepared.strategy.name} ended without a summary")
        tracker.finish(summary, finals, run.reward_seconds())
        completed = True
        if record is not None:
            record.prompt_tokens = summary.prompt_tokens
            record.completion_tokens = sum(len(f.token_ids) for f in finals)
        if run.prepared.include_usage or held is None:
            if held is not None:
                yield dump_chunk(held)
            use = usage(summary.prompt_tokens, sum(len(f.token_ids) for f in finals))
            yield dump_chunk(renderer.closing(use if run.prepared.include_usage else None,
                                              summary))
        else:
            held.alignment = report(summary)
            yield dump_chunk(held)
    except (ClientGone, asyncio.CancelledError, GeneratorExit):
        raise  # the client left: nothing more to send (finally cancels the run)
    except Exception as exc:  # noqa: BLE001  (sent to the client as an error chunk)
        reason = abort_reason(run)
        err = as_api_error(exc)
        if record is not None:
            record.error = err.message
        yield api_error_body(err)
    finally:
        run.cancel()
        if not completed:
            tracker.abort(reason)


def _says_something(event: ChoiceDelta | ChoiceFinal, run: DecodeRun) -> bool:
    """Whether the event's output makes a delta: text, log-probs, or (with return_token_ids)
    token ids alone: a token that ends inside a character has no text yet, but it counts."""
    return bool(event.text or event.logprobs
                or (run.prepared.return_token_ids and event.token_ids))


def abort_reason(run: DecodeRun) -> str:
    """The metrics' name for why a run failed: timeout, shutdown or error."""
    return {"timeout": "timeout", "abort": "shutdown"}.get(run.ended_by or "", "error")
