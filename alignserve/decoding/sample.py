"""`sample`: plain decoding of n choices that share the prompt; rewards only report."""

from __future__ import annotations

from collections.abc import AsyncIterator

from alignserve.decoding.base import (
    ChoiceDelta,
    DecodeContext,
    DecodeEvent,
    Strategy,
    StrategyParams,
    register,
)
from alignserve.decoding.common import final_choice, format_logprobs, prefill_branches, score_texts


class SampleParams(StrategyParams):
    pass


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    req, engine = ctx.request, ctx.engine
    seqs = await prefill_branches(ctx, req.n)
    index = {s.key: i for i, s in enumerate(seqs)}
    want_logprobs = req.sampling.logprobs is not None
    try:
        async for events in engine.generate(seqs, req.sampling, tally=ctx.tally):
            done = []
            for ev in events:
                if ev.text_delta or want_logprobs or ev.finished:
                    lp = format_logprobs(engine, ev.seq.logprobs[-1:]) if want_logprobs and ev.token_id >= 0 else []
                    if ev.text_delta or lp:
                        yield ChoiceDelta(index[ev.seq.key], ev.text_delta, [ev.token_id], lp)
                if ev.finished:
                    done.append(ev.seq)
            if done:
                scores = await score_texts(ctx, [s.text for s in done])
                for seq, score in zip(done, scores):
                    yield final_choice(ctx, index[seq.key], seq, score, streamed=True)
        yield ctx.summary(sum(s.num_output for s in seqs))
    finally:
        await engine.release(seqs)


STRATEGY = register(Strategy(
    name="sample",
    description="Plain decoding with the usual sampling fields; rewards, if given, are reported.",
    params=SampleParams,
    run=run,
    streams="tokens",
))
