"""The vLLM engine adapter on CPU, against a fake AsyncLLM that behaves like vLLM 0.25's
(tests/fakes/fake_vllm.py): every strategy's control flow, the logits processor that carries
vas and contrastive into vLLM's engine core, cancellation, errors and metrics.

The fake runs a tiny random Llama in the native engine's model code, so the strategies can also
run on the native engine with the very same weights: deterministic strategies (deal, greedy
vas and contrastive) must give the same tokens on both engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest
import torch
from fakes.fake_vllm import (
    FAKE_API,
    SWAP,
    UNIDIRECTIONAL,
    FakeAsyncLLM,
    FakeBatchUpdate,
    FakeSamplingParams,
    TinyLM,
    TinyResources,
    tiny_value_model,
)

from alignserve.decoding.base import (
    STRATEGIES,
    ChoiceDelta,
    ChoiceFinal,
    DecodeContext,
    DecodeRequest,
    RequestSummary,
)
from alignserve.engine.protocol import CapacityError, EngineError, SamplingParams, TokenTally
from alignserve.engine.steering import ContrastiveSteer, EarlyLayers, ServedAmateur, Steering
from alignserve.engine.vllm import spec as wire
from alignserve.engine.vllm.engine import VllmEngine
from alignserve.engine.vllm.logits_processor import AlignLogitsProcessor, AlignProcessorCore
from alignserve.engine.vllm.side_model import HiddenFromLogits, SideRunner, truncated

# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from alignserve.engine.native.loader import load_tokenizer, resolve

    return load_tokenizer(*resolve(None)[:2])


@pytest.fixture(scope="module")
def lm(tok):
    return TinyLM(len(tok))


def make(tok, lm, core=None, **kw):
    fake_kw = {k: kw.pop(k) for k in ("step_delay", "fail_after_steps", "max_model_len") if k in kw}
    fake = FakeAsyncLLM(lm, tok, core=core, **fake_kw)
    engine = VllmEngine(fake, tok, "tiny", max_model_len=kw.pop("engine_max_model_len", 512),
                        vocab_size=len(tok), num_layers=lm.cfg.num_layers, api=FAKE_API,
                        logits_top_k=kw.pop("logits_top_k", 16),
                        token_matrix=lm.model.lm_head.weight.detach(), **kw)
    return engine, fake


def native(tok, lm):
    from alignserve.engine.native.engine import NativeEngine

    return NativeEngine(lm.model, tok, "tiny", torch.device("cpu"), kv_cache_gib=0.02)


def on_native(tok, lm, *runs):
    """Each (strategy, kwargs of `request`, resources) on a native engine with the same weights,
    in one event loop (the engine's loop binds to the first one it starts in)."""
    nat = native(tok, lm)

    async def go():
        out = []
        try:
            for strategy, kw, resources in runs:
                out.append((await drive(nat, request(nat, strategy, **kw), resources))[1])
        finally:
            await nat.close()
        return out

    return run(go())


def request(engine, strategy, *, n=1, params=None, rewards=None, stream=False, messages=None,
            **sampling):
    from alignserve.rewardmodels.compose import RewardRegistry

    messages = messages or [{"role": "user", "content": "Tell me about the ocean."}]
    text, ids = engine.encode_chat(messages)
    spec = STRATEGIES[strategy]
    return DecodeRequest(
        request_id="t", prompt_ids=ids, prompt_text=text,
        sampling=SamplingParams(**{"max_tokens": 8, **sampling}), n=n, strategy=strategy,
        params=spec.params.model_validate(params or {}),
        reward=RewardRegistry.default().build(rewards or []), stream=stream, messages=messages)


async def drive(engine, req, resources=None):
    import alignserve.decoding  # noqa: F401  (registers the strategies)

    start = getattr(engine, "start", None)
    if start is not None:
        await start()
    ctx = DecodeContext(engine=engine, request=req, resources=resources)
    events = []
    agen = STRATEGIES[req.strategy].run(ctx)
    async with contextlib.aclosing(agen):
        async for ev in agen:
            events.append(ev)
    return ctx, events


def finals(events):
    return sorted((e for e in events if isinstance(e, ChoiceFinal)), key=lambda f: f.index)


def run(coro):
    return asyncio.run(coro)


def flush(engine):
    """One plain request: vLLM tells processors about rows that left only at its next step."""
    async def go():
        seq = await engine.prefill(engine.encode("flush"))
        async for _ in engine.generate([seq], SamplingParams(max_tokens=1)):
            pass
        await engine.release([seq])

    run(go())


# ---- sample and best_of_n ------------------------------------------------------------------

def test_sample_n_children_share_one_vllm_request(tok, lm):
    engine, fake = make(tok, lm)
    req = request(engine, "sample", n=4, max_tokens=6, seed=7, ignore_eos=True)
    ctx, events = run(drive(engine, req))
    (seen,) = fake.requests  # one vLLM request with n children, not n requests
    assert seen.params.n == 4 and seen.prompt_ids == req.prompt_ids
    assert seen.params.output_kind == FAKE_API.delta_kind
    outs = finals(events)
    assert [f.index for f in outs] == [0, 1, 2, 3]
    for f in outs:
        assert f.token_ids == fake.outputs[(seen.request_id, f.index)]
        assert f.text == tok.decode(f.token_ids, skip_special_tokens=True)
        streamed = "".join(e.text for e in events if isinstance(e, ChoiceDelta) and e.index == f.index)
        assert streamed == f.text
    assert len({tuple(f.token_ids) for f in outs}) > 1  # children sample independently
    # model_tokens as API.md defines it for both engines: the shared prompt counts once,
    # whatever vLLM's prefix cache recomputed for the other children
    assert any(len(req.prompt_ids) - fake.cached[(seen.request_id, i)] > 0 for i in range(1, 4))
    assert ctx.tally.prefill == len(req.prompt_ids)
    assert ctx.tally.decode == 4 * (6 - 1)  # a child's last token is never fed back
    summary = events[-1]
    assert isinstance(summary, RequestSummary) and summary.model_tokens == ctx.tally.total
    assert engine.stats().prefill_tokens == len(req.prompt_ids)


def test_sample_logprobs_and_seeds_map_to_vllm(tok, lm):
    engine, fake = make(tok, lm)
    req = request(engine, "sample", n=2, max_tokens=4, seed=11, logprobs=3, temperature=0.7,
                  top_k=50, stop_token_ids=(5,), ignore_eos=True)
    _, events = run(drive(engine, req))
    (seen,) = fake.requests
    p = seen.params
    assert (p.seed, p.logprobs, p.temperature, p.top_k, p.stop_token_ids) == (11, 3, 0.7, 50, [5])
    for f in finals(events):
        assert len(f.logprobs) == len(f.token_ids)
        for entry, t in zip(f.logprobs, f.token_ids):
            assert entry["token_id"] == t
            tops = [x["logprob"] for x in entry["top_logprobs"]]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert f.cumulative_logprob == pytest.approx(sum(e["logprob"] for e in f.logprobs))


def test_best_of_n_returns_the_top_rewards(tok, lm):
    from alignserve.rewardmodels.compose import RewardRegistry

    engine, fake = make(tok, lm)
    rewards = [{"name": "length", "weight": 1.0, "target_words": 4}]
    req = request(engine, "best_of_n", n=2, params={"candidates": 6}, rewards=rewards,
                  max_tokens=10, seed=3)
    ctx, events = run(drive(engine, req))
    (seen,) = fake.requests
    assert seen.params.n == 6
    assert seen.params.detokenize is False  # candidates are decoded once, when they finish
    texts = [tok.decode(fake.outputs[(seen.request_id, i)], skip_special_tokens=True)
             for i in range(6)]
    scores = [s.total for s in RewardRegistry.default().build(rewards).score(texts, req.prompt_text)]
    got = finals(events)
    assert len(got) == 2
    assert sorted((f.reward for f in got), reverse=True) == sorted(scores, reverse=True)[:2]
    assert all(f.text in texts for f in got)
    assert ctx.candidates_scored == 6


def test_deferred_detokenization_on_vllm(tok, lm):
    """detokenize=False reaches vLLM unless stop strings need its text; the handle's text is
    whole once finished, aborted ones included, and equals the per-token path's."""
    engine, fake = make(tok, lm)
    base = SamplingParams(max_tokens=7, seed=5, ignore_eos=True)

    async def go(params, stop_after=None):
        seq = await engine.prefill(engine.encode("The river"))
        deltas = []
        gen = engine.generate([seq], params)
        async with contextlib.aclosing(gen):
            async for events in gen:
                deltas += [ev.text_delta for ev in events]
                if stop_after is not None and len(deltas) >= stop_after:
                    break
        await engine.release([seq])
        return seq, deltas, fake.requests[-1].params

    eager, eager_deltas, p1 = run(go(base))
    lazy, lazy_deltas, p2 = run(go(SamplingParams(**{**base.__dict__, "detokenize": False})))
    assert p1.detokenize and not p2.detokenize
    assert lazy.output_ids == eager.output_ids and lazy.text == eager.text == "".join(eager_deltas)
    assert all(d == "" for d in lazy_deltas[:-1]) and lazy_deltas[-1] == lazy.text != ""
    _, _, p3 = run(go(SamplingParams(**{**base.__dict__, "detokenize": False, "stop": ["zz"]})))
    assert p3.detokenize  # stop strings are matched on vLLM's text
    cut, _, _ = run(go(SamplingParams(**{**base.__dict__, "detokenize": False, "max_tokens": 50}),
                       stop_after=3))
    assert cut.finish_reason == "abort" and cut.text == tok.decode(cut.output_ids, skip_special_tokens=True)


# ---- deal: the step loop ---------------------------------------------------------------------

@pytest.mark.parametrize("commit", [1, 2])
def test_deal_matches_the_native_engine(tok, lm, commit):
    rewards = [{"name": "keywords", "weight": 2.0, "keywords": ["ocean", "blue", "the"]}]
    params = {"top_k": 3, "lookahead": 3, "beam": 2, "commit": commit}
    engine, fake = make(tok, lm)
    req = request(engine, "deal", params=params, rewards=rewards, max_tokens=6)
    ctx, events = run(drive(engine, req))
    (nevents,) = on_native(tok, lm, ("deal", {"params": params, "rewards": rewards,
                                               "max_tokens": 6}, None))
    (mine,), (theirs,) = finals(events), finals(nevents)
    assert mine.token_ids == theirs.token_ids and mine.text == theirs.text
    assert mine.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-3)
    assert mine.reward == pytest.approx(theirs.reward)
    # every committed token is one of the model's top_k at its position
    ctxt = list(req.prompt_ids)
    for t in mine.token_ids:
        assert t in torch.topk(lm.logits(ctxt), 3).indices.tolist()
        ctxt.append(t)
    rollouts = [r for r in fake.requests if r.params.max_tokens > 1]
    assert rollouts and all(r.params.n == 1 and r.params.temperature == 0 for r in rollouts)
    assert all(r.params.logprobs >= 3 for r in rollouts)  # their top-k serve the next step
    assert ctx.tally.lookahead > 0 and ctx.candidates_scored > 0


# ---- the segment searches: speculative_rejection, particle_filter ------------------------------

@pytest.mark.parametrize("strategy, params", [
    ("speculative_rejection", {"candidates": 4, "segment": 3, "keep": 0.5, "pause_ties": False}),
    # greedy particles tie: they pause, and resume when the survivors finish without "ocean"
    ("speculative_rejection", {"candidates": 4, "segment": 3, "keep": 0.5, "pause_ties": True}),
    ("particle_filter", {"candidates": 4, "segment": 3, "keep": 0.75}),
    ("particle_filter", {"candidates": 3, "segment": "entropy", "max_segment": 4,
                         "entropy_threshold": 0.5}),
])
def test_segment_searches_match_the_native_engine(tok, lm, strategy, params):
    """Greedy particles make the search deterministic, so both engines must agree token for
    token: the rounds' truncate / fork / extend / generate mean the same on vLLM."""
    rewards = [{"name": "keywords", "weight": 1.0, "keywords": ["ocean", "the"]}]
    kw = {"params": params, "rewards": rewards, "max_tokens": 9, "temperature": 0}
    engine, fake = make(tok, lm)
    _, events = run(drive(engine, request(engine, strategy, **kw)))
    (nevents,) = on_native(tok, lm, (strategy, kw, None))
    (mine,), (theirs,) = finals(events), finals(nevents)
    assert mine.token_ids == theirs.token_ids and mine.text == theirs.text
    assert mine.reward == pytest.approx(theirs.reward)
    assert mine.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-3)
    assert events[-1].search == nevents[-1].search  # the same rounds, pruning and cuts
    assert events[-1].search["rounds"] >= 2
    if params.get("pause_ties"):
        assert events[-1].search["resumed"] > 0
    assert fake.live_rows == 0 and not engine._inflight and not engine._states


def test_speculative_rejection_on_vllm_prunes_by_partial_reward(tok, lm):
    """Sampled candidates on vLLM: each round's population is the kept fraction, the survivors
    are the best by partial reward, and the answer is reproducible with a seed."""
    rewards = [{"name": "keywords", "keywords": ["the", "a", "of"]}]
    params = {"candidates": 8, "segment": 2, "keep": 0.5, "pause_ties": False}

    def once():
        engine, fake = make(tok, lm)
        req = request(engine, "speculative_rejection", params=params, rewards=rewards,
                      max_tokens=10, seed=4, temperature=1.0)
        ctx, events = run(drive(engine, req))
        return ctx, events, fake

    ctx, events, fake = once()
    search = events[-1].search
    going = [8] + search["population"]
    # each selection keeps half of the particles still going (those that finished left first)
    for before, after in zip(going, search["population"]):
        assert after <= max(1, math.ceil(before / 2))
    assert search["pruned"] > 0 and fake.requests[0].params.n == 8
    (final,) = finals(events)
    (again,) = finals(once()[1])
    assert (again.text, again.token_ids) == (final.text, final.token_ids)  # seeded
    assert ctx.tally.decode < 8 * 10  # pruning spent less than 8 whole candidates


def test_logits_is_an_exact_top_k_view_and_rollouts_prefill_it(tok, lm):
    engine, fake = make(tok, lm, logits_top_k=8)

    async def go():
        ids = engine.encode("Once upon a time")
        root = await engine.prefill(ids)
        view = (await engine.logits([root]))[0]
        true = torch.log_softmax(lm.logits(ids), -1)
        kids = await engine.fork(root, 2)
        top2 = torch.topk(true, 2).indices.tolist()
        await engine.extend(kids, [[top2[0]], [top2[1]]])
        n_before = len(fake.requests)
        params = SamplingParams(temperature=0, max_tokens=kids[0].num_output + 3, ignore_eos=True)
        async for _ in engine.generate(kids, params, kind="lookahead"):
            pass
        assert len(fake.requests) == n_before + 2  # different tokens: one request each
        # roll a child back into its rollout: its next-token distribution is already known
        await engine.truncate(kids[0], len(ids) + 2)
        n_before = len(fake.requests)
        cached = (await engine.logits([kids[0]]))[0]
        assert len(fake.requests) == n_before
        return view, true, cached, list(kids[0].token_ids)

    view, true, cached, kid = run(go())
    top = torch.topk(true, 8)
    assert torch.topk(view, 8).indices.tolist() == top.indices.tolist()
    torch.testing.assert_close(torch.log_softmax(view, -1)[top.indices], top.values,
                               atol=1e-4, rtol=0)
    want = torch.log_softmax(lm.logits(kid), -1)
    torch.testing.assert_close(torch.log_softmax(cached, -1)[torch.topk(want, 8).indices],
                               torch.topk(want, 8).values, atol=1e-4, rtol=0)


# ---- vas and contrastive: the logits processor in the (fake) engine core ----------------------

def test_vas_on_vllm_matches_the_native_engine(tok, lm, tmp_path):
    from alignserve.decoding.resources import DecodingResources

    models = {"pos": tiny_value_model(tmp_path, lm, 1), "neg": tiny_value_model(tmp_path, lm, 2)}
    params = {"beta": 4.0, "top_k": 5, "value_models": [{"name": "pos", "weight": 1.0},
                                                       {"name": "neg", "weight": -0.5}]}
    core = AlignProcessorCore(TinyResources(lm))
    engine, fake = make(tok, lm, core=core)
    _ctx, events = run(drive(engine, request(engine, "vas", params=params, max_tokens=8,
                                            temperature=0.0, ignore_eos=True),
                            DecodingResources(value_models=models)))
    (seen,) = fake.requests
    args = seen.params.extra_args[wire.KEY]["vas"]
    assert args["beta"] == 4.0 and args["top_k"] == 5 and args["keep_others"] is False
    assert [(m["path"], m["weight"]) for m in args["value_models"]] == [
        (str(models["pos"].path), 1.0), (str(models["neg"].path), -0.5)]
    nmodels = {k: tiny_value_model(tmp_path / "n", lm, s) for k, s in (("pos", 1), ("neg", 2))}
    greedy_kw = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    nevents, plain = on_native(
        tok, lm, ("vas", {"params": params, **greedy_kw}, DecodingResources(value_models=nmodels)),
        ("sample", greedy_kw, None))
    (mine,), (theirs,), (greedy,) = finals(events), finals(nevents), finals(plain)
    assert mine.token_ids == theirs.token_ids
    assert mine.token_ids != greedy.token_ids  # the values did steer
    flush(engine)
    assert not core.rows  # every row left the batch and was dropped


@pytest.mark.parametrize("amateur", ["self:1", "lame_prompt"])
def test_contrastive_on_vllm_matches_the_native_engine(tok, lm, amateur):
    params = {"amateur": amateur, "alpha": 0.05, "beta": 1.0}
    # a system prompt, so that the lame prompt (the last user message alone) differs
    greedy_kw = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "messages": [
        {"role": "system", "content": "You are a pirate. Every answer is about ships and rum."},
        {"role": "user", "content": "Tell me about the ocean."}]}
    core = AlignProcessorCore(TinyResources(lm))
    engine, fake = make(tok, lm, core=core)
    ctx, events = run(drive(engine, request(engine, "contrastive", params=params, **greedy_kw)))
    (seen,) = fake.requests
    args = seen.params.extra_args[wire.KEY]["contrastive"]
    assert (args["alpha"], args["beta"]) == (0.05, 1.0)
    if amateur == "self:1":
        assert args["amateur"] == {"source": "self", "layers": 1}
    else:
        from alignserve.decoding.contrastive import lame_prompt_ids

        assert args["amateur"]["source"] == "expert"
        assert args["amateur"]["prompt_ids"] == lame_prompt_ids(ctx.request, engine)
        assert args["amateur"]["prompt_ids"] != ctx.request.prompt_ids
    nevents, plain = on_native(tok, lm, ("contrastive", {"params": params, **greedy_kw}, None),
                               ("sample", greedy_kw, None))
    (mine,), (theirs,), (greedy,) = finals(events), finals(nevents), finals(plain)
    assert mine.token_ids == theirs.token_ids
    assert mine.token_ids != greedy.token_ids
    assert ctx.tally.total > 0


def test_steered_and_plain_requests_share_batches_correctly(tok, lm):
    """Many concurrent requests of different lengths: rows join, leave and move; each steered
    row must follow its own reference computation, plain rows plain greedy."""
    resources = TinyResources(lm)
    core = AlignProcessorCore(resources)
    engine, fake = make(tok, lm, core=core)
    steering = Steering(contrastive=ContrastiveSteer(EarlyLayers(1), alpha=0.1, beta=0.7))

    prompts = [engine.encode(t) for t in ("The sea", "A short story about a cat", "Hello there",
                                          "Numbers: one two", "Why is the sky blue?")]

    async def one(i, ids):
        seq = await engine.prefill(ids)
        steer = i % 2 == 0
        params = SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True)
        async for _ in engine.generate([seq], params, steering=steering if steer else None):
            pass
        return steer, ids, seq.output_ids

    async def go():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    results = run(go())
    moves = [m for bu in fake.batch_updates for m in bu.moved]
    removed = [r for bu in fake.batch_updates for r in bu.removed]
    assert moves and removed and fake.max_batch == len(prompts)
    amateur = truncated(lm.model, 1)
    from alignserve.decoding.contrastive import contrast_scores

    for steer, ids, out in results:
        ctxt = list(ids)
        for t in out:
            e = lm.logits(ctxt)
            if steer:
                a = lm.forward(amateur, ctxt)[0]
                want = int(torch.argmax(contrast_scores(e[None], a[None], 0.1, 0.7)[0]))
            else:
                want = int(torch.argmax(e))
            assert t == want
            ctxt.append(t)
    flush(engine)
    runner = resources._runners[("self", 1)]
    assert not core.rows and runner.open_sequences == 0 and runner.open_prompts == 0 and runner.kv.used_slots == 0


# ---- the processor's state machine -------------------------------------------------------------

class _StubRunner:
    """Records what the processor asks of a side model."""

    def __init__(self):
        self.opened, self.closed, self.feeds = {}, [], {}
        self._ids = iter(range(1, 1000))

    def open(self, prompt):
        sid = next(self._ids)
        self.opened[sid], self.feeds[sid] = list(prompt), []
        return sid

    def close(self, sid):
        self.closed.append(sid)

    def fed(self, sid):
        return len(self.feeds[sid])

    def step(self, sids, tokens):
        for s, t in zip(sids, tokens):
            self.feeds[s].extend(t)
        out = torch.zeros(len(sids), 10)
        out[:, 3] = 5.0  # the amateur loves token 3
        return out


class _StubResources:
    def __init__(self):
        self.stub = _StubRunner()

    def runner(self, amateur):
        return self.stub


def _contrastive_params(**amateur):
    return FakeSamplingParams(extra_args=wire.to_wire(wire.AlignSpec(
        contrastive=wire.ContrastiveSpec(wire.AmateurSpec(**amateur), alpha=0.5, beta=1.0))))


def test_processor_state_follows_batch_updates():
    res = _StubResources()
    core = AlignProcessorCore(res)
    outs = [[], [], [], []]
    plain = FakeSamplingParams()
    bad = FakeSamplingParams(extra_args={"alignserve": {"contrastive": {"alpha": 2}}})
    core.update_state(FakeBatchUpdate(4, [], [
        (0, _contrastive_params(source="self", layers=1), [1, 2, 3], outs[0]),
        (1, plain, [4, 5], outs[1]),
        (2, _contrastive_params(source="expert", prompt_ids=[9, 9]), [6], outs[2]),
        (3, bad, [7], outs[3]),
    ], []))
    assert sorted(core.rows) == [0, 2]  # plain and malformed rows are not steered
    logits = torch.zeros(4, 10)
    logits[:, 1] = 4.0
    logits[:, 3] = 3.9
    before = logits.clone()
    out = core.apply(logits)
    r = res.stub
    assert sorted(r.opened.values()) == [[1, 2, 3], [9, 9]]  # the expert amateur uses its own context
    assert torch.equal(out[1], before[1]) and torch.equal(out[3], before[3])
    assert int(out[0].argmax()) == 1 and not torch.equal(out[0], before[0])
    # tokens sampled between steps are read live from vLLM's lists
    outs[0].extend([1, 1])
    outs[2].append(3)
    core.update_state(None)
    core.apply(torch.zeros(4, 10))
    sid0 = next(s for s, p in r.opened.items() if p == [1, 2, 3])
    sid2 = next(s for s, p in r.opened.items() if p == [9, 9])
    assert r.feeds[sid0] == [1, 1] and r.feeds[sid2] == [3]
    # row 1 leaves; row 2 moves into its place; a swap; an add over a live row
    core.update_state(FakeBatchUpdate(3, [1], [], [(2, 1, UNIDIRECTIONAL)]))
    assert sorted(core.rows) == [0, 1] and core.rows[1].sid == sid2
    core.update_state(FakeBatchUpdate(3, [], [], [(0, 1, SWAP)]))
    assert core.rows[0].sid == sid2 and core.rows[1].sid == sid0
    core.update_state(FakeBatchUpdate(3, [], [(0, plain, [8], [])], []))
    assert sid2 in r.closed and sorted(core.rows) == [1]
    core.update_state(FakeBatchUpdate(0, [1], [], []))
    assert sid0 in r.closed and not core.rows


def test_validate_params_rejects_malformed_arguments():
    good = wire.to_wire(wire.AlignSpec(vas=wire.VasSpec((wire.ValueSpec("/v", 1.0),), beta=2.0)))
    AlignLogitsProcessor.validate_params(FakeSamplingParams(extra_args=good))
    AlignLogitsProcessor.validate_params(FakeSamplingParams())
    for bad in ({"vas": {"value_models": []}},
                {"contrastive": {"alpha": 0.0, "amateur": {"source": "self", "layers": 1}}},
                {"contrastive": {"amateur": {"source": "other"}}},
                {"vas": {"value_models": [{"path": "/v"}], "surprise": 1}}):
        with pytest.raises(ValueError):
            AlignLogitsProcessor.validate_params(FakeSamplingParams(extra_args={wire.KEY: bad}))
    spec = wire.AlignSpec(
        contrastive=wire.ContrastiveSpec(wire.AmateurSpec("expert", prompt_ids=(1, 2)), 0.2, 0.3),
        vas=wire.VasSpec((wire.ValueSpec("/a", 1.0), wire.ValueSpec("/b", -2.0)), 3.0, 7, True))
    assert wire.parse(wire.to_wire(spec)) == spec


# ---- the side model and the hidden state -----------------------------------------------------

def test_side_runner_shares_prompts_and_matches_a_full_forward(lm):
    runner = SideRunner(lm.model, 4096, "cpu")
    prompt = [5, 6, 7, 8, 9, 10]
    a, b = runner.open(prompt), runner.open(prompt)
    assert runner.open_prompts == 1
    feeds = [([], []), ([11], [12]), ([13, 14], [15]), ([16], [17, 18, 19])]
    ctx_a, ctx_b = list(prompt), list(prompt)
    for ta, tb in feeds:
        out = runner.step([a, b], [ta, tb])
        ctx_a += ta
        ctx_b += tb
        torch.testing.assert_close(out[0], lm.logits(ctx_a), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[1], lm.logits(ctx_b), atol=1e-4, rtol=1e-4)
    runner.close(a)
    assert runner.kv.used_slots > 0
    runner.close(b)
    assert runner.kv.used_slots == 0 and runner.open_prompts == 0


def test_hidden_state_is_recovered_from_logits():
    torch.manual_seed(0)
    e = torch.randn(3000, 24)
    h = torch.randn(5, 24)
    logits = h @ e.t()
    rec = HiddenFromLogits(e)
    torch.testing.assert_close(rec(logits), h, atol=1e-4, rtol=1e-4)
    masked = logits.clone()
    masked[1, [2, 50, 700]] = float("-inf")  # min_tokens masks stop tokens before us
    masked[3, :40] = float("-inf")
    torch.testing.assert_close(rec(masked), h, atol=1e-3, rtol=1e-3)
    rounded = logits.bfloat16().float()  # vLLM computes logits in the model's dtype
    assert (rec(rounded) - h).norm() / h.norm() < 1e-2


# ---- cancellation and errors ------------------------------------------------------------------

def test_cancelling_the_consumer_aborts_every_child(tok, lm):
    engine, fake = make(tok, lm, step_delay=0.01)

    async def go():
        a = await engine.prefill(engine.encode("first prompt"))
        b = await engine.prefill(engine.encode("another prompt"))
        kids = await engine.fork(a, 3)
        seqs = kids + [b]
        first = asyncio.Event()

        async def consume():
            async for _ in engine.generate(seqs, SamplingParams(max_tokens=200, ignore_eos=True, seed=1)):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(20):
            if fake.live_rows == 0:
                break
            await asyncio.sleep(0.02)
        return seqs

    seqs = run(go())
    ids = {r.request_id for r in fake.requests}
    assert len(ids) == 2  # the three children share one request, b has its own
    assert ids <= set(fake.aborted)
    assert fake.live_rows == 0 and not engine._inflight
    assert all(s.finish_reason == "abort" and s.num_output < 200 for s in seqs)


def test_cancelling_a_strategy_aborts_its_requests(tok, lm):
    engine, fake = make(tok, lm, step_delay=0.01)
    req = request(engine, "best_of_n", params={"candidates": 4}, max_tokens=300, ignore_eos=True)

    async def go():
        task = asyncio.create_task(drive(engine, req))
        while not fake.requests or fake.steps < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)

    run(go())
    assert [r.request_id for r in fake.requests] == fake.aborted
    assert fake.live_rows == 0 and not engine._inflight and not engine._states


def test_engine_failures_surface_as_engine_errors(tok, lm):
    async def gen(engine, ids, **kw):
        seq = await engine.prefill(ids)
        async for _ in engine.generate([seq], SamplingParams(**kw)):
            pass

    engine, fake = make(tok, lm, fail_after_steps=2)
    with pytest.raises(EngineError, match="EngineCore"):
        run(gen(engine, engine.encode("hello"), max_tokens=20, ignore_eos=True))
    assert not engine.healthy() and not engine._inflight
    # vLLM rejects a request that cannot fit its context before any output
    engine, fake = make(tok, lm, max_model_len=40, engine_max_model_len=4096)
    with pytest.raises(CapacityError):
        run(gen(engine, engine.encode("hello"), max_tokens=100))
    assert fake.requests == [] and not engine._inflight  # refused before it was queued
    engine, _ = make(tok, lm, fail_after_steps=0)

    async def logits():
        seq = await engine.prefill(engine.encode("hello"))
        await engine.logits([seq])

    with pytest.raises(EngineError):
        run(logits())


def test_steering_vllm_cannot_carry_is_refused_before_reaching_it(tok, lm):
    engine, fake = make(tok, lm)

    async def go(steering):
        seq = await engine.prefill(engine.encode("hello"), early_layer=1)
        async for _ in engine.generate([seq], SamplingParams(max_tokens=3), steering=steering):
            pass

    n = len(fake.requests)
    bad = [(Steering(contrastive=ContrastiveSteer(EarlyLayers(1), alpha=3.0)), "alpha"),
           (Steering(contrastive=ContrastiveSteer(ServedAmateur("nobody"))), "not served")]
    for steering, message in bad:
        with pytest.raises(EngineError, match=message):
            run(go(steering))
    assert len(fake.requests) == n  # refused before reaching vLLM


# ---- metrics -----------------------------------------------------------------------------------

def test_metrics_ours_beside_vllms(tok, lm):
    from prometheus_client import CollectorRegistry, Counter, Gauge

    from alignserve.engine.vllm.metrics import VllmGauges, vllm_metrics_text
    from alignserve.server.metrics import ServerMetrics

    registry = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "waiting", ["engine"], registry=registry).labels("0").set(3)
    Gauge("vllm:kv_cache_usage_perc", "kv", ["engine"], registry=registry).labels("0").set(0.25)
    Counter("vllm:prompt_tokens", "prompt", registry=registry).inc(17)
    Counter("something_else", "not vllm's", registry=registry).inc()
    engine, _fake = make(tok, lm)
    engine._gauges = VllmGauges(registry)
    run(drive(engine, request(engine, "sample", n=2, max_tokens=4, ignore_eos=True)))
    stats = engine.stats()
    assert stats.waiting_requests == 3
    assert stats.kv_used_slots / stats.kv_total_slots == pytest.approx(0.25)
    text = ServerMetrics(engine).render().decode()
    assert f"alignserve_prefill_tokens_total {float(stats.prefill_tokens)}" in text
    assert f'alignserve_model_tokens_total{{kind="decode"}} {float(stats.model_tokens["decode"])}' in text
    theirs = vllm_metrics_text(registry)
    assert "vllm:prompt_tokens_total 17.0" in theirs and "vllm:num_requests_waiting" in theirs
    assert "something_else" not in theirs
    # /metrics: ours (never a colon), then vLLM's, whole and unchanged
    ours, sep, _ = text.partition("# HELP vllm:")
    names = {line.split("{")[0].split(" ")[0] for line in ours.splitlines()
             if line and not line.startswith("#")}
    assert sep and names and not any(":" in n for n in names)
    assert text.endswith(theirs) and "something_else" not in text


# ---- through the HTTP server and the official client --------------------------------------------

def test_server_serves_every_strategy_on_the_vllm_engine(tok, lm):
    import openai
    from fastapi.testclient import TestClient

    from alignserve.server.app import create_app
    from alignserve.server.settings import ServerSettings

    core = AlignProcessorCore(TinyResources(lm))
    engine, fake = make(tok, lm, core=core)
    app = create_app(engine, ServerSettings(engine="native"))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http,
                               max_retries=0)
        msgs = [{"role": "user", "content": "Say something about whales."}]
        for alignment, n in (({"strategy": "sample"}, 2),
                             ({"strategy": "best_of_n", "candidates": 3}, 1),
                             ({"strategy": "deal", "top_k": 2, "lookahead": 2, "beam": 2}, 1),
                             ({"strategy": "contrastive", "amateur": "self:1"}, 1)):
            r = client.chat.completions.create(
                model="tiny", messages=msgs, max_tokens=5, n=n,
                extra_body={"alignment": {**alignment, "rewards": [
                    {"name": "keywords", "keywords": ["whale"]}]}})
            assert len(r.choices) == n, alignment
            for c in r.choices:
                assert c.message.content is not None
                assert c.model_extra["alignment"]["components"].keys() == {"keywords"}
            assert r.model_extra["alignment"]["strategy"] == alignment["strategy"]
            assert r.model_extra["alignment"]["model_tokens"] > 0
        metrics = http.get("/metrics").text
        assert "alignserve_prefill_tokens_total" in metrics
        assert http.get("/health").status_code == 200
    assert fake.shut_down  # the app's lifespan closed the engine
    assert any(r.params.extra_args for r in fake.requests)  # contrastive went to the processor
    assert math.isfinite(engine.stats().prefill_tokens)


# ---- loading and counting ------------------------------------------------------------------------

def test_importing_the_adapter_never_imports_vllm():
    import subprocess
    import sys

    code = ("import sys, alignserve.engine.vllm.engine, alignserve.engine.vllm.logits_processor; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_without_vllm_says_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM
    with pytest.raises(EngineError, match=r"alignserve\[vllm\]"):
        VllmEngine.load()


def test_extended_tokens_count_by_kind_when_vllm_computes_them(tok, lm):
    engine, fake = make(tok, lm)

    async def go():
        tally = TokenTally()
        ids = engine.encode("The quick brown fox jumps over the lazy dog " * 3)
        seq = await engine.prefill(ids, tally)
        await engine.extend([seq], [[11, 12, 13]], tally, kind="lookahead")
        assert tally.total == 0  # nothing is computed before vLLM runs it
        await engine.logits([seq])
        return ids, tally

    ids, tally = run(go())
    (seen,) = fake.requests
    assert seen.prompt_ids == ids + [11, 12, 13] and seen.params.max_tokens == 1
    assert (tally.prefill, tally.lookahead, tally.decode) == (len(ids), 3, 0)


# ---- prompt log-probs and logit_bias (issue 16) -----------------------------------------------

def test_prompt_logprobs_and_logit_bias_map_to_vllm(tok, lm):
    """prefill/extend with prompt_logprobs ask vLLM for `prompt_logprobs` (a one-token request);
    the numbers are the native engine's with the same weights. logit_bias goes to vLLM's
    SamplingParams and steers its sampling."""
    import alignserve.decoding  # noqa: F401
    from alignserve.decoding.batch import PromptLogprobs, run_prompts

    engine, fake = make(tok, lm)
    reqs = [request(engine, "sample", max_tokens=3, temperature=0.0, prompt_logprobs=2,
                    messages=[{"role": "user", "content": c}])
            for c in ("Tell me about the ocean.", "Tell me about the desert.")]
    forced = engine.encode(" whale")[0]
    for r in reqs:
        r.sampling.logit_bias = {forced: 100.0}

    async def go(eng):
        await eng.start()
        tally = TokenTally()
        ctxs = [DecodeContext(engine=eng, request=r, tally=tally) for r in reqs]
        events = [ev async for ev in run_prompts(STRATEGIES["sample"], ctxs)]
        if hasattr(eng, "kv"):
            await eng.close()
        return events

    got = run(go(engine))
    want = run(go(native(tok, lm)))
    for events in (got, want):
        outs = finals(events)
        assert [f.index for f in outs] == [0, 1]
        assert all(set(f.token_ids) == {forced} for f in outs)  # +100 wins every step
    scored = [e for e in got if isinstance(e, PromptLogprobs)]
    native_scored = [e for e in want if isinstance(e, PromptLogprobs)]
    assert [s.prompt for s in scored] == [0, 1]
    for s, w, r in zip(scored, native_scored, reqs):
        assert len(s.entries) == len(r.prompt_ids) and s.entries[0] is None
        for a, b, t in zip(s.entries[1:], w.entries[1:], r.prompt_ids[1:]):
            assert a["token_id"] == b["token_id"] == t
            # one model in fp32, a full forward here and the engine's paged path there
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
            assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]
    plp = [q for q in fake.requests if q.params.prompt_logprobs is not None]
    assert plp and all(q.params.max_tokens == 1 for q in plp)
    sampled = [q for q in fake.requests if q.params.prompt_logprobs is None]
    assert sampled and all(q.params.logit_bias == {forced: 100.0} for q in sampled)
