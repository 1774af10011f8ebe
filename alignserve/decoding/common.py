"""Pieces every strategy uses: branching the prompt, scoring text, building choices."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

from alignserve.decoding.base import ChoiceDelta, ChoiceFinal, DecodeContext, DecodeEvent
from alignserve.engine import compute_thread
from alignserve.engine.protocol import SeqHandle
from alignserve.engine.steering import Steering


async def take_root(ctx: DecodeContext) -> SeqHandle:
    """The request's prompt as a sequence with pending logits: the one the server computed
    already (ctx.root, now the caller's to release), or a fresh prefill."""
    root, ctx.root = ctx.root, None
    if root is not None:
        return root
    return await ctx.engine.prefill(ctx.request.prompt_ids, ctx.tally)


async def prefill_branches(ctx: DecodeContext, k: int) -> list[SeqHandle]:
    """Prefill the prompt once and branch it k ways; the k branches share its KV."""
    engine = ctx.engine
    root = await take_root(ctx)
    if k == 1:
        return [root]
    try:
        return await engine.fork(root, k)
    finally:
        await engine.release([root])


async def score_texts(ctx: DecodeContext, texts: list[str]):
    """Score candidate texts with the request's composed reward in one batched call."""
    reward = ctx.request.reward
    if reward is None or not len(reward):
        return [None] * len(texts)
    start = time.perf_counter()
    scores = await compute_thread.run(reward.score, texts, ctx.request.prompt_text)
    ctx.reward_seconds += time.perf_counter() - start
    ctx.candidates_scored += len(texts)
    return scores


def format_logprobs(engine, entries: list[dict]) -> list[dict]:
    """Engine logprob entries -> [{token, token_id, logprob, bytes, top_logprobs: [...]}]."""
    out = []
    for e in entries:
        tok = engine.tokenizer.decode([e["token_id"]])
        out.append({
            "token": tok,
            "token_id": e["token_id"],
            "logprob": e["logprob"],
            "bytes": list(tok.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := engine.tokenizer.decode([i])), "token_id": i, "logprob": lp,
                 "bytes": list(t.encode("utf-8"))}
                for i, lp in e.get("top") or []
            ],
        })
    return out


def final_choice(ctx: DecodeContext, index: int, seq: SeqHandle, score, streamed: bool) -> ChoiceFinal:
    return ChoiceFinal(
        index=index,
        text=seq.text,
        token_ids=list(seq.output_ids),
        finish_reason=seq.finish_reason or "stop",
        reward=None if score is None else score.total,
        components={} if score is None else dict(score.components),
        cumulative_logprob=seq.cumulative_logprob,
        logprobs=format_logprobs(ctx.engine, seq.logprobs) if ctx.request.sampling.logprobs is not None else [],
        streamed=streamed,
    )


async def stream_choices(ctx: DecodeContext, seqs: list[SeqHandle],
                         steering: Steering | None = None) -> AsyncIterator[DecodeEvent]:
    """Generate `seqs` (steered by `steering`, if any) as choices 0..n-1: their tokens as
    deltas, each scored once finished."""
    engine = ctx.engine
    index = {s.key: i for i, s in enumerate(seqs)}
    want_logprobs = ctx.request.sampling.logprobs is not None
    gen = engine.generate(seqs, ctx.request.sampling, steering=steering, tally=ctx.tally)
    try:
        async for events in gen:
            done = []
            for ev in events:
                lp = (format_logprobs(engine, ev.seq.logprobs[-1:])
                      if want_logprobs and ev.token_id >= 0 else [])
                if ev.text_delta or lp:
                    yield ChoiceDelta(index[ev.seq.key], ev.text_delta, [ev.token_id], lp)
                if ev.finished:
                    done.append(ev.seq)
            if done:
                scores = await score_texts(ctx, [s.text for s in done])
                for seq, score in zip(done, scores):
                    yield final_choice(ctx, index[seq.key], seq, score, streamed=True)
    finally:
        await gen.aclose()


async def best_of(ctx: DecodeContext, seqs: list[SeqHandle], steering: Steering | None = None,
                  pick=None) -> AsyncIterator[DecodeEvent]:
    """Decode every candidate (steered by `steering`, if any), score them in one batch and return
    the best n: by total reward, then log-likelihood (by log-likelihood alone without rewards).
    `pick(rewards, n)`, if given, chooses the n indices instead (best_of_n's soft selection).
    The winners stream whole, once chosen. Shared by best_of_n and vas with `candidates`."""
    req = ctx.request
    # Candidates are read once finished: the engine may decode each once instead of per token.
    sampling = dataclasses.replace(req.sampling, detokenize=False)
    async for _ in ctx.engine.generate(seqs, sampling, steering=steering, tally=ctx.tally):
        pass
    scores = await score_texts(ctx, [s.text for s in seqs])
    ctx.candidates_scored = max(ctx.candidates_scored, len(seqs))  # ranked, rewards or not

    def rank(i: int) -> tuple[float, float]:
        total = scores[i].total if scores[i] is not None else None
        return (total or 0.0, seqs[i].cumulative_logprob)

    if pick is None:
        best = sorted(range(len(seqs)), key=rank, reverse=True)[: req.n]
    else:
        best = pick([rank(i)[0] for i in range(len(seqs))], req.n)
    for out_index, i in enumerate(best):
        choice = final_choice(ctx, out_index, seqs[i], scores[i], streamed=req.stream)
        if req.stream:
            yield ChoiceDelta(out_index, choice.text, choice.token_ids, choice.logprobs)
        yield choice
    yield ctx.summary(sum(seqs[i].num_output for i in best))


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares (0 for none given)."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def agreed_delta(engine, shown, leader, sent: int, agreed: int, want_logprobs: bool) -> ChoiceDelta:
    """Choice 0's next delta in a search that streams what every branch agrees on: tokens
    sent..agreed, read from `leader` (any branch holding them), pushed through `shown`."""
    toks = leader.tokens[sent:agreed]
    for t in toks:
        shown.push(t)
    lps = format_logprobs(engine, leader.entries[sent:agreed]) if want_logprobs else []
    return ChoiceDelta(0, shown.delta(final=False), toks, lps)
