"""`speculative_rejection`: a large best-of-N that stops its weakest candidates early
(Speculative Rejection, arXiv 2410.20290).

`candidates` continuations branch from one prefill. Every `segment` tokens the rewards score
the partial texts (rewardmodels.partial: keyword coverage so far, the length reward's reachable
bound, regex and JSON prefix validity, classifiers on the text as it is) and only the best
`keep` fraction goes on (at least n; ties by mean token log-likelihood); a candidate that finishes leaves the race,
scored on its final text, and the best n finished candidates are returned. The survivors' KV
is never copied: pruning only frees sequences.
Model tokens fall from candidates * max_tokens towards candidates * segment / (1 - keep).

Defaults (segment 4, keep 0.5) were chosen by bench/segment_sweep.py on keyword items the
evaluation does not report on: with 16 candidates and 40 tokens they spent 0.40x best_of_16's
model tokens at 0.931 reward against its 0.979; keep 0.25 or 3-token segments spent less
(0.31-0.33x) and lost more (0.81-0.83); 8-token segments kept 0.938 at 0.50x.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import Field

from alignserve.decoding.base import DecodeContext, DecodeEvent, Strategy, register
from alignserve.decoding.segments import (
    Particle,
    SegmentParams,
    kept_count,
    rank_key,
    run_search,
)


class SpeculativeRejectionParams(SegmentParams):
    keep: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False,
                        description="Fraction of the candidates kept at each pruning (rounded "
                        "up, at least n); 1 never prunes (best_of_n's result, by segments).")


def prune(keep: float, n: int):
    """The policy: the best `keep` fraction of the population goes on, the rest is dropped."""
    def policy(pool: list[Particle], round_index: int) -> list[int]:
        order = sorted(range(len(pool)), key=lambda i: rank_key(pool[i]), reverse=True)
        kept = set(order[: kept_count(len(pool), keep, n)])
        return [1 if i in kept else 0 for i in range(len(pool))]
    return policy


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    p: SpeculativeRejectionParams = ctx.request.params
    async for event in run_search(ctx, p, prune(p.keep, ctx.request.n),
                                  {"candidates": max(p.candidates, ctx.request.n)}):
        yield event


STRATEGY = register(Strategy(
    name="speculative_rejection",
    description="Speculative Rejection: `candidates` continuations share one prefill; every "
    "`segment` tokens the partial texts are scored and only the best `keep` fraction goes on; "
    "the best n finished ones are returned.",
    params=SpeculativeRejectionParams,
    run=run,
    streams="agreed-prefix",
))
