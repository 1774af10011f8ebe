"""`sample`: plain decoding of n choices that share the prompt; rewards only report."""

from __future__ import annotations

from collections.abc import AsyncIterator

from alignserve.decoding.base import (
    DecodeContext,
    DecodeEvent,
    Strategy,
    StrategyParams,
    register,
)
from alignserve.decoding.common import prefill_branches, stream_choices


class SampleParams(StrategyParams):
    pass


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    seqs = await prefill_branches(ctx, ctx.request.n)
    try:
        async for event in stream_choices(ctx, seqs):
            yield event
        yield ctx.summary(sum(s.num_output for s in seqs))
    finally:
        await ctx.engine.release(seqs)


STRATEGY = register(Strategy(
    name="sample",
    description="Plain decoding with the usual sampling fields; rewards, if given, are reported.",
    params=SampleParams,
    run=run,
    streams="tokens",
))
