"""Twin rows (engine/native/twins.py) on the real embedded model: samples of one request that
are the same sequence in a step are computed once, charged once, and lose nothing."""

from __future__ import annotations

import pytest
import torch

from alignserve.engine.native.kv_cache import Segment
from alignserve.engine.native.sequence import SeqState
from alignserve.engine.native.twins import twin_of
from alignserve.engine.protocol import SamplingParams, SeqHandle, TokenTally
from tests.test_engine import _generate, run
from tests.tolerance import model_tol

PROMPT = "Write one sentence that uses all of these words: dog, ball, park, throw."


@pytest.fixture
def engine(exact_engine):
    return exact_engine


async def branch_logprobs(engine, seqs, prompt):
    """Release `seqs` (generated with logprobs); per branch its output, the log-probs it was
    sampled with, and the same tokens' log-probs from a fresh prefill of prompt + output."""
    branches = [(s.output_ids, [e["logprob"] for e in s.logprobs]) for s in seqs]
    await engine.release(seqs)
    fresh = []
    for out, _ in branches:
        seq = await engine.prefill(prompt + out, prompt_logprobs=0)
        fresh.append([e["logprob"] for e in seq.prompt_logprobs[len(prompt):]])
        await engine.release([seq])
    return branches, fresh


async def _forked(engine, ids, n, params, tally):
    root = await engine.prefill(ids, tally)
    kids = await engine.fork(root, n)
    await engine.release([root])
    await _generate(engine, kids, params, tally)
    return kids


def test_greedy_samples_of_one_prompt_cost_one_row(engine):
    ids = engine.encode_chat([{"role": "user", "content": PROMPT}])[1]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def go():
        lone = (await _forked(engine, ids, 1, greedy, TokenTally()))[0]
        twins_before = engine.stats().twin_tokens
        tally = TokenTally()
        kids = await _forked(engine, ids, 8, greedy, tally)
        out = [k.output_ids for k in kids], lone.output_ids, tally, engine.stats().twin_tokens
        await engine.release(kids + [lone])
        return out, twins_before

    (outputs, lone, tally, twins_after), twins_before = run(engine, go())
    assert all(o == lone for o in outputs)  # what a lone greedy sequence says, 8 times
    assert tally.decode == 9  # one row a step: the 10th token is never fed
    assert twins_after - twins_before == 7 * 9


def test_twins_that_diverge_read_exact_kv(engine):
    """Sampled branches share their first tokens, then diverge: every token's log-prob, read
    from KV that twins got as copies, matches a fresh pass over the branch's whole text."""
    ids = engine.encode_chat([{"role": "user", "content": PROMPT}])[1]
    sampled = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=11, logprobs=0)

    async def go():
        tally = TokenTally()
        kids = await _forked(engine, ids, 16, sampled, tally)
        return (*await branch_logprobs(engine, kids, ids), tally)

    branches, fresh, tally = run(engine, go())
    outputs = [o for o, _ in branches]
    distinct = sum(len({tuple(o[:t]) for o in outputs}) for t in range(1, 12))
    assert tally.decode == distinct < 16 * 11  # twins were computed once
    # some branches were twins for a while and then went their own ways
    assert any(a[0] == b[0] and a != b for a in outputs for b in outputs)
    tol = model_tol(engine.cfg, context=len(ids) + 12, scale=2.0)  # logits minus their logsumexp
    for (_, sampled_lps), fresh_lps in zip(branches, fresh):
        torch.testing.assert_close(torch.tensor(sampled_lps), torch.tensor(fresh_lps), **tol)


def test_twins_are_only_found_within_one_request(engine):
    """Two requests with the same prompt (the prompt cache shares its KV) each pay their own
    tokens: rows are compared only within one generate call."""
    ids = engine.encode_chat([{"role": "user", "content": PROMPT}])[1]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def one():
        tally = TokenTally()
        seq = await engine.prefill(ids, tally)
        await _generate(engine, [seq], greedy, tally)
        await engine.release([seq])
        return tally.decode, seq.output_ids

    async def go():
        import asyncio

        return await asyncio.gather(one(), one())

    (decode_a, out_a), (decode_b, out_b) = run(engine, go())
    assert out_a == out_b and decode_a == decode_b == 5


def _state(shared, leaf_tokens, prompt=(1, 2, 3)) -> SeqState:
    leaf = Segment()
    leaf.slots = list(range(100, 100 + len(leaf_tokens)))
    handle = SeqHandle(key=0, prompt_len=len(prompt), token_ids=[*prompt, *leaf_tokens])
    return SeqState(id=0, handle=handle, chain=[*shared, leaf])


def test_twin_of_compares_segments_leaves_and_owner():
    """The grouping alone: same shared segments, leaf tokens and owner make twins; any
    difference (another parent segment, an earlier token, another owner) does not."""
    parent, other = Segment(), Segment()
    parent.slots, other.slots = [0, 1, 2], [3, 4, 5]
    a, b = object(), object()
    rows = [
        (_state([parent], [5, 6]), 6, a),
        (_state([parent], [5, 6]), 6, a),   # twin of 0
        (_state([parent], [7, 6]), 6, a),   # an earlier token differs
        (_state([other], [5, 6]), 6, a),    # another shared segment
        (_state([parent], [5, 6]), 6, b),   # another request
        (_state([parent], [7, 6]), 6, a),   # twin of 2
    ]
    assert twin_of(rows) == [0, 0, 2, 3, 4, 2]
