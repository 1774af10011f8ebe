"""The native engine on the real embedded model: exactness, sharing, batching, memory."""

from __future__ import annotations

import asyncio

import pytest
import torch

from alignserve.engine.protocol import SamplingParams, TokenTally
from tests.tolerance import model_tol


@pytest.fixture
def engine(exact_engine):
    return exact_engine


def run(engine, coro, timeout=300):
    """Run a coroutine on the engine's own event loop (the live server's)."""
    return asyncio.run_coroutine_threadsafe(coro, engine.loop).result(timeout)


async def _generate(engine, seqs, params, tally=None):
    async for _ in engine.generate(seqs, params, tally=tally):
        pass
    return seqs


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    from alignserve.engine.native.loader import resolve

    directory, gguf, _ = resolve(None)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf).eval()


def test_logits_and_greedy_match_transformers(engine, hf_model):
    _, ids = engine.encode_chat([{"role": "user", "content": "Name three colors."}])

    async def go():
        seq = await engine.prefill(ids)
        first = await engine.logits([seq])
        await _generate(engine, [seq], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        await engine.release([seq])
        return first, seq

    first, seq = run(engine, go())
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, -1]
        hf_ids = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    torch.testing.assert_close(first[0], ref, **model_tol(engine.cfg, context=len(ids)))
    assert seq.output_ids == hf_ids.tolist()


def test_forked_branches_share_prefill_and_kv(engine):
    ids = engine.encode("The history of the printing press " * 100)
    assert len(ids) > 500

    async def go():
        before = engine.stats().kv_used_slots
        tally = TokenTally()
        root = await engine.prefill(ids, tally)
        after_prefill = engine.stats().kv_used_slots
        kids = await engine.fork(root, 16)
        await engine.release([root])
        await _generate(engine, kids, SamplingParams(max_tokens=8, ignore_eos=True, seed=3), tally)
        during = engine.stats().kv_used_slots
        texts = [k.text for k in kids]
        outputs = [k.output_ids for k in kids]
        await engine.release(kids)
        return before, after_prefill, during, tally, texts, outputs, engine.stats().kv_used_slots

    before, after_prefill, during, tally, texts, outputs, end = run(engine, go())
    assert tally.prefill == len(ids)  # computed once, not 16 times
    # the last token of each branch is never fed back, and branches that drew the same tokens
    # so far are twins (twins.py): each distinct prefix is computed once
    assert tally.decode == sum(len({tuple(o[:t]) for o in outputs}) for t in range(1, 8))
    one_seq = after_prefill - before
    assert during - before < 2 * one_seq  # 16 branches hold < 2x one sequence's KV
    assert len(set(texts)) > 1  # branches sample independently
    assert end == before  # everything freed


def test_concurrent_requests_share_decode_steps(engine):
    ids_a = engine.encode("Once upon a time")
    ids_b = engine.encode("In a galaxy far away")

    async def one(ids, delay):
        await asyncio.sleep(delay)
        seq = await engine.prefill(ids)
        await _generate(engine, [seq], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        await engine.release([seq])
        return seq.output_ids

    async def go():
        steps0 = engine.stats().steps
        alone_a = await one(ids_a, 0)
        steps_alone = engine.stats().steps - steps0
        steps1 = engine.stats().steps
        a, _ = await asyncio.gather(one(ids_a, 0), one(ids_b, 0.05))
        return alone_a, a, steps_alone, engine.stats().steps - steps1

    alone_a, a, steps_alone, steps_both = run(engine, go())
    assert a == alone_a  # batching with another request does not change greedy output
    assert steps_both < 2 * steps_alone  # the second request joined the first one's steps


def test_seeded_sampling_is_reproducible(engine):
    ids = engine.encode("My favourite animal is")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)

    async def draw(p):
        seq = await engine.prefill(ids)
        await _generate(engine, [seq], p)
        await engine.release([seq])
        return seq.output_ids

    first, second = run(engine, draw(params)), run(engine, draw(params))
    other = run(engine, draw(SamplingParams(**{**params.__dict__, "seed": 99})))
    assert first == second
    assert first != other


def test_deferred_detokenization_gives_the_same_text(engine):
    """detokenize=False decodes once at the end: same tokens and text, no per-token deltas,
    and an aborted sequence's text is still whole."""
    ids = engine.encode("Tell me about the moon.")
    base = SamplingParams(temperature=1.0, max_tokens=24, seed=7, ignore_eos=True)

    async def draw(p, abort_after=None):
        seq = await engine.prefill(ids)
        deltas, n = [], 0
        gen = engine.generate([seq], p)
        async for events in gen:
            deltas += [ev.text_delta for ev in events]
            n += 1
            if n == abort_after:
                break
        await gen.aclose()
        await engine.release([seq])
        return seq, deltas

    eager, eager_deltas = run(engine, draw(base))
    lazy, lazy_deltas = run(engine, draw(SamplingParams(**{**base.__dict__, "detokenize": False})))
    assert lazy.output_ids == eager.output_ids
    assert lazy.text == eager.text == "".join(eager_deltas) and lazy.text
    assert all(d == "" for d in lazy_deltas[:-1]) and lazy_deltas[-1] == lazy.text
    cut, _ = run(engine, draw(SamplingParams(**{**base.__dict__, "detokenize": False}), abort_after=5))
    assert cut.finish_reason == "abort" and 0 < cut.num_output < 24
    assert cut.text == engine.decode(cut.output_ids)


def test_cancelled_generation_frees_memory(engine):
    ids = engine.encode("Write a long story about the sea.")

    async def go():
        before = engine.stats().kv_used_slots
        root = await engine.prefill(ids)
        kids = await engine.fork(root, 4)
        await engine.release([root])
        gen = engine.generate(kids, SamplingParams(max_tokens=500, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # what a client disconnect does
        assert engine.stats().running_sequences == 0
        await engine.release(kids)
        return before, engine.stats().kv_used_slots

    before, after = run(engine, go())
    assert after == before


def test_extend_and_truncate(engine):
    ids = engine.encode("one two three four")
    more = engine.encode(" five six seven")

    async def go():
        a = await engine.prefill(ids)
        await engine.extend([a], [more])
        la = await engine.logits([a])
        b = await engine.prefill(ids + more)
        lb = await engine.logits([b])
        # one token at a time, then roll back and compare the logits again
        await engine.extend([b], [[more[0]]])
        await engine.truncate(b, len(ids) + len(more))
        assert b.token_ids == ids + more
        await engine.extend([b], [[more[0]]])
        lc = await engine.logits([b])
        await engine.extend([a], [[more[0]]])
        ld = await engine.logits([a])
        await engine.release([a, b])
        return la, lb, lc, ld

    la, lb, lc, ld = run(engine, go())
    torch.testing.assert_close(la, lb, **model_tol(engine.cfg))
    torch.testing.assert_close(lc, ld, **model_tol(engine.cfg))


def test_observer_sees_early_layer_logits_and_an_amateur_prompt_steers(engine, hf_model):
    """Steering as data: the engine opens the amateur prompt's context itself, feeds it every
    token, and its fused pass combines the two; each greedy token is the best of the reference
    combination computed outside the engine (transformers' logits on both contexts)."""
    from alignserve.engine.steering import AmateurPrompt, ContrastiveSteer, Steering
    from alignserve.kernels import dispatch
    from alignserve.kernels.logits_ops import Contrastive, process_logits_reference

    lead_ids = engine.encode_chat([{"role": "user", "content": "Tell me about cats."}])[1]
    follow_ids = engine.encode("Tell me about cats.")
    seen = []

    def observer(seqs, logits, inputs):
        seen.append((logits.clone(), inputs.early_logits.clone(), inputs.hidden.shape))

    steer = Steering(contrastive=ContrastiveSteer(AmateurPrompt(tuple(follow_ids)), alpha=0.1,
                                                  beta=1.0))

    async def go():
        used = engine.kv.used_slots
        lead = await engine.prefill(lead_ids, early_layer=10)
        calls = dispatch.SAMPLE_CALLS
        async for _ in engine.generate([lead], SamplingParams(temperature=0, max_tokens=6,
                                                              ignore_eos=True),
                                       steering=steer, observer=observer):
            pass
        summary = (dispatch.SAMPLE_CALLS - calls, dispatch.LAST_SAMPLE)
        await engine.release([lead])
        return lead, summary, engine.kv.used_slots - used

    lead, (calls, last), leaked = run(engine, go())
    assert len(seen) == 6 and calls == 6 and last.contrastive and last.rows == 1
    assert leaked == 0  # the amateur's context was released with the call
    with torch.no_grad():
        out = hf_model(torch.tensor([lead_ids]), output_hidden_states=True)
        early_ref = hf_model.lm_head(hf_model.model.norm(out.hidden_states[10][0, -1]))
    torch.testing.assert_close(seen[0][1][0], early_ref, **model_tol(engine.cfg))
    assert seen[0][2] == (1, engine.cfg.hidden_size)
    tokens = lead.output_ids
    contrasted = 0
    for t in range(6):
        with torch.no_grad():
            e = hf_model(torch.tensor([lead_ids + tokens[:t]])).logits[0, -1]
            a = hf_model(torch.tensor([follow_ids + tokens[:t]])).logits[0, -1]
        tol = model_tol(engine.cfg, context=len(lead_ids) + t)
        torch.testing.assert_close(seen[t][0][0], e, **tol)
        scores = process_logits_reference(
            e[None], contrastive=Contrastive(a[None], torch.tensor([0]), torch.tensor([0.1]),
                                             torch.tensor([1.0])))[0]
        # the scores are (1 + beta) e - beta a: their error is 3x the logits' at most
        slack = 3 * (tol["atol"] + tol["rtol"] * float(e.abs().max()))
        assert float(scores[tokens[t]]) >= float(scores.max()) - slack, t
        contrasted += int(scores.argmax()) != int(e.argmax())
    assert contrasted > 0  # the amateur changed at least one choice
