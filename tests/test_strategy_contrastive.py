"""`contrastive`: the combination on fixed logit tables, amateur resolution and validation, the
steering the strategy hands the engine, the strategy on a fake engine (self:L and a served
amateur), and end to end on the live server (the native engine runs the amateur itself)."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch
from fakes.fake_engine import FakeEngine
from pydantic import ValidationError

from alignserve.decoding.base import DecodeContext, DecodeRequest, StrategyInputError
from alignserve.decoding.contrastive import (
    LAME,
    STRATEGY,
    Amateur,
    ContrastiveParams,
    contrast_scores,
    default_self_layer,
    lame_prompt_ids,
    resolve_amateur,
    steering,
)
from alignserve.decoding.resources import DecodingResources
from alignserve.engine.protocol import SamplingParams
from alignserve.engine.steering import (
    AmateurPrompt,
    ContrastiveSteer,
    EarlyLayers,
    ServedAmateur,
    Steering,
)
from alignserve.rewardmodels.compose import RewardRegistry

L = math.log
NEG = float("-inf")

# ---- the combination on fixed tables ---------------------------------------------------------


def test_mask_and_scores_by_hand():
    pe = [0.5, 0.3, 0.15, 0.05]
    pa = [0.7, 0.1, 0.1, 0.1]
    # logits are log-probs plus an arbitrary per-row shift: the formula works on log-softmax
    expert = torch.tensor([[L(p) + 3.0 for p in pe]])
    amateur = torch.tensor([[L(p) - 1.0 for p in pa]])
    got = contrast_scores(expert, amateur, alpha=0.25, beta=0.5)
    # plausible: p_e >= 0.25 * 0.5 = 0.125 -> tokens 0, 1, 2; token 3 (0.05) is cut
    want = [1.5 * L(0.5) - 0.5 * L(0.7), 1.5 * L(0.3) - 0.5 * L(0.1),
            1.5 * L(0.15) - 0.5 * L(0.1), NEG]
    torch.testing.assert_close(got, torch.tensor([want]))
    # the contrast moves the argmax off the expert's (0) to the token the amateur underrates
    assert int(got.argmax()) == 1
    # beta 0: the expert's log-probs on the plausible set
    got0 = contrast_scores(expert, amateur, alpha=0.25, beta=0.0)
    torch.testing.assert_close(got0, torch.tensor([[L(0.5), L(0.3), L(0.15), NEG]]))
    # alpha 1: only the expert's best token is plausible
    got1 = contrast_scores(expert, amateur, alpha=1.0, beta=0.5)
    assert torch.isfinite(got1).tolist() == [[True, False, False, False]]


def test_rows_are_independent():
    expert = torch.log(torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    amateur = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5]]))
    got = contrast_scores(expert, amateur, alpha=0.5, beta=1.0)
    want = [[2 * L(0.6) - L(0.9), 2 * L(0.4) - L(0.1)], [2 * L(0.4) - L(0.5), 2 * L(0.6) - L(0.5)]]
    torch.testing.assert_close(got, torch.tensor(want))


def test_each_amateur_becomes_the_engines_steering_data():
    """The strategy hands the engine data, the same on every engine: which amateur, alpha, beta."""
    params = ContrastiveParams(alpha=0.5, beta=2.0)
    served = object()
    for amateur, source in [
        (Amateur("self", "self:3", layer=3), EarlyLayers(3)),
        (Amateur(LAME, LAME, lame_ids=[7, 8]), AmateurPrompt((7, 8))),
        (Amateur("model", "small", engine=served), ServedAmateur("small", served)),
    ]:
        assert steering(amateur, params) == Steering(
            contrastive=ContrastiveSteer(source, alpha=0.5, beta=2.0))


def test_params_validation():
    p = ContrastiveParams()
    assert (p.amateur, p.alpha, p.beta, p.lame_prompt) == (None, 0.1, 2.0, None)
    for ok in ["self:8", "lame_prompt", "tiny-amateur", "smol_135m.v2"]:
        assert ContrastiveParams(amateur=ok).amateur == ok
    bad = [{"amateur": "self:x"}, {"amateur": "self:0"}, {"amateur": "a b"}, {"amateur": ""},
           {"alpha": 0}, {"alpha": 1.5}, {"beta": -0.1}, {"beta": 11}, {"gamma": 1},
           {"amateur": "self:4", "lame_prompt": "hi"}, {"lame_prompt": ""}]
    for b in bad:
        with pytest.raises(ValidationError) as e:
            ContrastiveParams.model_validate(b)
        field = "lame_prompt" if "lame_prompt" in b else next(iter(b))
        assert e.value.errors()[0]["loc"][0] == field
    props = ContrastiveParams.model_json_schema()["properties"]
    assert props["alpha"]["exclusiveMinimum"] == 0 and props["alpha"]["maximum"] == 1
    assert props["beta"]["maximum"] == 10


# ---- resolution and the strategy on fake engines -----------------------------------------------

# tokens: 0 EOS, 1 " the", 2 " cat", 3 " sat", 4 "Q:" (the prompt)
WORDS = ["", " the", " cat", " sat", "Q:"]
EXPERT = {4: [.04, .5, .3, .16, 0], 1: [.1, .1, .7, .1, 0], 2: [.6, .05, .05, .3, 0],
          3: [.9, .05, .03, .02, 0], 0: [1, 0, 0, 0, 0]}
AMATEUR = {4: [.05, .8, .1, .05, 0], 1: [.1, .1, .7, .1, 0], 2: [.2, .1, .1, .6, 0],
           3: [.9, .05, .03, .02, 0], 0: [1, 0, 0, 0, 0]}
# by hand (alpha .1, beta .5): after "Q:" the plausible set is {the, cat, sat} and
# 1.5 ln .3 - .5 ln .1 (cat) beats 1.5 ln .5 - .5 ln .8 (the); after " cat" EOS
# (1.5 ln .6 - .5 ln .2) beats sat (1.5 ln .3 - .5 ln .6). Greedy on the expert: " the cat".


def _request(params, n=1, messages=None, max_tokens=6, prompt=(4,), stream=False, **sampling):
    return DecodeRequest("r", list(prompt), "Q:",
                         SamplingParams(temperature=0, max_tokens=max_tokens, **sampling), n,
                         "contrastive", ContrastiveParams.model_validate(params),
                         RewardRegistry.default().build(None), stream=stream, messages=messages)


def _run(engine, req, resources=None):
    async def go():
        return [e async for e in STRATEGY.run(DecodeContext(engine, req, resources=resources))]
    return asyncio.run(go())


def _finals(events):
    return [e for e in events if type(e).__name__ == "ChoiceFinal"]


def test_resolution_default_bounds_and_names():
    eng = FakeEngine(WORDS, EXPERT, num_layers=30)
    assert default_self_layer(30) == 4
    assert resolve_amateur(_request({}), eng, None).layer == 4
    assert resolve_amateur(_request({}), eng, DecodingResources(default_amateur="self:3")).layer == 3
    for spec, message in [("self:30", "[1, 29]"), ("self:99", "[1, 29]"), ("nope", "unknown")]:
        with pytest.raises(StrategyInputError) as e:
            STRATEGY.check(_request({"amateur": spec}), eng, None)
        assert e.value.param == "alignment.amateur" and message in str(e.value)
    other_vocab = FakeEngine(WORDS + [" extra"], {})
    same_vocab = FakeEngine(WORDS, AMATEUR)
    res = DecodingResources(amateurs={"big": other_vocab, "small": same_vocab})
    with pytest.raises(StrategyInputError) as e:
        STRATEGY.check(_request({"amateur": "big"}), eng, res)
    assert e.value.param == "alignment.amateur" and "vocabulary" in str(e.value)
    assert resolve_amateur(_request({"amateur": "small"}), eng, res).engine is same_vocab


def test_lame_prompt_is_the_last_user_message_or_the_given_text():
    eng = FakeEngine(["", " a", " b", " c", " d", " e"], {})
    chat = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"}, {"role": "user", "content": "d e"}]
    assert lame_prompt_ids(_request({"amateur": "lame_prompt"}, messages=chat), eng) == [4, 5]
    assert lame_prompt_ids(_request({"lame_prompt": "c"}, messages=chat), eng) == [3]
    assert lame_prompt_ids(_request({"lame_prompt": "b c"}), eng) == [2, 3]  # completions
    eng.tokenizer.bos_token_id = 1
    assert lame_prompt_ids(_request({"amateur": "lame_prompt"}), eng) == [1]  # no context
    assert resolve_amateur(_request({"lame_prompt": "c"}, messages=chat), eng, None).kind == \
        "lame_prompt"


def test_self_amateur_and_served_amateur_decode_the_hand_computed_tokens():
    greedy = FakeEngine(WORDS, EXPERT, early_table=AMATEUR)
    (g,) = _finals(_run(greedy, _request({"beta": 0.0, "alpha": 1.0, "amateur": "self:2"})))
    assert g.text == " the cat" and g.token_ids == [1, 2, 0]  # beta 0, alpha 1: greedy
    # self:L: the engine's early-exit logits (here the AMATEUR table), steered by data
    eng = FakeEngine(WORDS, EXPERT, early_table=AMATEUR)
    events = _run(eng, _request({"amateur": "self:2"}))
    (f,) = _finals(events)
    assert f.text == " cat" and f.token_ids == [2, 0] and f.finish_reason == "stop"
    assert f.cumulative_logprob == pytest.approx(L(0.3) + L(0.6))  # the expert's log-probs
    assert "".join(e.text for e in events if type(e).__name__ == "ChoiceDelta") == f.text
    assert not eng.live
    # a served amateur with the same table: the same tokens
    expert, amateur = FakeEngine(WORDS, EXPERT), FakeEngine(WORDS, AMATEUR)
    res = DecodingResources(amateurs={"small": amateur})
    events = _run(expert, _request({"amateur": "small"}, n=2), res)
    finals = sorted(_finals(events), key=lambda c: c.index)
    assert [c.token_ids for c in finals] == [[2, 0], [2, 0]]
    assert finals[0].cumulative_logprob == pytest.approx(L(0.3) + L(0.6))
    assert "".join(e.text for e in events if type(e).__name__ == "ChoiceDelta"
                   and e.index == 0) == " cat"
    assert events[-1].completion_tokens == 4
    assert not expert.live and not amateur.live
    # with max_tokens and min_tokens (EOS banned before it)
    expert, amateur = FakeEngine(WORDS, EXPERT), FakeEngine(WORDS, AMATEUR)
    res = DecodingResources(amateurs={"small": amateur})
    (c,) = _finals(_run(expert, _request({"amateur": "small"}, max_tokens=1), res))
    assert (c.token_ids, c.finish_reason) == ([2], "length")
    (c,) = _finals(_run(expert, _request({"amateur": "small"}, min_tokens=2), res))
    assert c.token_ids[:2] == [2, 3]  # EOS banned: sat is the only other plausible token


# ---- live server ------------------------------------------------------------------------------


def _chat(client, model, messages, max_tokens=8, stream=False, **alignment):
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=stream,
        extra_body={"alignment": alignment})


PROMPTS = [
    [{"role": "user", "content": "Write a short story about a dragon."}],
    [{"role": "system", "content": "You are a pirate. Always answer like a pirate, saying arr."},
     {"role": "user", "content": "Describe the sea."}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "What is your favourite food?"}],
]


@pytest.mark.parametrize("alignment", [{}, {"amateur": "self:4"}, {"amateur": "lame_prompt"}])
def test_live_contrastive_answers_and_differs_from_greedy(client, model_name, alignment):
    differs = []
    # a lame prompt differs from the prompt only where there is a system prompt to drop
    for msgs in PROMPTS[1:] if alignment.get("amateur") == "lame_prompt" else PROMPTS:
        greedy = _chat(client, model_name, msgs, strategy="sample").choices[0].message.content
        r = _chat(client, model_name, msgs, strategy="contrastive", **alignment)
        text = r.choices[0].message.content
        assert text and r.alignment["strategy"] == "contrastive"
        differs.append(text != greedy)
        if any(differs):
            break
    assert any(differs)


@pytest.mark.parametrize("alignment", [{"amateur": "self:8"}, {"amateur": "lame_prompt"}])
def test_live_contrastive_stream_joins_to_the_non_streamed_text(client, model_name, alignment,
                                                              exact_engine):
    # exact: n=2 is another batch shape, where bf16 rounding may flip a near tie (README)
    msgs = PROMPTS[1]
    whole = _chat(client, model_name, msgs, strategy="contrastive", **alignment).choices[0]
    chunks = list(_chat(client, model_name, msgs, stream=True, strategy="contrastive",
                        **alignment))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # tokens
    if alignment["amateur"] == "lame_prompt":  # n choices: each with its own follower
        two = client.chat.completions.create(
            model=model_name, messages=msgs, max_tokens=8, temperature=0, n=2,
            extra_body={"alignment": {"strategy": "contrastive", **alignment}})
        assert [c.message.content for c in two.choices] == [whole.message.content] * 2


@pytest.mark.parametrize(("alignment", "param"), [
    ({"amateur": "no-such-model"}, "alignment.amateur"),
    ({"amateur": "self:99"}, "alignment.amateur"),
    ({"amateur": "self:x"}, "alignment.amateur"),
    ({"alpha": 0}, "alignment.alpha"),
    ({"beta": 11}, "alignment.beta"),
])
def test_live_contrastive_bad_input_names_the_field(client, model_name, alignment, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model_name, PROMPTS[0], max_tokens=4, strategy="contrastive", **alignment)
    assert e.value.body["param"] == param


def test_live_engine_as_its_own_served_amateur_is_greedy(live_server, exact_engine):
    """A served amateur identical to the expert contrasts nothing: the engine's lockstep must
    then decode exactly greedy's tokens (checks that it feeds both engines). In exact fp32:
    greedy alone attends through a lone sequence's window, the two rows here through the
    grouped path, and bf16 rounding of that difference can flip a near-tie."""
    engine = live_server.engine
    msgs = PROMPTS[0]
    text, ids = engine.encode_chat(msgs)

    def req(strategy, params):
        from alignserve.decoding import STRATEGIES

        return DecodeRequest("r", ids, text, SamplingParams(temperature=0, max_tokens=8), 1,
                             strategy, STRATEGIES[strategy].params.model_validate(params),
                             RewardRegistry.default().build(None), messages=msgs)

    async def go():
        from alignserve.decoding import STRATEGIES

        out = []
        for strategy, params, res in [
            ("sample", {}, None),
            ("contrastive", {"amateur": "twin"}, DecodingResources(amateurs={"twin": engine})),
        ]:
            ctx = DecodeContext(engine, req(strategy, params), resources=res)
            out.append([e async for e in STRATEGIES[strategy].run(ctx)])
        return out

    greedy, twin = asyncio.run_coroutine_threadsafe(go(), engine.loop).result(300)
    assert _finals(twin)[0].token_ids == _finals(greedy)[0].token_ids
    assert twin[-1].tally.decode > greedy[-1].tally.decode  # both engines were fed


def test_live_repetition_penalty_is_the_strategys_unless_the_client_sets_one(client,
                                                                             model_name):
    """The strategy's repetition_penalty applies to the expert before the contrast; a client's
    own repetition_penalty takes its place (so two strategy values give the same text under it).
    A continuation prompt that greedy decoding loops on: the penalized text repeats less."""
    from alignserve.evaluation.metrics import repetition

    prompt = "The letter had no return address. Inside was"

    def complete(alignment, **extra):
        return client.completions.create(
            model=model_name, prompt=prompt, max_tokens=48, temperature=0,
            extra_body={"alignment": {"strategy": "contrastive", **alignment}, **extra}
        ).choices[0].text

    plain = complete({"repetition_penalty": 1.0})
    damped = complete({"repetition_penalty": 1.5})
    assert plain != damped
    assert repetition(damped, 4) < repetition(plain, 4)
    assert (complete({"repetition_penalty": 3.0}, repetition_penalty=1.5)
            == complete({"repetition_penalty": 1.0}, repetition_penalty=1.5))
