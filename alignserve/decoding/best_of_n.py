"""`best_of_n`: sample `candidates` continuations of one prefill, keep the best `n` by reward.

The candidates branch from a single prefill (they share the prompt's KV), are generated
together in the engine's batch, and are scored by the composed reward in one batched call.
Ranking: total reward, then log-likelihood. Streams the winners once chosen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import Field

from alignserve.decoding.base import (
    DecodeContext,
    DecodeEvent,
    Strategy,
    StrategyParams,
    register,
)
from alignserve.decoding.common import best_of, prefill_branches

MAX_CANDIDATES = 64


class BestOfNParams(StrategyParams):
    candidates: int = Field(8, ge=1, le=MAX_CANDIDATES, description="How many are sampled and scored.")


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    req, engine = ctx.request, ctx.engine
    k = max(req.params.candidates, req.n)
    seqs = await prefill_branches(ctx, k)
    try:
        async for event in best_of(ctx, seqs):
            yield event
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
