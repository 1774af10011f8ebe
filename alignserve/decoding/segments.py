"""The segment-level search under `speculative_rejection` and `particle_filter`.

A population of partial answers (particles) branches from one prefill. Each round:

1. propose: every live particle samples one more segment (a fixed number of tokens, or up to
   the first token whose next-token entropy spikes, CARDS-style); particles of equal length are
   one `generate` call, so they step together in the engine's batch;
2. score: the request's rewards score every particle, unfinished ones by each reward's
   partial-text rule (rewardmodels.partial), finished ones on their final text;
3. settle: once n particles are sure of the reward's ceiling (finished at it, or going with
   a floor already at it: keywords all complete words), nothing else can beat
   them; every other particle is dropped, and of those still going only as many as are needed
   (the likeliest) run on;
4. select: the strategy's policy says how many copies of each particle go on (0: pruned;
   more than 1: its KV is forked, the copies share everything computed so far; PAUSE: held
   as it is, its KV kept, see below).

A particle that finishes (EOS, a stop, max_tokens) leaves the population for the archive,
where it is scored on its final text; the selection only ever compares particles still going,
so a short answer's final reward never crowds out partial ones that may still beat it. When no particle is left going
and fewer than n finished ones reached the reward's ceiling, the paused particles (if any) are
resumed: they become the population and the rounds go on (a settle drops them). The search
ends when no particle is left going or paused; the best `n` of the archive by final reward
(ties: mean token log-likelihood) are the choices.

A segment ends by `max_tokens` of its `generate` call, so its last sampled token was never fed
to the model (engines skip a finished sequence's last step). A particle that goes on is rolled
back by that one token (`truncate`) and the token is fed by one batched `extend` at the start
of the next round, after any fork: no token is computed twice. With entropy segments the
tokens after the chosen boundary are cut (they were computed, and count as model tokens).

Streaming (n == 1): the tokens every particle, going, paused or finished, agrees on are certain
(the winner is one of them) and are sent as they are agreed; the rest at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from alignserve.decoding.base import (
    ChoiceDelta,
    ChoiceFinal,
    DecodeContext,
    DecodeEvent,
    StrategyParams,
)
from alignserve.decoding.common import agreed_delta, common_prefix, format_logprobs
from alignserve.engine import compute_thread
from alignserve.engine.protocol import EngineError, SeqHandle
from alignserve.engine.text import IncrementalText

MAX_CANDIDATES, MAX_SEGMENT = 64, 256
MIN_ENTROPY_SEGMENT = 2  # an entropy boundary never makes a segment shorter than this
SEED_STRIDE = 7919  # each round's generate draws afresh from a seeded request


class SegmentParams(StrategyParams):
    """The keys both segment searches share."""

    candidates: int = Field(16, ge=1, le=MAX_CANDIDATES,
                            description="Partial answers the search starts with (they share "
                            "one prefill).")
    segment: Annotated[int, Field(ge=1, le=MAX_SEGMENT)] | Literal["entropy"] = Field(
        4, description="Tokens per segment between two selections, or \"entropy\": a segment "
        "ends before the first token (after at least 2) whose next-token entropy reaches "
        "`entropy_threshold` (CARDS), at most `max_segment` tokens.")
    max_segment: int = Field(16, ge=MIN_ENTROPY_SEGMENT, le=MAX_SEGMENT,
                             description="Longest entropy segment (segment \"entropy\" only).")
    entropy_threshold: float = Field(2.0, gt=0.0, le=20.0, allow_inf_nan=False,
                                     description="Entropy in nats that ends an entropy segment.")

    @property
    def shortest_segment(self) -> int:
        return MIN_ENTROPY_SEGMENT if self.segment == "entropy" else int(self.segment)

    @property
    def longest_segment(self) -> int:
        return int(self.max_segment) if self.segment == "entropy" else int(self.segment)


@dataclass
class Particle:
    seq: SeqHandle | None  # engine sequence (None once released)
    tokens: list[int] = field(default_factory=list)  # output tokens kept
    lps: list[float] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)  # logprob entries, when asked
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    pending: int | None = None  # the last kept token, to be fed before the next segment
    score: Any = None  # RewardScore: partial while unfinished, final once finished

    @property
    def logprob(self) -> float:
        return sum(self.lps)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, len(self.tokens))

    @property
    def reward(self) -> float:
        return 0.0 if self.score is None or self.score.total is None else float(self.score.total)

    def copy(self, seq: SeqHandle) -> Particle:
        return dataclasses.replace(self, seq=seq, tokens=list(self.tokens), lps=list(self.lps),
                                   entries=list(self.entries))


def rank_key(p: Particle) -> tuple[float, float]:
    """How particles compare: reward, then mean token log-likelihood."""
    return (p.reward, p.mean_logprob)


def entropy_boundary(entropies: Sequence[float], threshold: float,
                     shortest: int = MIN_ENTROPY_SEGMENT) -> int | None:
    """Tokens a segment keeps: the index of the first token at or after `shortest` whose
    distribution's entropy reaches `threshold` (the segment ends before it), None if none."""
    for j in range(shortest, len(entropies)):
        if entropies[j] >= threshold:
            return j
    return None


def row_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row's softmax (rows of -inf count as zero mass)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    p = lp.exp()
    return -(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(-1)


# What a strategy decides each round: copies per particle (same order; 0 prunes it, PAUSE
# holds it for a resumption).
Policy = Callable[[list[Particle], int], list[int]]
PAUSE = -1


class SegmentSearch:
    def __init__(self, ctx: DecodeContext, params: SegmentParams, policy: Policy) -> None:
        self.ctx, self.engine, self.req = ctx, ctx.engine, ctx.request
        self.p, self.policy = params, policy
        self.sp = self.req.sampling
        self.max_tokens = min(self.sp.max_tokens,
                              self.engine.max_model_len - len(self.req.prompt_ids))
        self.held: dict[Any, SeqHandle] = {}
        self.archive: list[Particle] = []  # finished particles, kept or not
        self.paused: list[Particle] = []  # held by the policy, resumed if the search runs dry
        self.paused_count = 0  # particles paused, over the whole search
        self.resumed = 0  # particles resumed
        self.rounds = 0
        self.pruned = 0  # particles dropped by the policy
        self.forked = 0  # copies made beyond the first
        self.cut_tokens = 0  # computed tokens cut at entropy boundaries
        self.population: list[int] = []  # population after each round's settle or selection
        self.settled_at: int | None = None  # the round after which the ceiling was sure

    # ---- engine bookkeeping --------------------------------------------------------------
    async def release(self, seqs: list[SeqHandle]) -> None:
        seqs = [s for s in seqs if s is not None and self.held.pop(s.key, None) is not None]
        if seqs:
            await self.engine.release(seqs)

    async def start(self) -> list[Particle]:
        k = max(self.p.candidates, self.req.n)
        root = await self.engine.prefill(self.req.prompt_ids, self.ctx.tally)
        self.held[root.key] = root
        if k == 1:
            return [Particle(root)]
        kids = await self.engine.fork(root, k)
        for s in kids:
            self.held[s.key] = s
        await self.release([root])
        return [Particle(s) for s in kids]

    # ---- one round -------------------------------------------------------------------------
    async def propose(self, live: list[Particle], segment: int) -> None:
        feed = [p for p in live if p.pending is not None]
        if feed:
            await self.engine.extend([p.seq for p in feed], [[p.pending] for p in feed],
                                     self.ctx.tally, kind="decode")
            for p in feed:
                p.pending = None
        by_len: dict[int, list[Particle]] = {}
        for p in live:
            by_len.setdefault(len(p.tokens), []).append(p)
        await asyncio.gather(*(self._segment(group, segment, i)
                               for i, group in enumerate(by_len.values())))
        self.rounds += 1

    async def _segment(self, group: list[Particle], segment: int, index: int) -> None:
        sp, n_out = self.sp, len(group[0].tokens)
        seed = None if sp.seed is None else sp.seed + SEED_STRIDE * self.rounds + 104729 * index
        params = dataclasses.replace(sp, max_tokens=min(self.max_tokens, n_out + segment),
                                     seed=seed, detokenize=False)
        entropies: dict[Any, list[float]] = {p.seq.key: [] for p in group}
        observer = None
        if self.p.segment == "entropy":
            def observer(seqs: list[SeqHandle], logits: torch.Tensor, inputs: Any) -> torch.Tensor:
                for h, e in zip(seqs, row_entropy(logits).tolist()):
                    if h.key in entropies:
                        entropies[h.key].append(e)
                return logits

        by_key = {p.seq.key: p for p in group}
        new: dict[Any, list[tuple[int, float, Any]]] = {k: [] for k in by_key}
        reasons: dict[Any, str | None] = {}
        gen = self.engine.generate([p.seq for p in group], params, observer=observer,
                                   tally=self.ctx.tally, kind="decode")
        async with contextlib.aclosing(gen):
            async for events in gen:
                for ev in events:
                    if ev.token_id >= 0:
                        new[ev.seq.key].append((ev.token_id, ev.logprob, ev.top_logprobs))
                    if ev.finished:
                        reasons[ev.seq.key] = ev.finish_reason
        for key, p in by_key.items():
            await self._keep(p, new[key], reasons.get(key), entropies[key])

    async def _keep(self, p: Particle, got: list[tuple[int, float, Any]], reason: str | None,
                    entropies: list[float]) -> None:
        """Record a particle's new segment: finished, or rolled back to what it keeps."""
        if reason == "abort" or not got:
            raise EngineError("the engine aborted a particle (out of KV memory?)")
        done = reason == "stop" or len(p.tokens) + len(got) >= self.max_tokens
        if not done and self.p.segment == "entropy":
            cut = entropy_boundary(entropies[: len(got)], self.p.entropy_threshold)
            if cut is not None and cut < len(got):
                self.cut_tokens += len(got) - cut
                got = got[:cut]
        want_lp = self.sp.logprobs is not None
        for tok, lp, top in got:
            p.tokens.append(tok)
            p.lps.append(lp)
            if want_lp:
                p.entries.append({"token_id": tok, "logprob": lp, "top": top or []})
        if done:
            p.finished = True
            p.finish_reason = "stop" if reason == "stop" else "length"
            p.text = p.seq.text
            self.archive.append(p)
            await self.release([p.seq])
            p.seq = None
            return
        # roll back the last kept token (never fed, or cut): the next round feeds it
        await self.engine.truncate(p.seq, p.seq.prompt_len + len(p.tokens) - 1)
        p.pending = p.tokens[-1]
        p.text = self.engine.tokenizer.decode(p.tokens, skip_special_tokens=True)

    async def score(self, particles: list[Particle]) -> None:
        """Score every particle: finished ones on their final text, the others by the
        rewards' partial-text rules."""
        reward = self.req.reward
        if reward is None or not len(reward):
            return
        done = [p for p in particles if p.finished]
        going = [p for p in particles if not p.finished]
        prompt = self.req.prompt_text
        start = time.perf_counter()
        if done:
            scores = await compute_thread.run(reward.score, [p.text for p in done], prompt)
            for p, s in zip(done, scores):
                p.score = s
        if going:
            left = [self.max_tokens - len(p.tokens) for p in going]
            scores = await compute_thread.run(reward.score_partial, [p.text for p in going],
                                              prompt, left)
            for p, s in zip(going, scores):
                p.score = s
        self.ctx.reward_seconds += time.perf_counter() - start
        self.ctx.candidates_scored += len(particles)

    async def settle(self, pool: list[Particle]) -> list[Particle]:
        """Drop what can no longer win (step 3 of the module docstring); returns the particles
        that go on."""
        reward = self.req.reward
        if not reward or reward.ceiling is None or not pool:
            return pool
        need = self.req.n - sum(1 for p in self.archive if reward.reaches_ceiling(p.score))
        flags = reward.sure_of_ceiling([p.text for p in pool], self.req.prompt_text)
        sure = [p for p, ok in zip(pool, flags) if ok]
        if need > len(sure):
            return pool
        going = sorted(sure, key=lambda p: p.mean_logprob, reverse=True)[: max(0, need)]
        kept = {id(p) for p in going}
        drop = [p for p in pool if id(p) not in kept] + self.paused
        self.paused = []
        self.pruned += len(drop)
        await self.release([p.seq for p in drop])
        for p in drop:
            p.seq = None
        self.settled_at = self.rounds
        self.population.append(len(going))
        return going

    async def select(self, pool: list[Particle]) -> list[Particle]:
        """Apply the policy to the particles still going: drop, keep or fork each one; returns
        the new population."""
        copies = self.policy(pool, self.rounds)
        out: list[Particle] = []
        drop: list[SeqHandle] = []
        forks: list[tuple[Particle, int]] = []
        for p, c in zip(pool, copies):
            if c == PAUSE:
                self.paused.append(p)
                self.paused_count += 1
            elif c <= 0:
                self.pruned += 1
                if p.seq is not None:
                    drop.append(p.seq)
                    p.seq = None
            elif c == 1:
                out.append(p)
            else:
                forks.append((p, c))
        await self.release(drop)
        for p, c in forks:
            kids = await self.engine.fork(p.seq, c)
            for s in kids:
                self.held[s.key] = s
            self.forked += c - 1
            await self.release([p.seq])
            out.extend(p.copy(s) for s in kids)
        self.population.append(len(out))
        return out

    async def resume(self) -> list[Particle]:
        """Once no particle is left going: the paused ones, as the new population, unless n
        finished ones reached the ceiling already (then they are dropped)."""
        paused, self.paused = self.paused, []
        reward = self.req.reward
        if reward and reward.ceiling is not None and sum(
                1 for p in self.archive if reward.reaches_ceiling(p.score)) >= self.req.n:
            self.pruned += len(paused)
            await self.release([p.seq for p in paused])
            return []
        self.resumed += len(paused)
        return paused

    def report(self, strategy_keys: dict[str, Any]) -> dict[str, Any]:
        return {"rounds": self.rounds, "pruned": self.pruned, "forked": self.forked,
                "population": self.population, "cut_tokens": self.cut_tokens,
                "finished": len(self.archive), "settled_at": self.settled_at,
                "paused": self.paused_count, "resumed": self.resumed, **strategy_keys}



def _choice(engine: Any, index: int, p: Particle, want_logprobs: bool,
            streamed: bool) -> ChoiceFinal:
    return ChoiceFinal(
        index=index, text=p.text, token_ids=list(p.tokens),
        finish_reason=p.finish_reason or "stop",
        reward=None if p.score is None else p.score.total,
        components={} if p.score is None else dict(p.score.components),
        cumulative_logprob=p.logprob,
        logprobs=format_logprobs(engine, p.entries) if want_logprobs else [],
        streamed=streamed)


async def run_search(ctx: DecodeContext, params: SegmentParams, policy: Policy,
                     report_keys: dict[str, Any]) -> AsyncIterator[DecodeEvent]:
    """The whole search as a strategy's event stream (see the module docstring)."""
    req, engine = ctx.request, ctx.engine
    search = SegmentSearch(ctx, params, policy)
    stream = req.stream and req.n == 1
    want_logprobs = req.sampling.logprobs is not None
    shown = IncrementalText(engine.tokenizer, req.prompt_ids, req.sampling.stop,
                            include_stop=req.sampling.include_stop_str_in_output)
    sent = 0
    try:
        pool = await search.start()
        while pool:
            # nothing left to compare: the last particle runs to its end in one call
            alone = len(pool) == 1 and len(search.archive) + 1 >= req.n
            segment = search.max_tokens if alone else params.longest_segment
            await search.propose(pool, segment)
            await search.score(pool)
            pool = [p for p in pool if not p.finished]  # finished ones went to the archive
            pool = await search.settle(pool)
            if len(pool) > 1:
                pool = await search.select(pool)
            if not pool:
                pool = await search.resume()
            if stream:
                everyone = pool + search.paused + search.archive
                agreed = common_prefix([p.tokens for p in everyone])
                if agreed > sent:
                    leader = everyone[0]
                    yield agreed_delta(engine, shown, leader, sent, agreed, want_logprobs)
                    sent = agreed
        best = sorted(search.archive, key=rank_key, reverse=True)[: req.n]
        for i, p in enumerate(best):
            if stream and i == 0:
                toks = p.tokens[sent:]
                for t in toks:
                    shown.push(t)
                lps = format_logprobs(engine, p.entries[sent:]) if want_logprobs else []
                yield ChoiceDelta(0, shown.delta(final=True), toks, lps)
            yield _choice(engine, i, p, want_logprobs, streamed=stream and i == 0)
        yield ctx.summary(sum(len(p.tokens) for p in best), search=search.report(report_keys))
    finally:
        await engine.release(list(search.held.values()))


def kept_count(size: int, keep: float, n: int) -> int:
    """How many of `size` particles a selection keeps: the fraction `keep` rounded up, at least
    n (the choices), at most all of them."""
    k = max(n, math.ceil(size * keep))
    return min(size, k)
