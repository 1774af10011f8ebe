"""One request, several prompts (and prompts whose own log-probs are asked for).

A completions request may carry a list of prompts. Each is decoded by the request's strategy
as a run of its own, all concurrently (so the engine batches their steps), and the choices are
numbered as OpenAI numbers them: sample j of prompt i is choice i*n + j.

Prompts that begin with the same tokens share their KV: that common prefix is prefilled once
and forked, each fork is extended with the rest of its prompt, and each strategy starts from
its fork (DecodeContext.root, taken by decoding.common.take_root) instead of prefilling. The
same roots carry the prompts' own log-probs when the request asks for them (completions
`echo` with `logprobs`); with nothing to generate (`max_tokens` 0) no strategy runs at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from alignserve.decoding.base import (
    ChoiceDelta,
    ChoiceFinal,
    DecodeContext,
    DecodeEvent,
    RequestSummary,
    Strategy,
)
from alignserve.decoding.common import common_prefix

# Below this many shared tokens each prompt is prefilled on its own: a fork and a separate
# extend for the rest would cost more bookkeeping than the few tokens it saves.
MIN_SHARED_PREFIX = 8


@dataclass
class PromptLogprobs:
    """The log-probs of prompt `prompt`'s own tokens (the first is None), sent before any of
    its choices."""

    prompt: int
    entries: list[dict | None]


async def prefill_roots(ctxs: list[DecodeContext], prompt_logprobs: int | None) -> None:
    """Give every context a root: its whole prompt computed, logits pending."""
    engine, tally = ctxs[0].engine, ctxs[0].tally
    prompts = [ctx.request.prompt_ids for ctx in ctxs]
    shared = common_prefix(prompts) if len(prompts) > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        async def one(ctx: DecodeContext) -> None:
            ctx.root = await engine.prefill(ctx.request.prompt_ids, tally,
                                            prompt_logprobs=prompt_logprobs)

        await asyncio.gather(*(one(ctx) for ctx in ctxs))
        return
    base = await engine.prefill(prompts[0][:shared], tally, prompt_logprobs=prompt_logprobs)
    try:
        forks = await engine.fork(base, len(ctxs))
    finally:
        await engine.release([base])
    for ctx, fork in zip(ctxs, forks):
        ctx.root = fork
    rest = [(fork, list(p[shared:])) for fork, p in zip(forks, prompts) if len(p) > shared]
    if rest:
        await engine.extend([f for f, _ in rest], [t for _, t in rest], tally, kind="prefill",
                            prompt_logprobs=prompt_logprobs)
    for fork, p in zip(forks, prompts):
        fork.prompt_len = len(p)  # the rest is prompt too: output starts after it


def _empty_choices(ctxs: list[DecodeContext]) -> list[ChoiceFinal]:
    """max_tokens 0: each choice is the prompt alone (echoed by the server), nothing scored."""
    n = ctxs[0].request.n
    return [ChoiceFinal(index=i * n + j, text="", token_ids=[], finish_reason="length",
                        reward=None, components={})
            for i in range(len(ctxs)) for j in range(n)]


async def _merged(strategy: Strategy, ctxs: list[DecodeContext],
                  summaries: list[RequestSummary]) -> AsyncIterator[DecodeEvent]:
    """Every context's run at once; choices renumbered i*n + j, summaries kept aside."""
    n = ctxs[0].request.n
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(i: int, ctx: DecodeContext) -> None:
        try:
            async for event in strategy.run(ctx):
                queue.put_nowait((i, event))
            queue.put_nowait((i, end))
        except BaseException as exc:  # handed to the consumer
            queue.put_nowait((i, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise

    tasks = [asyncio.create_task(pump(i, ctx)) for i, ctx in enumerate(ctxs)]
    try:
        live = len(tasks)
        while live:
            i, event = await queue.get()
            if event is end:
                live -= 1
            elif isinstance(event, BaseException):
                raise event
            elif isinstance(event, RequestSummary):
                summaries.append(event)
            elif isinstance(event, (ChoiceDelta, ChoiceFinal)):
                yield dataclasses.replace(event, index=i * n + event.index)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _summary(ctxs: list[DecodeContext], summaries: list[RequestSummary],
             started: float) -> RequestSummary:
    tally = ctxs[0].tally  # shared by every context: model tokens counted once
    return RequestSummary(
        strategy=ctxs[0].request.strategy,
        candidates_scored=sum(s.candidates_scored for s in summaries),
        model_tokens=tally.total,
        prompt_tokens=sum(len(ctx.request.prompt_ids) for ctx in ctxs),
        completion_tokens=sum(s.completion_tokens for s in summaries),
        reward_seconds=sum(s.reward_seconds for s in summaries),
        seconds=time.perf_counter() - started,
        tally=tally,
    )


async def run_prompts(strategy: Strategy,
                      ctxs: list[DecodeContext]) -> AsyncIterator[DecodeEvent | PromptLogprobs]:
    """Run `strategy` over every context (one per prompt; they share one TokenTally)."""
    sampling = ctxs[0].request.sampling
    k = sampling.prompt_logprobs
    if len(ctxs) == 1 and k is None and sampling.max_tokens > 0:
        async for event in strategy.run(ctxs[0]):  # the common case: nothing to add
            yield event
        return
    started = time.perf_counter()
    try:
        await prefill_roots(ctxs, k)
        if k is not None:
            for i, ctx in enumerate(ctxs):
                yield PromptLogprobs(i, list(ctx.root.prompt_logprobs))
        summaries: list[RequestSummary] = []
        if sampling.max_tokens == 0:
            for final in _empty_choices(ctxs):
                yield final
        else:
            async for event in _merged(strategy, ctxs, summaries):
                yield event
        yield _summary(ctxs, summaries, started)
    finally:
        unused = [ctx.root for ctx in ctxs if ctx.root is not None]  # a strategy left it
        for ctx in ctxs:
            ctx.root = None
        if unused:
            await ctxs[0].engine.release(unused)
