"""Steering as data on the native engine (real SmolLM2, no mocks).

- The strategies' own requests (vas, contrastive) with the request's penalties, logit bias and
  min_tokens reach `kernels.dispatch.sample` as one call per step with every input populated
  (read from `dispatch.LAST_SAMPLE` / `SAMPLE_CALLS`, which the dispatch keeps for this).
- The engine's greedy tokens are those of the same math computed outside the engine from what
  it was shown (an observer's logits, hidden states and early-layer logits): dense penalties,
  the bias, then VAS or the contrastive combination on log-probs (decoding's own formulas).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from alignserve.decoding import STRATEGIES
from alignserve.decoding.base import DecodeContext, DecodeRequest
from alignserve.decoding.contrastive import contrast_scores
from alignserve.decoding.vas import VasParams, candidates, combine_values, resolve_value_models
from alignserve.decoding.vas import steering as vas_steering
from alignserve.engine.protocol import SamplingParams
from alignserve.engine.steering import ContrastiveSteer, EarlyLayers, Steering
from alignserve.kernels import dispatch, sampling_cpu
from alignserve.rewardmodels.compose import RewardRegistry

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
PENALTIES = {"presence_penalty": 0.4, "frequency_penalty": 0.3, "repetition_penalty": 1.3}


def _run(engine, coro):
    return asyncio.run_coroutine_threadsafe(coro, engine.loop).result(600)


def _bias(engine) -> dict[int, float]:
    """A bias that matters: the greedy answer's first word pushed down, another pushed up."""
    return {engine.encode(" The")[0]: -4.0, engine.encode(" Waves")[0]: 2.0}


@pytest.mark.parametrize(("strategy", "params", "steered"), [
    ("vas", {"beta": 2.0, "top_k": 8}, "vas"),
    ("contrastive", {"amateur": "self:8"}, "contrastive"),
    ("contrastive", {"amateur": "lame_prompt", "lame_prompt": "Write."}, "contrastive"),
])
def test_strategies_steering_reaches_one_fused_sampling_call_per_step(live_server, strategy,
                                                                      params, steered):
    engine = live_server.engine
    text, ids = engine.encode_chat(MESSAGES)
    # min_tokens = max_tokens: every step bans the stop tokens through the allowed-token mask
    sampling = SamplingParams(temperature=0, max_tokens=4, min_tokens=4,
                              logit_bias=_bias(engine), **PENALTIES)
    req = DecodeRequest("r", ids, text, sampling, 1, strategy,
                        STRATEGIES[strategy].params.model_validate(params),
                        RewardRegistry.default().build(None), messages=MESSAGES)

    async def go():
        calls = dispatch.SAMPLE_CALLS
        events = [e async for e in STRATEGIES[strategy].run(DecodeContext(engine, req))]
        return events, dispatch.SAMPLE_CALLS - calls, dispatch.LAST_SAMPLE

    events, calls, last = _run(engine, go())
    (final,) = [e for e in events if type(e).__name__ == "ChoiceFinal"]
    assert len(final.token_ids) == 4 and calls == 4  # one fused call per sampled token
    # greedy, no top-k / top-p / min-p: on a CPU the C++ sampler where it was built
    cpu_path = "cpu" if sampling_cpu.available(torch.zeros(1, 1)) else "reference"
    assert last.path == ("triton" if engine.device.type == "cuda" else cpu_path)
    assert (last.penalties, last.bias, last.allowed) == (True, True, True)
    assert getattr(last, steered) and last.rows == 1
    assert not set(final.token_ids) & set(engine.eos_token_ids)


def _dense_penalties(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
    """The pre-refactor per-row penalty loop (vLLM's semantics), on one row."""
    if not out:
        return logits
    counts = torch.bincount(torch.tensor(out), minlength=logits.shape[-1]).float()
    seen = counts > 0
    rp = PENALTIES["repetition_penalty"]
    x = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return x - PENALTIES["frequency_penalty"] * counts - PENALTIES["presence_penalty"] * seen


def _greedy(engine, steering, early_layer=None, steps=8):
    """Greedy tokens of a steered generate with penalties and bias, and per step what the
    engine was shown (raw logits, hidden state, early-layer logits) with the penalised, biased
    logits computed outside it."""
    _, ids = engine.encode_chat(MESSAGES)
    bias = _bias(engine)
    seen = []

    def observer(seqs, logits, inputs):
        early = inputs.early_logits
        seen.append((logits[0].clone(), inputs.hidden[0].clone(),
                     None if early is None else early[0].clone()))

    async def go():
        seq = await engine.prefill(ids, early_layer=early_layer)
        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True,
                                logit_bias=bias, **PENALTIES)
        async for _ in engine.generate([seq], params, steering=steering, observer=observer):
            pass
        await engine.release([seq])
        return seq.output_ids

    tokens = _run(engine, go())
    assert len(seen) == len(tokens) == steps
    out = []
    for t, (raw, hidden, early) in enumerate(seen):
        x = _dense_penalties(raw, tokens[:t]).clone()  # a normal tensor (not inference mode)
        x[list(bias)] += torch.tensor(list(bias.values()))
        out.append((raw, x, hidden, early))
    return tokens, out


def test_vas_on_the_engine_is_the_strategy_formula_outside_it(live_server):
    engine = live_server.engine
    params = VasParams(beta=3.0, top_k=6)
    models = resolve_value_models(params, engine, None)
    tokens, steps = _greedy(engine, vas_steering(models, params))
    moved = 0
    for t, (raw, x, hidden, _) in enumerate(steps):
        ids = candidates(raw[None], params.top_k)  # the model's own top_k (VAS's C(s))
        qs = [vm.q_values(hidden[None], ids) for vm, _ in models]
        values = combine_values(qs, [w for _, w in models], ids)[0]
        scores = torch.full_like(x, float("-inf"))
        scores[ids[0]] = x[ids[0]] + params.beta * values
        assert int(scores.argmax()) == tokens[t], t
        moved += int(scores.argmax()) != int(x.argmax())
    assert moved > 0  # the value model changed at least one choice


def test_contrastive_on_the_engine_is_the_strategy_formula_outside_it(live_server):
    """Penalties and bias apply to the expert's logits before the combination (the fused
    pass's order); the combination on log-probs (decoding.contrastive.contrast_scores) and on
    logits differ by a per-row constant, so the argmax agrees up to rounding."""
    engine = live_server.engine
    steer = Steering(contrastive=ContrastiveSteer(EarlyLayers(8), alpha=0.1, beta=1.0))
    tokens, steps = _greedy(engine, steer, early_layer=8)
    moved = 0
    for t, (_, x, _, early) in enumerate(steps):
        scores = contrast_scores(x[None], early[None], alpha=0.1, beta=1.0)[0]
        # fp32 log-softmax of ~50k logits of size ~30: a few ulps of 30 (1e-5) per side
        assert float(scores[tokens[t]]) >= float(scores.max()) - 1e-4, t
        moved += int(scores.argmax()) != int(x.argmax())
    assert moved > 0  # the amateur changed at least one choice


def test_a_served_amateur_runs_in_lockstep_inside_the_engine(live_server):
    """`ServedAmateur`: the expert engine opens the amateur's context on the other engine, feeds
    it each sampled token and waits for its logits; the tokens are those of a lockstep loop
    driven from outside (both engines' logits, the combination, extend both) and nothing of the
    amateur's stays allocated."""
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.engine.protocol import TokenTally
    from alignserve.engine.steering import ServedAmateur

    engine = live_server.engine
    amateur = NativeEngine.load(random_weights=True)  # the same vocabulary, other weights
    _, ids = engine.encode_chat(MESSAGES)
    steer = Steering(contrastive=ContrastiveSteer(ServedAmateur("other", amateur), alpha=0.1,
                                                  beta=0.5))

    async def go():
        await amateur.start()
        try:
            tally = TokenTally()
            seq = await engine.prefill(ids)
            params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            async for _ in engine.generate([seq], params, steering=steer, tally=tally):
                pass
            await engine.release([seq])
            used = amateur.kv.used_slots
            # the same steps driven from outside
            e, a = await engine.prefill(ids), await amateur.prefill(ids)
            scores = []
            for tok in seq.output_ids:
                le, la = await engine.logits([e]), await amateur.logits([a])
                scores.append(contrast_scores(le, la, alpha=0.1, beta=0.5)[0])
                await engine.extend([e], [[tok]])
                await amateur.extend([a], [[tok]])
            await engine.release([e])
            await amateur.release([a])
            return seq.output_ids, scores, used, tally
        finally:
            await amateur.close()

    tokens, scores, used, tally = _run(engine, go())
    assert used == 0  # the amateur's context went with the generate call
    for t, (tok, s) in enumerate(zip(tokens, scores)):
        assert float(s[tok]) >= float(s.max()) - 1e-4, t
    # the amateur's prompt (the expert's was prefilled outside this tally); 5 fed tokens on
    # each engine (the last sampled token is never fed)
    assert (tally.prefill, tally.decode) == (len(ids), 2 * 5)
