"""`speculative_rejection`: a large best-of-N that stops its weakest candidates early
(Speculative Rejection, arXiv 2410.20290).

`candidates` continuations branch from one prefill. Every `segment` tokens the rewards score
the partial texts (rewardmodels.partial: keyword coverage so far, the length reward's reachable
bound, regex and JSON prefix validity, classifiers on the text as it is) and only the best
`keep` fraction goes on (at least n; ties: see below); a candidate that finishes leaves the
race, scored on its final text, and the best n finished candidates are returned. The survivors' KV
is never copied: pruning only frees sequences (or, pausing, holds them).
Model tokens fall from candidates * max_tokens towards candidates * segment / (1 - keep).

Ties in the partial reward are broken by the population's order (the candidates are
independent samples, so it is a random pick), not by log-likelihood: early on most keyword
partial texts tie at 0 coverage, and the likelier ones are the generic ones, which use fewer
of the keywords (bench/prune_sim.py on keyword items 12-43: 0.935 with the log-likelihood
tie-break, 0.966 without, at the same tokens).

Once the rewards' ceiling is sure (segments.py: settle), the rest is dropped.

Pausing ties (`pause_ties`). A pick among tied candidates is a loss without evidence: the one
dropped was as good as the one kept, as far as the search could tell. With pausing, those a
pruning drops only to break a tie (partial reward equal to the last one kept) keep their KV
and wait; if every candidate still going finishes below the rewards' ceiling the pick was
unlucky, and the paused ones go on from where they stopped (pruned among themselves again)
until a finished one reaches the ceiling or none is left. The strictly worse are still dropped.
Where the ceiling is reachable and a text can be sure of it (keywords), a resumed search stops
at the first sure candidate, so pausing costs little and lets the search prune harder: it is
on by default there, with segment 2 and keep 0.55. Where the ceiling is never reached
(sentiment: VADER's compound score is never 1; reward models) every search would resume every
tie, so it is off by default. Pausing spends latency for tokens: a resumed search runs a
second train of rounds after the first (in eval-cpu-20261207-062417, four requests in flight,
44 of 96 keyword requests resumed: 17.6 rounds and 4.3 s each against 7 rounds and 1.7 s for
the others), so a latency-bound client sends `pause_ties: false`.

Defaults were chosen on items the evaluation does not report on (keyword items 13-56,
sentiment 13-24), counting model tokens with the engine's twin rows (engine/native/twins.py).
bench/prune_sim.py replays rules on a pool of 48 samples per item, 16 draws of 16
(prune-sim-20261207-061047): on keywords, segment 3, keep 0.7 without pausing is 0.023 below
best_of_16's reward at 0.423x its model tokens; pausing, segment 2, keep 0.55 0.012 below at
0.364x (keep 0.5: 0.020 at 0.346x, keep 0.6: 0.009 at 0.373x; segment 3, keep 0.55: 0.014 at
0.397x). On sentiment pausing costs 0.62x instead of 0.38x for 0.010 instead of 0.019 below.
Decoded for real on the 44 keyword tuning items, three draws (bench/segment_sweep.py,
segment-sweep-20261207-060549, -061059, -061157): 0.027, 0.005 and 0.000 below best_of_16 at
0.35x, 0.32x and 0.34x. Without pausing (sentiment), segment 3, keep 0.7: three draws
(segment-sweep-20261207-014513, -014929, -015222) 0.025 below at 0.364x.

Why ties, and not a better ranking. Without pausing, every rule replayed lay near one
frontier, about 0.025 below best_of_16 at 0.40x its tokens (prune-sim-20261207-015334),
whether it pruned every 1-3 tokens, kept whole ties, dropped what trailed the leader, or broke
coverage ties by the model's readiness to write a missing keyword or to end the sentence
(signals that order tied pairs by their final coverage barely better than chance: 0.47-0.60 of
pairs). A probe of the hidden state the server has at a boundary (bench/value_probe.py, ridge
value-probe-20261207-050724, a small network -050907) took segment 3, keep 0.6 from 0.044 to
0.035 below best_of_16 at 0.36x at best; 8 rollouts from each partial answer as the value
(bench/value_mc.py, value-mc-20261207-050548: not a rule to serve, the rollouts cost far more
than the search) reached 0.018. What decides is in the model's future samples, not in a
readout of its present state; pausing lets the search look at those samples, its own
survivors' finished texts, before it gives up on a tie.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from pydantic import Field

from alignserve.decoding.base import DecodeContext, DecodeEvent, Strategy, register
from alignserve.decoding.segments import (
    MAX_SEGMENT,
    PAUSE,
    Particle,
    SegmentParams,
    kept_count,
    run_search,
)
from alignserve.rewardmodels.compose import CEILING_TOLERANCE

# Defaults by measurement (see the module docstring): with pausing on, a tie costs only delay,
# so the search can prune harder and more often.
SEGMENT, KEEP = 3, 0.7
SEGMENT_PAUSING, KEEP_PAUSING = 2, 0.55


class SpeculativeRejectionParams(SegmentParams):
    segment: Annotated[int, Field(ge=1, le=MAX_SEGMENT)] | Literal["entropy"] | None = Field(
        None, description="Tokens per segment between two prunings, or \"entropy\": a segment "
        "ends before the first token (after at least 2) whose next-token entropy reaches "
        f"`entropy_threshold` (CARDS), at most `max_segment` tokens. Default {SEGMENT}, "
        f"{SEGMENT_PAUSING} when `pause_ties` is on.")
    keep: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False,
                               description="Fraction of the candidates kept at each pruning "
                               "(rounded up, at least n); 1 never prunes (best_of_n's result, "
                               f"by segments). Default {KEEP}, {KEEP_PAUSING} when `pause_ties` "
                               "is on.")
    pause_ties: bool | None = Field(
        None, description="Pause, instead of dropping, the candidates a pruning drops only to "
        "break a tie (partial reward equal to the last one kept; their KV stays), and resume "
        "them if every candidate still going finishes below the rewards' ceiling. Default: on "
        "when the rewards can tell that unfinished text will end at their ceiling (keywords), "
        "so that a resumed search stops at the first sure candidate; off otherwise (a ceiling "
        "that is never reached would resume every tie).")

    def resolved(self, reward) -> SpeculativeRejectionParams:
        """These keys with every default filled in for `reward` (the request's rewards)."""
        pausing = (bool(reward) and reward.can_be_sure) if self.pause_ties is None \
            else self.pause_ties
        return self.model_copy(update={
            "pause_ties": pausing,
            "segment": self.segment if self.segment is not None
            else (SEGMENT_PAUSING if pausing else SEGMENT),
            "keep": self.keep if self.keep is not None else (KEEP_PAUSING if pausing else KEEP)})


def prune(keep: float, n: int, pause_ties: bool = False):
    """The policy: the best `keep` fraction of the population by partial reward goes on, the
    rest is dropped; ties keep the population's order (a random pick: see the docstring).
    With `pause_ties`, those dropped only by that pick (tied with the last one kept) pause."""
    def policy(pool: list[Particle], round_index: int) -> list[int]:
        order = sorted(range(len(pool)), key=lambda i: -pool[i].reward)
        k = kept_count(len(pool), keep, n)
        cut = pool[order[k - 1]].reward
        tie = CEILING_TOLERANCE * max(1.0, abs(cut))  # totals are sums of a few floats
        copies = [0] * len(pool)
        for rank, i in enumerate(order):
            if rank < k:
                copies[i] = 1
            elif pause_ties and pool[i].reward >= cut - tie:
                copies[i] = PAUSE
        return copies
    return policy


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    p = ctx.request.params.resolved(ctx.request.reward)
    report = {"candidates": max(p.candidates, ctx.request.n), "segment": p.segment,
              "keep": p.keep, "pause_ties": p.pause_ties}
    async for event in run_search(ctx, p, prune(p.keep, ctx.request.n, p.pause_ties), report):
        yield event


STRATEGY = register(Strategy(
    name="speculative_rejection",
    description="Speculative Rejection: `candidates` continuations share one prefill; every "
    "`segment` tokens the partial texts are scored and only the best `keep` fraction goes on "
    "(with `pause_ties`, those dropped only to break a tie wait, and go on if every survivor "
    "finishes below the rewards' ceiling); the best n finished ones are returned.",
    params=SpeculativeRejectionParams,
    run=run,
    streams="agreed-prefix",
))
