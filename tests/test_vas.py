"""VAS without a server: the exact formula on small fixed tables, TD(lambda) targets, the
value head, its storage and registry, and a tiny fit whose loss goes down."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from fakes.fake_engine import FakeEngine

from alignserve.decoding.base import StrategyInputError
from alignserve.decoding.resources import DecodingResources
from alignserve.decoding.vas import (
    VasParams,
    candidates,
    combine_values,
    resolve_value_models,
    steering,
    vas_logits,
)
from alignserve.rewardmodels.value.model import (
    ValueHead,
    ValueModel,
    ValueModelConfig,
    ValueModelError,
    load_value_model,
)
from alignserve.rewardmodels.value.registry import ValueModelRegistry, shipped_registry
from alignserve.rewardmodels.value.td import lambda_returns

NEG = float("-inf")


def close(actual: torch.Tensor, expected) -> None:
    """Exact table comparison up to float rounding (-inf must match -inf)."""
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the formula, by hand


def test_top_k_candidates_are_the_base_models_best_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0],
                           [5.0, NEG, NEG, NEG, 4.0]])
    ids = candidates(logits, 3)
    assert ids[0].tolist() == [1, 3, 2]
    # only two finite tokens in row 1: the third slot is padding (-1)
    assert ids[1].tolist() == [0, 4, -1]
    assert candidates(logits, 100).shape == (2, 5)  # k is capped at the vocabulary


def test_centring_and_masking_on_a_fixed_table():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    ids = torch.tensor([[1, 0, 2]])
    q = torch.tensor([[0.2, 0.5, 0.8]])  # Q of tokens 1, 0, 2; mean 0.5
    values = combine_values([q], [1.0], ids)
    close(values, [[-0.3, 0.0, 0.3]])
    out = vas_logits(logits, ids, values, beta=2.0, keep_non_candidates=False)
    # token 0: 1 + 2*0; token 1: 2 + 2*(-0.3); token 2: 0.5 + 2*0.3; token 3 masked
    assert out[0, :3].tolist() == pytest.approx([1.0, 1.4, 1.1])
    assert out[0, 3] == NEG
    kept = vas_logits(logits, ids, values, beta=2.0, keep_non_candidates=True)
    assert kept[0].tolist() == pytest.approx([1.0, 1.4, 1.1, -1.0])
    # among candidates the distribution is pi0 * exp(beta * Q), whatever the centring
    p = torch.softmax(out[0, :3], 0)
    ref = torch.softmax(logits[0, :3], 0) * torch.exp(2.0 * torch.tensor([0.5, 0.2, 0.8]))
    assert p.tolist() == pytest.approx((ref / ref.sum()).tolist())


def test_beta_zero_is_the_base_model_restricted_to_its_top_k():
    logits = torch.tensor([[0.1, 2.0, 1.0, 0.0]])
    ids = candidates(logits, 2)
    values = combine_values([torch.tensor([[5.0, -5.0]])], [1.0], ids)
    out = vas_logits(logits, ids, values, beta=0.0, keep_non_candidates=False)
    assert out[0].tolist() == [NEG, 2.0, 1.0, NEG]


def test_composition_of_two_value_models_with_weights():
    ids = torch.tensor([[0, 1, 2], [2, 1, -1]])
    q1 = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 9.0]])  # row 1's third entry is padding
    q2 = torch.tensor([[3.0, 0.0, 0.0], [4.0, 2.0, 7.0]])
    values = combine_values([q1, q2], [0.5, -2.0], ids)
    # row 0: q1 centred [-1, 0, 1], q2 centred [2, -1, -1] -> 0.5*q1 - 2*q2
    assert values[0].tolist() == pytest.approx([-4.5, 2.0, 2.5])
    # row 1: over the two valid candidates only: q1 [-0.5, 0.5], q2 [1, -1]; padding 0
    assert values[1].tolist() == pytest.approx([-2.25, 2.25, 0.0])
    logits = torch.zeros(2, 4)
    out = vas_logits(logits, ids, values, beta=2.0, keep_non_candidates=False)
    assert out[0].tolist() == pytest.approx([-9.0, 4.0, 5.0, NEG])
    assert out[1].tolist() == pytest.approx([NEG, 4.5, -4.5, NEG])


# ------------------------------------------------------------------ TD(lambda) targets


def test_lambda_returns_by_hand():
    # one episode of 3 steps (reward 1 at the end), one of 2 steps (reward 0.4) padded
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.4, 0.0]])
    next_v = torch.tensor([[0.5, 0.8, 99.0], [0.2, 99.0, 99.0]])  # 99: never read
    mask = torch.tensor([[True, True, True], [True, True, False]])
    g = lambda_returns(rewards, next_v, mask, gamma=1.0, lam=0.5)
    # ep 0: G2 = 1; G1 = 0.5*0.8 + 0.5*1 = 0.9; G0 = 0.5*0.5 + 0.5*0.9 = 0.7
    # ep 1: G1 = 0.4; G0 = 0.5*0.2 + 0.5*0.4 = 0.3; padding 0
    close(g, [[0.7, 0.9, 1.0], [0.3, 0.4, 0.0]])
    # lambda 1 is Monte Carlo; lambda 0 is one-step TD
    close(lambda_returns(rewards, next_v, mask, 1.0, 1.0), [[1.0, 1.0, 1.0], [0.4, 0.4, 0.0]])
    close(lambda_returns(rewards, next_v, mask, 1.0, 0.0), [[0.5, 0.8, 1.0], [0.2, 0.4, 0.0]])
    # gamma discounts each step back
    g = lambda_returns(rewards, next_v, mask, gamma=0.5, lam=1.0)
    assert g[0].tolist() == pytest.approx([0.25, 0.5, 1.0])


# ------------------------------------------------------------------ the head


def _tiny_model(vocab=6, hidden=4, seed=0, name="tiny") -> tuple[ValueModel, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(vocab, hidden, generator=g)
    head = ValueHead(hidden)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    head.set_input_scales(hidden_rms=1.5, token_rms=0.7)  # saved with the weights
    cfg = ValueModelConfig(base_model="toy", hidden_size=hidden, vocab_size=vocab,
                           reward=[{"name": "sentiment"}])
    return ValueModel(head, cfg, name=name).bind(tokens), tokens


def test_head_formula_and_state_value():
    vm, tokens = _tiny_model()
    head = vm.head
    head.set_input_scales(hidden_rms=2.0, token_rms=0.5)
    h = torch.randn(3, 4)
    ids = torch.tensor([[0, 1], [2, 3], [5, 4]])
    q = vm.q_values(h, ids)
    with torch.no_grad():
        for b in range(3):
            x = h[b] / 2.0
            for k in range(2):
                e = tokens[ids[b, k]] / 0.5
                # Q = e.W x / H + e.b / sqrt(H) + u.x / sqrt(H) + c, H = 4
                want = (e @ head.weight @ x / 4 + e @ head.bias / 2
                        + head.state_weight @ x / 2 + head.state_bias)
                assert float(q[b, k]) == pytest.approx(float(want), rel=1e-5, abs=1e-5)
    probs = torch.tensor([[0.25, 0.75]] * 3)
    assert vm.state_values(h, ids, probs).tolist() == pytest.approx(
        (q * probs).sum(-1).tolist(), rel=1e-6)


def test_low_rank_head_starts_at_zero_advantage():
    head = ValueHead(8, rank=2, init_value=0.3)
    q = head(torch.randn(2, 8), torch.randn(2, 5, 8))
    assert torch.allclose(q, torch.full((2, 5), 0.3))
    assert sum(p.numel() for p in head.parameters()) == 2 * 8 * 2 + 8 + 8 + 1


def test_native_value_guidance_adds_value_models_to_logits():
    """The native engine's VAS input (engine/native/steering_inputs.py) from the strategy's
    Steering, through the fused pass's reference."""
    from alignserve.engine.native.sequence import GenGroup, SeqState
    from alignserve.engine.native.steering_inputs import value_guidance
    from alignserve.engine.protocol import EngineError, SamplingParams, SeqHandle
    from alignserve.kernels.logits_ops import process_logits_reference

    vm, tokens = _tiny_model()
    vm2, _ = _tiny_model(seed=1)
    vm2.bind(tokens)
    hidden = torch.randn(2, 4)
    logits = torch.randn(2, 6)
    params = VasParams(beta=3.0, top_k=3, value_models=[{"name": "a"}])
    group = GenGroup(SamplingParams(), steering([(vm, 1.0), (vm2, 0.5)], params), None, None,
                     None, "decode", frozenset())
    states = [SeqState(i, SeqHandle(i, 1, [0]), [], hidden=hidden[i]) for i in range(2)]
    out = process_logits_reference(logits, vas=value_guidance(states, group, logits, None))
    ids = candidates(logits, 3)
    q1, q2 = vm.q_values(hidden, ids), vm2.q_values(hidden, ids)
    want = logits.gather(1, ids) + 3.0 * ((q1 - q1.mean(1, keepdim=True))
                                          + 0.5 * (q2 - q2.mean(1, keepdim=True)))
    assert torch.allclose(out.gather(1, ids), want, atol=1e-5)
    assert int(torch.isfinite(out).sum()) == 6
    states[1].hidden = None
    with pytest.raises(EngineError, match="hidden"):
        value_guidance(states, group, logits, None)


def test_save_load_and_shape_check(tmp_path):
    vm, tokens = _tiny_model()
    vm.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["hidden_size"] == 4 and cfg["vocab_size"] == 6 and cfg["base_model"] == "toy"
    back = load_value_model(tmp_path / "m").bind(tokens)
    h, ids = torch.randn(2, 4), torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(back.q_values(h, ids), vm.q_values(h, ids))
    with pytest.raises(ValueModelError, match="hidden 4, vocabulary 6.*hidden 5, vocabulary 6"):
        back.bind(torch.randn(6, 5), "other-model")
    with pytest.raises(ValueModelError, match="no config.json"):
        load_value_model(tmp_path)


# ------------------------------------------------------------------ registry and params


class _Engine:
    """Just enough of an engine for resolving value models: a token matrix and a name."""

    def __init__(self, vocab: int, hidden: int, name: str = "toy"):
        self.model = torch.nn.Module()
        self.model.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.model_name = name


def test_registry_lazy_load_describe_and_mismatch(tmp_path):
    vm, _ = _tiny_model()
    vm.save(tmp_path / "toy-value")
    reg = ValueModelRegistry()
    reg.add_spec(f"mine={tmp_path / 'toy-value'}", load=False)
    assert reg.names == ["mine"] and reg.default_name == "mine"
    assert reg.describe()[0]["base_model"] == "toy" and reg.describe()[0]["default"]
    reg.bind(_Engine(6, 4))
    assert reg["mine"].tokens is not None
    with pytest.raises(ValueModelError, match="trained on toy"):
        reg.bind(_Engine(6, 5, "bigger"))
    with pytest.raises(ValueModelError, match="NAME=DIR"):
        reg.add_spec("no-equals-sign")
    # server start-up: bind to the served model, then --value-model loads and checks at once
    served = ValueModelRegistry().bind(_Engine(6, 5, "bigger"))
    with pytest.raises(ValueModelError, match="hidden 4.*hidden 5"):
        served.add_spec(f"mine={tmp_path / 'toy-value'}")
    with pytest.raises(ValueModelError, match="not a value model"):
        reg.add("x", tmp_path)


def test_shipped_default_is_registered_and_matches_smollm2():
    reg = shipped_registry()
    assert reg.default_name == "sentiment-positive"
    (entry,) = [d for d in reg.describe() if d["name"] == "sentiment-positive"]
    assert entry["base_model"] == "SmolLM2-135M-Instruct"
    assert (entry["hidden_size"], entry["vocab_size"]) == (576, 49152)
    assert entry["reward"] == [{"name": "sentiment", "target": "positive"}]
    train = entry["training"]
    assert train["heldout_loss"] < train["constant_loss"]


def test_params_defaults_and_bounds():
    p = VasParams()
    assert p.value_models is None and not p.keep_non_candidates and 1 <= p.top_k <= 100
    from pydantic import ValidationError

    for bad in ({"beta": -1}, {"beta": 51}, {"top_k": 0}, {"top_k": 101},
                {"value_models": []}, {"value_models": [{"name": "x", "extra": 1}]},
                {"value_models": [{"name": "x", "weight": math.inf}]}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            VasParams.model_validate(bad)


def test_unknown_or_mismatched_value_model_names_the_field(tmp_path):
    engine = _Engine(6, 4)
    params = VasParams.model_validate({"value_models": [{"name": "sentiment-positive"},
                                                       {"name": "nope"}]})
    with pytest.raises(StrategyInputError) as e:
        resolve_value_models(params, _Engine(49152, 576, "SmolLM2-135M-Instruct"), None)
    assert e.value.param == "alignment.value_models[1].name" and "nope" in e.value.message
    # the shipped default does not fit a toy model: a clear 400, not a crash mid-decode
    with pytest.raises(StrategyInputError) as e:
        resolve_value_models(VasParams(), engine, None)
    assert e.value.param == "alignment.value_models" and "576" in e.value.message
    # the server's resources: a directory or a loaded model by name
    vm, _ = _tiny_model()
    vm.save(tmp_path / "toy")
    res = DecodingResources(value_models={"toy": str(tmp_path / "toy")})
    got = resolve_value_models(VasParams.model_validate(
        {"value_models": [{"name": "toy", "weight": 2.0}]}), engine, res)
    assert got[0][1] == 2.0 and got[0][0].tokens.shape == (6, 4)
    # a registry as the server's value models: its default serves requests that name none
    reg = ValueModelRegistry()
    reg.add("toy", tmp_path / "toy", make_default=True)
    (vm_default, weight), = resolve_value_models(VasParams(), engine,
                                                 DecodingResources(value_models=reg.bind(engine)))
    assert vm_default is reg["toy"] and weight == 1.0


# ------------------------------------------------------------------ candidates: VAS + best-of-N


class _BranchEngine(FakeEngine):
    """A fake engine that gives VAS what it needs (a token matrix, hidden states) and makes
    branch i of a generate call say word i+1, then stop: distinct texts to rank."""

    WORDS = ("<eos>", " good", " bad", " great", " fine", " okay")

    def __init__(self):
        super().__init__(self.WORDS, {})
        self.model = torch.nn.Module()
        self.model.lm_head = torch.nn.Linear(4, 6, bias=False)
        self.processed = 0  # rows VAS steered

    @staticmethod
    def _steer(value, logits, hidden):
        """The steering's VAS on these logits, as an engine applies it (logits_ops)."""
        from alignserve.kernels.logits_ops import (
            ValueGuidance,
            centred_value_sum,
            process_logits_reference,
            top_candidates,
        )

        ids = top_candidates(logits, value.top_k)
        qs = [vm.q_values(hidden, ids.clamp_min(0)) for vm, _ in value.models]
        b = logits.shape[0]
        vg = ValueGuidance(ids, centred_value_sum(qs, [w for _, w in value.models], ids),
                           torch.full((b,), value.beta), torch.full((b,), value.keep_others))
        return process_logits_reference(logits, vas=vg)

    async def generate(self, seqs, params, steering=None, tally=None, kind="decode",
                       observer=None):
        self._call("generate")
        live = list(seqs)
        branch = {s.key: i for i, s in enumerate(seqs)}
        while live:
            logits = torch.full((len(live), 6), -2.0)
            for row, s in enumerate(live):
                logits[row, 0 if s.num_output else 1 + branch[s.key] % 5] = 5.0
            logits = self._steer(steering.value, logits, torch.randn(len(live), 4))
            self.processed += len(live)
            events, nxt = [], []
            for s, row in zip(live, logits):
                tok = int(torch.argmax(row))
                reason = "stop" if tok == 0 else None
                # the event says 0.0; the handle's log-likelihood falls with the branch index
                events.append(self.commit(s, tok, 0.0, reason))
                s.cumulative_logprob -= 0.1 * branch[s.key]
                if reason is None:
                    nxt.append(s)
            if tally:
                tally.add(kind, len(nxt))
            live = nxt
            yield events


def _vas_run(alignment: dict, n: int = 1, rewards=None, stream: bool = False):
    from alignserve.decoding.base import DecodeContext, DecodeRequest
    from alignserve.decoding.vas import STRATEGY
    from alignserve.engine.protocol import SamplingParams
    from alignserve.rewardmodels.compose import RewardRegistry

    engine = _BranchEngine()
    vm, _ = _tiny_model()
    reward = RewardRegistry.default().build(rewards, param="alignment.rewards") if rewards else None
    req = DecodeRequest(request_id="r", prompt_ids=[1, 2, 3], prompt_text=" good bad great",
                        sampling=SamplingParams(temperature=0.0, max_tokens=4), n=n,
                        strategy="vas", params=VasParams.model_validate(alignment),
                        reward=reward, stream=stream)
    ctx = DecodeContext(engine, req, resources=DecodingResources(value_models={"toy": vm}))

    async def collect():
        return [ev async for ev in STRATEGY.run(ctx)]

    return engine, asyncio.run(collect())


# keywords "great" (1.0) plus regex "fine" (0.5): branch texts " good", " bad", " great",
# " fine", " okay" score 0, 0, 1, 0.5, 0
RANKED = [{"name": "keywords", "weight": 1.0, "keywords": ["great"]},
          {"name": "regex", "weight": 0.5, "pattern": "fine"}]
TOY = {"value_models": [{"name": "toy"}], "beta": 0.0, "top_k": 2}


def test_candidates_return_the_best_n_by_reward_sharing_one_prefill():
    from alignserve.decoding.base import ChoiceDelta, ChoiceFinal, RequestSummary

    engine, events = _vas_run({**TOY, "candidates": 5}, n=2, rewards=RANKED)
    finals = [e for e in events if isinstance(e, ChoiceFinal)]
    assert [(c.index, c.text, c.reward) for c in finals] == [(0, " great", 1.0), (1, " fine", 0.5)]
    assert finals[1].components == {"keywords": 0.0, "regex": 1.0}
    assert not any(isinstance(e, ChoiceDelta) for e in events)  # not streamed: whole choices
    (summary,) = [e for e in events if isinstance(e, RequestSummary)]
    # the prompt (3 tokens) is computed once for all 5 candidates; each decodes 1 fed token
    assert (summary.tally.prefill, summary.tally.decode, summary.model_tokens) == (3, 5, 8)
    assert summary.candidates_scored == 5 and summary.completion_tokens == 4
    assert engine.calls["prefill"] == 1 and engine.calls["fork"] == 1
    assert engine.processed == 10  # every candidate's every step went through VAS
    assert engine.live == {}  # every branch released


def test_candidates_without_rewards_return_the_most_likely_n_and_stream_winners():
    from alignserve.decoding.base import ChoiceDelta, ChoiceFinal, RequestSummary

    _, events = _vas_run({**TOY, "candidates": 4}, n=2, stream=True)
    finals = [e for e in events if isinstance(e, ChoiceFinal)]
    assert [(c.text, c.reward, c.streamed) for c in finals] == [(" good", None, True),
                                                                (" bad", None, True)]
    deltas = [e for e in events if isinstance(e, ChoiceDelta)]
    assert [(d.index, d.text) for d in deltas] == [(0, " good"), (1, " bad")]
    # ranked by log-likelihood: counted as scored, as best_of_n counts them
    assert events[-1].candidates_scored == 4 and isinstance(events[-1], RequestSummary)
    # candidates == n (and the default, n): plain VAS, every branch, token by token
    for alignment in ({**TOY, "candidates": 2}, TOY):
        _, plain = _vas_run(alignment, n=2, rewards=RANKED)
        finals = sorted((e for e in plain if isinstance(e, ChoiceFinal)), key=lambda c: c.index)
        assert [(c.text, c.reward) for c in finals] == [(" good", 0.0), (" bad", 0.0)]
        assert plain[-1].tally.prefill == 3 and plain[-1].tally.decode == 2


def test_candidates_bounds():
    from pydantic import ValidationError

    assert VasParams().candidates is None  # default: n
    assert VasParams.model_validate({"candidates": 64}).candidates == 64
    for bad in (0, 65, -1, 2.5):
        with pytest.raises(ValidationError):
            VasParams.model_validate({"candidates": bad})
