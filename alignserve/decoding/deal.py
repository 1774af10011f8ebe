"""`deal`: heuristic-guided lookahead search (DeAL, arXiv 2402.06147).

The state is the prompt plus the committed tokens. Each step, for every live beam:

1. actions: the beam's `top_k` next tokens by the model's log-probs (EOS, and any stop token id,
   is an action: choosing it finishes the beam);
2. every non-stop action becomes a child: `fork` the beam per action (the children share its KV)
   and feed each child its action (one batched `extend` for all beams' children);
3. each child is rolled out `lookahead` tokens greedily (one `generate` over all children,
   kind "lookahead"), and the lookahead-completed texts, together with the texts of the beams
   an EOS action finishes, are scored by the request's composed reward in one batched call;
4. candidates rank by  mean logprob(committed tokens) + lambda * reward  and the best `beam`
   survive, finished beams included (a finished beam is scored on its final text and stays in
   the competition until something outranks it). The mean, not the paper's sum: candidates
   commit different numbers of tokens, and a sum favours stopping (an EOS action commits one
   token, a continuing candidate `commit`), so a short beam missing a keyword would win;
5. survivors are rolled back to their committed length (`truncate`; the rollout lives in the
   child's own KV leaf). With `commit` > 1 a survivor keeps its action plus the first
   `commit - 1` tokens of its rollout (fewer steps, coarser search).

The search ends when every surviving beam is finished (EOS, a stop string or stop token id, or
max_tokens); the `n` best are returned. With no rewards it is beam search by (length-
normalized) log-likelihood. Rollouts stop where the request stops (stop strings, stop ids,
max_tokens); they are greedy (the search is deterministic, the sampling fields do not apply)
unless `rollout` is "sample": then they sample with the request's temperature, top_p, top_k,
min_p and seed.

Defaults (beam 3, top_k 6, lookahead 8, commit 8, lambda 4) were chosen by measurement on the
evaluation's keyword task (bench/results, issue 3's note; top_k 4 instead of 3 by
bench/deal_sweep.py on items 12-27, issue 17: coverage 0.953 -> 0.969 at 144 -> 177 model
tokens, where lambda 8 changed nothing; then top_k 6: 0.969 -> 1.000 at 176 -> 240, where
lookahead 12 or beam 3 stayed at 0.969 for 217-229; then beam 3 on items 12-55: 0.960 ->
0.975 at 224 -> 294, where top_k 8 gave 0.955 at 284 and lookahead 12 0.946 at 283 on items
28-55, deal-sweep-20261206-213749 and -214455: a third beam keeps a sentence that has not
finished alive beside a short one that finished a keyword short): committing the scored block instead
of one token cuts the model tokens per output token from beam*top_k*(lookahead+1) to
beam*top_k*(lookahead+1)/commit, which is what lets the search beat best_of_n at equal model
tokens; commit 1 is the paper's finer, costlier token-by-token search.

What a candidate is scored on: its lookahead-completed text (committed tokens, action, rollout;
keyword rewards match whole words of it), with one exception: the `length` reward is never
measured on unfinished text. For a candidate whose completion has not finished, the length
component is the best value any finished text reachable from it could get (word counts from its
current count to that count plus the tokens max_tokens still allows). That bound does not depend
on where the rollout was cut, so an unfinished candidate never wins by having been cut at the
right length, and finishing short of the target never outranks continuing toward it (with a
negative weight the bound is the worst reachable value). A text that finished (EOS, a stop, or
max_tokens) is scored as it is; so is every finished beam, on its final text.

Streaming (n == 1): tokens every surviving beam agrees on (their common prefix; finished beams
count, as they can still win) are sent as they are agreed; the rest when the search ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from alignserve.decoding import kv
from alignserve.decoding.base import (
    ChoiceDelta,
    ChoiceFinal,
    DecodeContext,
    DecodeEvent,
    DecodeRequest,
    Strategy,
    StrategyInputError,
    StrategyParams,
    register,
)
from alignserve.decoding.common import (
    agreed_delta,
    common_prefix,
    format_logprobs,
    score_texts,
    take_root,
)
from alignserve.engine.grammar import mask_logits
from alignserve.engine.protocol import Engine, SamplingParams, SeqHandle
from alignserve.engine.text import IncrementalText
from alignserve.rewardmodels.lexical import LengthReward, count_words

MAX_TOP_K, MAX_LOOKAHEAD, MAX_BEAM, MAX_COMMIT = 16, 64, 8, 16


class DealParams(StrategyParams):
    top_k: int = Field(6, ge=1, le=MAX_TOP_K,
                       description="Actions per beam and step: the most likely next tokens.")
    lookahead: int = Field(8, ge=0, le=MAX_LOOKAHEAD,
                           description="Tokens each action is rolled out (greedily) before its "
                           "text is scored.")
    beam: int = Field(3, ge=1, le=MAX_BEAM,
                      description="Beams kept each step; n must not exceed it.")
    lambda_: float = Field(4.0, ge=0.0, le=1e6, allow_inf_nan=False, alias="lambda",
                           description="Weight of the reward against the log-likelihood "
                           "(rank = mean token logprob + lambda * reward).")
    rollout: Literal["greedy", "sample"] = Field(
        "greedy", description="How an action is rolled out: greedily (the search is "
        "deterministic), or sampled with the request's temperature, top_p, top_k, min_p and "
        "seed (lookaheads that differ beyond their first token).")
    commit: int = Field(8, ge=1, le=MAX_COMMIT,
                        description="Tokens committed per step (the action plus commit-1 "
                        "rollout tokens, at most the lookahead): more is cheaper and coarser; "
                        "1 is the paper's token-by-token search.")


def check(req: DecodeRequest, engine: Engine, resources: Any) -> None:
    if req.n > req.params.beam:
        raise StrategyInputError(f"n ({req.n}) must not exceed alignment.beam "
                                 f"({req.params.beam}): the best n beams are returned",
                                 "alignment.beam")


# ---- the search's arithmetic (pure functions) ----------------------------------------------

def top_actions(next_logprobs: torch.Tensor, top_k: int,
                banned: Sequence[int] = ()) -> list[tuple[int, float]]:
    """The top_k (token, log-prob) actions of one beam, best first; `banned` tokens (stop ids
    before min_tokens) and impossible ones (-inf) are not actions."""
    lp = next_logprobs.float()
    if banned:
        lp = lp.clone()
        lp[list(banned)] = float("-inf")
    vals, ids = torch.topk(lp, min(top_k, lp.shape[-1]))
    return [(i, v) for i, v in zip(ids.tolist(), vals.tolist()) if v != float("-inf")]


def rank_score(logprob: float, n_tokens: int, reward: float | None, lam: float) -> float:
    """What candidates rank by: the committed tokens' mean log-likelihood + lambda * reward.

    The mean, not the sum: candidates of one step commit different numbers of tokens (an EOS
    action one, a continuing one `commit`), and a sum would favour whichever stops first, so
    a finished beam missing a keyword would beat every candidate still going for it."""
    return logprob / max(1, n_tokens) + lam * (reward or 0.0)


def select(ranks: Sequence[float], beam: int) -> list[int]:
    """Indices of the `beam` best ranks, best first (ties: the earlier candidate)."""
    order = sorted(range(len(ranks)), key=lambda i: (-ranks[i], i))
    return order[:beam]


def split_commit(action: int, action_lp: float, rollout: Sequence[int],
                 rollout_lps: Sequence[float], commit: int,
                 stop_ids: Sequence[int] | frozenset[int]) -> tuple[list[int], list[float], bool]:
    """The tokens a candidate commits: its action, then up to commit-1 rollout tokens, ending at
    a stop token id if one comes first. Returns (tokens, their log-probs, ended by a stop id)."""
    tokens, lps = [action], [action_lp]
    if action in stop_ids:
        return tokens, lps, True
    for tok, lp in zip(rollout[: commit - 1], rollout_lps[: commit - 1]):
        tokens.append(tok)
        lps.append(lp)
        if tok in stop_ids:
            return tokens, lps, True
    return tokens, lps, False


def length_bound(reward: LengthReward, words: int, more_words: int, weight: float) -> float:
    """Best (worst, for a negative weight) value the finished text could reach: the length
    reward's own partial-text bound (LengthReward.reachable)."""
    return reward.reachable(words, more_words, optimistic=weight >= 0)


def heuristic_reward(reward: Any, score: Any, text: str, finished: bool,
                     tokens_left: int) -> float | None:
    """The reward a candidate ranks by: its score's total, except that for an unfinished text
    each `length` component is replaced by its bound (see the module docstring)."""
    if score is None or score.total is None:
        return None
    if finished or reward is None:
        return score.total
    total = score.total
    words = None
    for item in getattr(reward, "items", []):
        if isinstance(item.reward, LengthReward):
            if words is None:
                words = count_words(text)
            bound = length_bound(item.reward, words, tokens_left, item.weight)
            total += item.weight * (bound - score.components[item.label])
    return total


# ---- the search ----------------------------------------------------------------------------

@dataclass
class Beam:
    tokens: list[int]  # committed output tokens
    logprob: float  # their summed log-probs
    text: IncrementalText  # their text (stop strings cut)
    entries: list[dict] = field(default_factory=list)  # logprob entries, when asked
    seq: SeqHandle | None = None  # engine sequence: prompt + tokens (live beams)
    next_logprobs: torch.Tensor | None = None  # next-token log-probs (live beams)
    finished: bool = False
    finish_reason: str | None = None
    score: Any = None  # RewardScore of the final text (finished beams)
    rank: float = 0.0
    invalid: bool = False  # a candidate that cannot go on (never survives)
    grammar: Any = None  # the request's grammar matcher at `tokens` (structured outputs)


@dataclass
class _Cand:
    parent: Beam
    action: int
    action_lp: float
    child: SeqHandle | None = None
    rollout: list[int] = field(default_factory=list)
    rollout_lps: list[float] = field(default_factory=list)
    rollout_stopped: bool = False  # the rollout ended at a stop (not at its length)


def grammar_allowed(beam: Beam) -> torch.Tensor:
    """The beam's next-token log-probs with what its grammar forbids at -inf: DeAL's actions
    are the top_k of these, so every action (and every committed token) is allowed."""
    if beam.grammar is None:
        return beam.next_logprobs
    return mask_logits([beam.grammar], beam.next_logprobs.float().view(1, -1).clone())[0]


def committed_grammar(parent: Any, tokens: Sequence[int]) -> Any:
    """The parent beam's matcher forked and advanced over a candidate's committed tokens;
    None when there is no grammar or a token breaks it (the candidate is then invalid)."""
    if parent is None:
        return None
    (state,) = parent.fork(1)
    for tok in tokens:
        if state.terminated or not state.try_accept(tok):
            return None
    return state


def _clone(text: IncrementalText) -> IncrementalText:
    out = copy.copy(text)
    out.ids = list(text.ids)
    return out


def _top(lp: torch.Tensor, k: int | None) -> list[tuple[int, float]]:
    if not k:
        return []
    vals, ids = torch.topk(lp, min(k, lp.shape[-1]))
    return list(zip(ids.tolist(), vals.tolist()))


class _Search:
    def __init__(self, ctx: DecodeContext) -> None:
        self.ctx, self.engine, self.req = ctx, ctx.engine, ctx.request
        self.p: DealParams = self.req.params
        sp = self.req.sampling
        self.sp = sp
        self.max_tokens = min(sp.max_tokens, self.engine.max_model_len - len(self.req.prompt_ids))
        self.stop_ids = frozenset(sp.stop_token_ids) | (
            frozenset() if sp.ignore_eos else frozenset(self.engine.eos_token_ids))
        self.held: dict[Any, SeqHandle] = {}  # every engine sequence not yet released
        self.rollouts = 0  # rollout batches so far (seeds each sampled batch differently)

    async def release(self, seqs: list[SeqHandle]) -> None:
        for s in seqs:
            self.held.pop(s.key, None)
        if seqs:
            await self.engine.release(seqs)

    async def start(self) -> list[Beam]:
        root = await take_root(self.ctx)
        self.held[root.key] = root
        first = torch.log_softmax((await self.engine.logits([root]))[0].float(), dim=-1)
        text = IncrementalText(self.engine.tokenizer, self.req.prompt_ids, self.sp.stop,
                               include_stop=self.sp.include_stop_str_in_output)
        grammar = self.sp.grammar.new_state() if self.sp.grammar is not None else None
        return [Beam([], 0.0, text, seq=root, next_logprobs=first, grammar=grammar)]

    async def step(self, beams: list[Beam]) -> list[Beam]:
        p, sp = self.p, self.sp
        live = [b for b in beams if not b.finished]
        done = [b for b in beams if b.finished]
        n_out = len(live[0].tokens)
        remaining = self.max_tokens - n_out  # >= 1 for a live beam
        rollout_len = min(p.lookahead, remaining - 1)
        commit = min(p.commit, max(1, rollout_len))
        banned = sorted(self.stop_ids) if n_out < sp.min_tokens else ()

        cands: list[_Cand] = []
        for b in live:
            # min_tokens yields to a finished grammar (the stop token is all it allows)
            ban = () if b.grammar is not None and b.grammar.completed else banned
            for tok, lp in top_actions(grammar_allowed(b), p.top_k, ban):
                cands.append(_Cand(b, tok, lp))
        expand = [c for c in cands if c.action not in self.stop_ids and remaining > 1]
        next_lp: dict[Any, torch.Tensor] = {}
        captured: dict[Any, dict] = {}
        if expand:
            await self._expand(live, expand, next_lp, captured, n_out, rollout_len, commit)

        # what each candidate commits, and the text its completion is scored on
        new_beams: list[Beam] = []
        texts: list[str] = []
        complete: list[bool] = []
        left: list[int] = []
        for c in cands:
            beam, scored, finished_completion, n_total = self._commit(c, commit, captured,
                                                                      next_lp)
            new_beams.append(beam)
            texts.append(scored)
            complete.append(finished_completion)
            left.append(self.max_tokens - n_total)
        scores = await score_texts(self.ctx, texts)
        reward = self.req.reward
        for beam, s, text, fin, tl in zip(new_beams, scores, texts, complete, left):
            h = heuristic_reward(reward, s, text, fin, tl)
            beam.rank = rank_score(beam.logprob, len(beam.tokens), h, p.lambda_)
            if beam.finished:
                beam.score = s

        pool = done + [b for b in new_beams if not b.invalid]
        if not pool:
            raise RuntimeError("deal: no candidate could go on")
        keep = select([b.rank for b in pool], p.beam)
        survivors = [pool[i] for i in keep]
        kept = {id(b) for b in survivors}
        # roll the surviving children back to what they commit; free everything else
        drop = [b.seq for b in live if b.seq is not None]
        for b in new_beams:
            if b.seq is None:
                continue
            if id(b) in kept and not b.finished:
                await self.engine.truncate(b.seq, len(self.req.prompt_ids) + len(b.tokens))
            else:
                drop.append(b.seq)
                b.seq = None
        for b in live:
            b.seq = None
        await self.release(drop)
        return survivors

    async def _expand(self, live, expand, next_lp, captured, n_out, rollout_len, commit):
        engine, ctx, sp = self.engine, self.ctx, self.sp
        per_beam: dict[int, list[_Cand]] = {}
        for c in expand:
            per_beam.setdefault(id(c.parent), []).append(c)
        groups = list(per_beam.values())

        async def fork_held(parent: SeqHandle, n: int) -> list[SeqHandle]:
            # record the children the moment the fork returns: a cancellation arriving while
            # the other forks are still running must still find (and release) these
            kids = await engine.fork(parent, n)
            for k in kids:
                self.held[k.key] = k
            return kids

        forks = await asyncio.gather(*(fork_held(g[0].parent.seq, len(g)) for g in groups),
                                     return_exceptions=True)
        for kids in forks:
            if isinstance(kids, BaseException):
                raise kids
        for g, kids in zip(groups, forks):
            for c, k in zip(g, kids):
                c.child = k
        children = [c.child for c in expand]
        await engine.extend(children, [[c.action] for c in expand], ctx.tally, kind="decode")
        if commit == 1:
            rows = torch.log_softmax((await engine.logits(children)).float(), dim=-1)
            for k, row in zip(children, rows):
                next_lp[k.key] = row
        if rollout_len <= 0:
            return
        start = n_out + 1
        want_top = sp.logprobs or 0

        def capture(seqs: list[SeqHandle], logits: torch.Tensor, inputs) -> torch.Tensor:
            for h, row in zip(seqs, logits):
                j = h.num_output - start  # index of the rollout token being chosen
                if j == commit - 1:
                    captured.setdefault(h.key, {})["next"] = torch.log_softmax(row.float(), -1)
                elif j < commit - 1 and want_top:
                    lp = torch.log_softmax(row.float(), -1)
                    captured.setdefault(h.key, {})[j] = _top(lp, want_top)
            return logits

        sampled = self.p.rollout == "sample" and not sp.greedy
        self.rollouts += 1
        params = SamplingParams(temperature=sp.temperature if sampled else 0.0,
                                top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
                                # a seeded request is reproducible; each step draws afresh
                                seed=None if sp.seed is None else sp.seed + 7919 * self.rollouts,
                                max_tokens=start + rollout_len,
                                min_tokens=sp.min_tokens, stop=sp.stop,
                                include_stop_str_in_output=sp.include_stop_str_in_output,
                                stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
                                # rollouts follow the grammar too: each child's matcher is
                                # the engine's, forked with it and rolled back by truncate
                                grammar=sp.grammar,
                                detokenize=False)  # rollouts are scored on deal's own text
        by_key = {c.child.key: c for c in expand}
        gen = engine.generate(children, params, observer=capture if commit > 1 else None,
                              tally=ctx.tally, kind="lookahead")
        async with contextlib.aclosing(gen):
            async for events in gen:
                for ev in events:
                    c = by_key[ev.seq.key]
                    if ev.token_id >= 0:
                        c.rollout.append(ev.token_id)
                        c.rollout_lps.append(ev.logprob)
                    if ev.finished and ev.finish_reason == "stop":
                        c.rollout_stopped = True
        for c in expand:
            if c.child.key in captured and "next" in captured[c.child.key]:
                next_lp[c.child.key] = captured[c.child.key]["next"]

    def _commit(self, c: _Cand, commit: int, captured, next_lp):
        """The beam a candidate would become, the text its completion is scored on, whether
        that completion is finished, and its length in tokens."""
        parent, sp = c.parent, self.sp
        tokens, lps, stopped = split_commit(c.action, c.action_lp, c.rollout, c.rollout_lps,
                                            commit, self.stop_ids)
        text = _clone(parent.text)
        kept = 0
        for tok in tokens:
            kept += 1
            if text.push(tok) is not None:
                stopped = True
                break
        tokens, lps = tokens[:kept], lps[:kept]
        entries = list(parent.entries)
        if sp.logprobs is not None:
            for j, (tok, lp) in enumerate(zip(tokens, lps)):
                if j == 0:
                    top = _top(parent.next_logprobs, sp.logprobs)
                else:
                    top = captured.get(c.child.key, {}).get(j - 1, []) if c.child else []
                entries.append({"token_id": tok, "logprob": lp, "top": top})
        all_tokens = parent.tokens + tokens
        grammar = committed_grammar(parent.grammar, tokens)
        beam = Beam(all_tokens, parent.logprob + sum(lps), text, entries, seq=c.child,
                    grammar=grammar)
        if parent.grammar is not None and grammar is None:  # outside the grammar: never kept
            beam.invalid = True
        if stopped or len(all_tokens) >= self.max_tokens:
            beam.finished = True
            beam.finish_reason = "stop" if stopped else "length"
            return beam, text.text, True, len(all_tokens)
        beam.next_logprobs = next_lp.get(c.child.key) if c.child is not None else None
        if beam.next_logprobs is None:  # the engine saw a stop this text did not: drop it
            beam.invalid = True
        # the completion: the rest of the rollout after the committed tokens
        full = _clone(text)
        n_total = len(all_tokens)
        finished = False
        for tok in c.rollout[kept - 1:]:
            n_total += 1
            if full.push(tok) is not None or tok in self.stop_ids:
                finished = True
                break
        finished = finished or c.rollout_stopped or n_total >= self.max_tokens
        return beam, full.text, finished, n_total



async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    req, engine = ctx.request, ctx.engine
    check(req, engine, ctx.resources)
    search = _Search(ctx)
    stream = req.stream and req.n == 1
    want_logprobs = req.sampling.logprobs is not None
    shown = IncrementalText(engine.tokenizer, req.prompt_ids, req.sampling.stop,
                            include_stop=req.sampling.include_stop_str_in_output)
    sent = 0  # tokens of choice 0 already streamed
    try:
        beams = await search.start()
        while any(not b.finished for b in beams):
            beams = await search.step(beams)
            if stream:
                agreed = common_prefix([b.tokens for b in beams])
                if agreed > sent:
                    yield agreed_delta(engine, shown, beams[0], sent, agreed, want_logprobs)
                    sent = agreed
        best = sorted(beams, key=lambda b: -b.rank)[: req.n]
        for i, b in enumerate(best):
            if stream and i == 0:
                toks = b.tokens[sent:]
                for t in toks:
                    shown.push(t)
                lps = format_logprobs(engine, b.entries[sent:]) if want_logprobs else []
                yield ChoiceDelta(0, shown.delta(final=True), toks, lps)
            yield ChoiceFinal(
                index=i, text=b.text.text, token_ids=list(b.tokens),
                finish_reason=b.finish_reason or "stop",
                reward=None if b.score is None else b.score.total,
                components={} if b.score is None else dict(b.score.components),
                cumulative_logprob=b.logprob,
                logprobs=format_logprobs(engine, b.entries) if want_logprobs else [],
                streamed=stream and i == 0,
            )
        yield ctx.summary(sum(len(b.tokens) for b in best))
    finally:
        await engine.release(list(search.held.values()))


def kv_slots(decode: DecodeRequest, prompt: int, tokens: int, page: int) -> int:
    """Peak KV (decoding.kv): each step seals the tokens it commits into a segment of its own
    per beam, and every action's rollout is alive at once."""
    p = decode.params
    beam, top_k, lookahead = int(p.beam), int(p.top_k), int(p.lookahead)
    commit = max(1, int(p.commit))
    committed = beam * math.ceil(tokens / commit) * kv.pages(commit, page) * page
    children = beam * top_k * kv.branch(1 + lookahead, page)
    return kv.branch(prompt, page) + committed + children


STRATEGY = register(Strategy(
    name="deal",
    description="DeAL lookahead search: each step the top_k next tokens of every beam are rolled "
    "out `lookahead` tokens, scored by the rewards, ranked by logprob + lambda * reward; the best "
    "`beam` survive (EOS is an action; finished beams stay in the competition).",
    params=DealParams,
    run=run,
    streams="agreed-prefix",
    check=check,
    kv_slots=kv_slots,
))
