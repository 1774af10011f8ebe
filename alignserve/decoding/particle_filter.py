"""`particle_filter`: sequential Monte Carlo over segments (arXiv 2502.01618).

`candidates` particles branch from one prefill. After every segment (`segment` tokens, or
entropy-bounded segments) the rewards score the partial texts and the population is resampled
in proportion to softmax(reward / `resample_temperature`): a particle drawn k times goes on as
k copies that share its KV (fork), one drawn never is dropped. A finished particle leaves the
population (segments.py: it waits in the archive on its final reward). `keep` < 1 shrinks
the population at each resampling (the draw takes that fraction of it, at least n): classic
particle filtering keeps it whole (1.0), which costs about as many model tokens as best-of-N
with as many candidates. Resampling is systematic (one uniform draw per round: lower variance
than independent draws), seeded by the request's `seed`. Once the rewards' ceiling is sure
(segments.py: settle), the rest is dropped. The best n finished particles by final reward are
returned.

Defaults (segment 3, keep 0.7, resample_temperature 0.1; issue 17) by bench/segment_sweep.py on
items the evaluation does not report on (keyword items 13-56, sentiment 13-24), three draws
with the engine's twin rows (segment-sweep-20261207-014513, -014929, -015222): keywords 0.016
below best_of_16's reward at 0.356x its model tokens, sentiment 0.010 below at 0.343x; the
earlier keep 0.6 gave 0.021 / 0.028 at 0.32x / 0.26x. Forking the particles that lead (a
sentence that has three of four keywords gets several tries at the fourth) is what lets it
beat speculative rejection at equal tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Literal

from pydantic import Field

from alignserve.decoding import kv
from alignserve.decoding.base import DecodeContext, DecodeEvent, Strategy, register
from alignserve.decoding.segments import (
    MAX_SEGMENT,
    Particle,
    SegmentParams,
    kept_count,
    run_search,
)


class ParticleFilterParams(SegmentParams):
    segment: Annotated[int, Field(ge=1, le=MAX_SEGMENT)] | Literal["entropy"] = Field(
        3, description="Tokens per segment between two resamplings, or \"entropy\": a segment "
        "ends before the first token (after at least 2) whose next-token entropy reaches "
        "`entropy_threshold` (CARDS), at most `max_segment` tokens.")
    resample_temperature: float = Field(
        0.1, gt=0.0, le=1e6, allow_inf_nan=False,
        description="Temperature of the resampling weights softmax(reward / T): small follows "
        "the reward greedily, large resamples uniformly.")
    keep: float = Field(0.7, gt=0.0, le=1.0, allow_inf_nan=False,
                        description="Population kept at each resampling, as a fraction "
                        "(rounded up, at least n); 1 is classic particle filtering.")


def softmax_weights(rewards: Sequence[float], temperature: float) -> list[float]:
    top = max(rewards)
    w = [math.exp((r - top) / temperature) for r in rewards]
    total = sum(w)
    return [x / total for x in w]


def systematic_counts(weights: Sequence[float], draws: int, u: float) -> list[int]:
    """How often each index is drawn by systematic resampling: `draws` evenly spaced points
    (u + j) / draws, j = 0..draws-1, u in [0, 1), fall into the weights' cumulative intervals.
    Each index gets floor or ceil of draws * weight."""
    counts = [0] * len(weights)
    cumulative, i = weights[0], 0
    for j in range(draws):
        point = (u + j) / draws
        while point >= cumulative and i < len(weights) - 1:
            i += 1
            cumulative += weights[i]
        counts[i] += 1
    return counts


def resample(temperature: float, keep: float, n: int, seed: int | None):
    def policy(pool: list[Particle], round_index: int) -> list[int]:
        rng = random.Random(None if seed is None else seed * 1000003 + round_index)
        weights = softmax_weights([p.reward for p in pool], temperature)
        counts = systematic_counts(weights, kept_count(len(pool), keep, n), rng.random())
        return counts
    return policy


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    p: ParticleFilterParams = ctx.request.params
    policy = resample(p.resample_temperature, p.keep, ctx.request.n, ctx.request.sampling.seed)
    async for event in run_search(ctx, p, policy,
                                  {"candidates": max(p.candidates, ctx.request.n)}):
        yield event


def kv_slots(decode, prompt: int, tokens: int, page: int) -> int:
    """Peak KV (decoding.kv): a resampling forks survivors, so each round's segment can start
    a leaf (whole pages) of its own per particle; an entropy segment holds up to max_segment
    tokens before its cut."""
    p = decode.params
    width = max(decode.n, int(p.candidates))
    shortest, longest = int(p.shortest_segment), int(p.longest_segment)
    rounds = math.ceil(tokens / shortest)
    return kv.branch(prompt, page) + width * (rounds * kv.pages(longest, page) * page
                                              + kv.branch(longest, page))


STRATEGY = register(Strategy(
    name="particle_filter",
    description="Particle filtering: `candidates` particles share one prefill; after every "
    "segment they are resampled in proportion to softmax(reward / resample_temperature) "
    "(copies fork the KV); the best n finished ones are returned.",
    params=ParticleFilterParams,
    run=run,
    streams="agreed-prefix",
    kv_slots=kv_slots,
))
