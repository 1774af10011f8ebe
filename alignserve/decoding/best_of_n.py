"""`best_of_n`: sample `candidates` continuations of one prefill, keep the best `n` by reward.

The candidates branch from a single prefill (they share the prompt's KV), are generated
together in the engine's batch, and are scored by the composed reward in one batched call.
Ranking: total reward, then log-likelihood. Streams the winners once chosen.

`selection: "soft"` (soft best-of-N, arXiv 2505.03156) draws the winners instead, without
replacement, with probabilities softmax(reward / lambda): closer to the reward-tilted
distribution than the argmax (less reward hacking), approaching it as lambda grows and the
argmax as lambda shrinks. The draw is seeded by the request's `seed` (reproducible with it).
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Sequence
from typing import Literal

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
    selection: Literal["argmax", "soft"] = Field(
        "argmax", description="argmax: the best n by reward; soft: n drawn without replacement "
        "with probabilities softmax(reward / lambda), seeded by `seed`.")
    lambda_: float = Field(0.1, gt=0.0, le=1e6, allow_inf_nan=False, alias="lambda",
                           description="Temperature of the soft selection (selection \"soft\" "
                           "only): small is close to argmax, large to a uniform pick.")


def soft_pick(rewards: Sequence[float], n: int, lam: float, rng: random.Random) -> list[int]:
    """n indices drawn without replacement, each draw with probability proportional to
    exp(reward / lam) among those left."""
    left = list(range(len(rewards)))
    out = []
    for _ in range(min(n, len(left))):
        top = max(rewards[i] for i in left)
        weights = [math.exp((rewards[i] - top) / lam) for i in left]
        j = rng.choices(range(len(left)), weights=weights)[0]
        out.append(left.pop(j))
    return out


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    req, engine = ctx.request, ctx.engine
    k = max(req.params.candidates, req.n)
    seqs = await prefill_branches(ctx, k)
    try:
        pick = None
        if req.params.selection == "soft":
            seed = req.sampling.seed
            # a seed of its own: the candidates' sampling already used the request's
            rng = random.Random(None if seed is None else seed * 2654435761 + 1)
            lam = req.params.lambda_

            def pick(rewards: Sequence[float], n: int) -> list[int]:
                return soft_pick(rewards, n, lam, rng)
        async for event in best_of(ctx, seqs, pick=pick):
            yield event
    finally:
        await engine.release(seqs)


STRATEGY = register(Strategy(
    name="best_of_n",
    description="Sample `candidates` continuations sharing one prefill; return the best `n` by reward "
                "(ties by log-likelihood), or, with selection \"soft\", n drawn from "
                "softmax(reward / lambda).",
    params=BestOfNParams,
    run=run,
    streams="winner",
))
