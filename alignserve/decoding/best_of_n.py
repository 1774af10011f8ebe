"""`best_of_n`: sample `candidates` continuations of one prefill, keep the best `n` by reward.

The candidates branch from a single prefill (they share the prompt's KV), are generated
together in the engine's batch, and are scored by the composed reward in one batched call.
Ranking: total reward, then log-likelihood. Streams the winners once chosen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import Field

from alignserve.decoding.base import (
    ChoiceDelta,
    DecodeContext,
    DecodeEvent,
    Strategy,
    StrategyParams,
    register,
)
from alignserve.decoding.common import final_choice, prefill_branches, score_texts

MAX_CANDIDATES = 64


class BestOfNParams(StrategyParams):
    candidates: int = Field(8, ge=1, le=MAX_CANDIDATES, description="How many are sampled and scored.")


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    req, engine = ctx.request, ctx.engine
    k = max(req.params.candidates, req.n)
    seqs = await prefill_branches(ctx, k)
    try:
        async for _ in engine.generate(seqs, req.sampling, tally=ctx.tally):
            pass
        scores = await score_texts(ctx, [s.text for s in seqs])
        ctx.candidates_scored = max(ctx.candidates_scored, len(seqs))

        def rank(i: int) -> tuple[float, float]:
            total = scores[i].total if scores[i] is not None else 0.0
            return (total, seqs[i].cumulative_logprob)

        best = sorted(range(len(seqs)), key=rank, reverse=True)[: req.n]
        for out_index, i in enumerate(best):
            choice = final_choice(ctx, out_index, seqs[i], scores[i], streamed=req.stream)
            if req.stream:
                yield ChoiceDelta(out_index, choice.text, choice.token_ids, choice.logprobs)
            yield choice
        yield ctx.summary(sum(seqs[i].num_output for i in best))
    finally:
        await engine.release(seqs)


STRATEGY = register(Strategy(
    name="best_of_n",
    description="Sample `candidates` continuations sharing one prefill; return the best `n` by reward "
                "(ties by log-likelihood).",
    params=BestOfNParams,
    run=run,
    streams="winner",
))
