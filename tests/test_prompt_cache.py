"""The native engine's prompt cache (`--prompt-cache`) on the live server's engine: a repeated
prompt skips its prefill and samples exactly as a computed one; kept prompts are bounded,
evicted least recently used, and keyed by the numeric mode."""

from __future__ import annotations

import asyncio

import pytest

from alignserve.engine.native.cpu_linear import set_few_rows
from alignserve.engine.native.prompt_cache import PromptCache
from alignserve.engine.protocol import SamplingParams, TokenTally
from alignserve.server.settings import ServerSettings


def run(engine, coro, timeout=300):
    return asyncio.run_coroutine_threadsafe(coro, engine.loop).result(timeout)


@pytest.fixture
def cached_engine(exact_engine):
    """The live engine with a prompt cache of `max_slots` (set by the test), removed after."""
    engine = exact_engine
    engine.prompt_cache = PromptCache(engine.kv, engine._chains, engine.kv.num_slots // 4)
    yield engine

    async def drop():
        async with engine._lock:
            engine.prompt_cache.clear()
            engine.prompt_cache = None

    run(engine, drop())


async def _sample(engine, ids, seed, n=1):
    tally = TokenTally()
    root = await engine.prefill(ids, tally)
    logits = (await engine.logits([root]))[0]
    seqs = await engine.fork(root, n) if n > 1 else [root]
    async for _ in engine.generate(seqs, SamplingParams(max_tokens=6, ignore_eos=True, seed=seed),
                                   tally=tally):
        pass
    out = [s.output_ids for s in seqs]
    await engine.release(seqs + ([root] if n > 1 else []))
    return tally.prefill, logits, out


def test_repeated_prompt_skips_prefill_and_samples_alike(cached_engine):
    engine = cached_engine
    ids = engine.encode("The harbour master kept a ledger of every ship. " * 20)

    async def go():
        before = engine.stats().kv_used_slots
        first = await _sample(engine, ids, seed=5, n=4)
        kept = engine.stats().kv_used_slots
        second = await _sample(engine, ids, seed=5, n=4)
        third = await _sample(engine, ids, seed=5, n=1)
        after = engine.stats().kv_used_slots
        async with engine._lock:
            engine.prompt_cache.clear()
        return before, first, kept, second, third, after, engine.stats().kv_used_slots

    before, first, kept, second, third, after, cleared = run(engine, go())
    assert first[0] == len(ids)  # computed once...
    assert second[0] == 0 and third[0] == 0  # ...then taken from the cache
    assert engine.prompt_cache.hits == 2
    assert second[1].equal(first[1])  # the same next-token logits
    assert second[2] == first[2]  # and the same samples, branch by branch
    assert third[2][0] == first[2][0]
    assert kept - before >= len(ids) and after == kept  # the prompt's KV stays, nothing leaks
    assert cleared == before  # and is freed when dropped


def test_kept_prompts_are_bounded_least_recently_used(cached_engine):
    engine = cached_engine
    prompts = [engine.encode(f"Chapter {i}: the keeper's log, entry {i}. " * 12) for i in range(3)]
    engine.prompt_cache.max_slots = len(prompts[0]) + len(prompts[1]) + 8  # room for two

    async def go():
        for ids in prompts[:2]:
            await _sample(engine, ids, seed=1)
        await _sample(engine, prompts[0], seed=1)  # a hit: prompt 0 becomes the newest
        await _sample(engine, prompts[2], seed=1)  # prompt 1, the oldest, is dropped
        return [(await _sample(engine, ids, seed=1))[0] for ids in prompts]

    assert len({len(p) for p in prompts}) == 1
    recomputed = run(engine, go())
    # prompt 0 is a hit; prompt 1 is computed again (and, kept, pushes out prompt 2)
    assert recomputed == [0, len(prompts[1]), len(prompts[2])]
    assert len(engine.prompt_cache) == 2


def test_kv_of_another_numeric_mode_is_not_reused(cached_engine):
    engine = cached_engine
    ids = engine.encode("A lamp of oil and wick, then lenses that bent the light.")
    first = run(engine, _sample(engine, ids, seed=2))[0]  # exact fp32 (the fixture's mode)
    previous = set_few_rows(engine.model, None)  # this CPU's bf16 default
    try:
        other = run(engine, _sample(engine, ids, seed=2))[0]
    finally:
        set_few_rows(engine.model, previous)
    again = run(engine, _sample(engine, ids, seed=2))[0]
    assert (first, other, again) == (len(ids), len(ids), 0)


def test_prompt_cache_flag_is_for_the_native_engine():
    ServerSettings(prompt_cache=True).check()
    with pytest.raises(ValueError, match="--prompt-cache"):
        ServerSettings(engine="vllm", prompt_cache=True).check()
