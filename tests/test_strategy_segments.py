"""The segment searches (speculative_rejection, particle_filter) and best_of_n's soft selection:
their arithmetic on fixed inputs, the driver on a bigram fake engine, and both strategies end to
end on the live server (the real model, the official client)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import Counter

import pytest
from fakes.fake_engine import FakeEngine
from pydantic import ValidationError

from alignserve.decoding.base import (
    STRATEGIES,
    ChoiceDelta,
    ChoiceFinal,
    DecodeContext,
    DecodeRequest,
    RequestSummary,
)
from alignserve.decoding.best_of_n import soft_pick
from alignserve.decoding.particle_filter import (
    ParticleFilterParams,
    softmax_weights,
    systematic_counts,
)
from alignserve.decoding.segments import PAUSE, entropy_boundary, kept_count, row_entropy
from alignserve.decoding.speculative_rejection import SpeculativeRejectionParams, prune
from alignserve.engine.protocol import SamplingParams
from alignserve.rewardmodels.compose import RewardRegistry

# ---- arithmetic ------------------------------------------------------------------------------


@pytest.mark.parametrize("weights, draws", [([0.5, 0.3, 0.2], 10), ([0.97, 0.01, 0.02], 4),
                                            ([0.25] * 4, 3), ([1.0], 5)])
def test_systematic_counts_are_floor_or_ceil_of_the_expected_draws(weights, draws):
    for u in (0.0, 0.3, 0.999):
        counts = systematic_counts(weights, draws, u)
        assert sum(counts) == draws
        for c, w in zip(counts, weights):
            assert math.floor(draws * w) - 1e-9 <= c <= math.ceil(draws * w) + 1e-9


def test_softmax_weights_follow_the_temperature():
    assert softmax_weights([1.0, 0.0], 1.0) == pytest.approx([1 / (1 + math.e ** -1),
                                                               1 / (1 + math.e)])
    sharp = softmax_weights([1.0, 0.5, 0.0], 0.01)
    assert sharp[0] == pytest.approx(1.0) and sum(sharp) == pytest.approx(1.0)
    assert softmax_weights([0.3, 0.3], 0.1) == [0.5, 0.5]


def test_kept_count_and_entropy_boundary():
    assert [kept_count(16, 0.5, 1), kept_count(3, 0.5, 1), kept_count(2, 0.25, 2),
            kept_count(5, 1.0, 1)] == [8, 2, 2, 5]
    # the boundary is the first token at or after the 2nd whose entropy reaches the threshold
    assert entropy_boundary([3.0, 0.1, 0.2, 2.5, 3.0], 2.0) == 3
    assert entropy_boundary([3.0, 3.0, 0.2], 2.0) is None
    import torch

    uniform = torch.zeros(1, 8)
    peaked = torch.tensor([[0.0] + [float("-inf")] * 7])
    assert row_entropy(torch.cat([uniform, peaked])).tolist() == pytest.approx([math.log(8), 0.0])


def test_soft_pick_is_seeded_tends_to_argmax_and_to_uniform():
    rewards = [0.2, 0.9, 0.5, 0.1]
    assert soft_pick(rewards, 2, 0.1, random.Random(7)) == soft_pick(rewards, 2, 0.1,
                                                                     random.Random(7))
    assert soft_pick(rewards, 1, 1e-4, random.Random(1)) == [1]
    picks = sorted(soft_pick(rewards, 4, 0.1, random.Random(3)))
    assert picks == [0, 1, 2, 3]  # without replacement
    # lambda 0.2: P(index 1) = e^(0.9/0.2) / sum = 0.802; 4000 draws give a standard error of
    # 0.0063, so 0.03 is over 4 of them
    rng = random.Random(11)
    counts = Counter(soft_pick(rewards, 1, 0.2, rng)[0] for _ in range(4000))
    expected = softmax_weights(rewards, 0.2)
    for i in range(4):
        assert counts[i] / 4000 == pytest.approx(expected[i], abs=0.03)


def test_params_bounds_and_defaults():
    sr = SpeculativeRejectionParams()
    pf = ParticleFilterParams.model_validate({"segment": "entropy", "resample_temperature": 0.5})
    # speculative_rejection's defaults follow the rewards: ties pause where a search can be
    # sure of the ceiling (keywords), and then it prunes harder
    build = RewardRegistry.default().build
    pausing = sr.resolved(build([{"name": "keywords", "keywords": ["a"]}]))
    assert (pausing.segment, pausing.keep, pausing.pause_ties) == (2, 0.55, True)
    for rewards in ([{"name": "sentiment"}], [{"name": "keywords", "keywords": ["a"]},
                                              {"name": "length", "target_words": 4}]):
        plain = sr.resolved(build(rewards))
        assert (plain.segment, plain.keep, plain.pause_ties) == (3, 0.7, False)
    assert sr.resolved(None).pause_ties is False
    given = SpeculativeRejectionParams(segment=5, keep=0.9, pause_ties=False)
    assert given.resolved(build([{"name": "keywords", "keywords": ["a"]}])) == given
    assert (ParticleFilterParams().segment, ParticleFilterParams().keep) == (3, 0.7)
    assert (sr.candidates, pf.segment, pf.resample_temperature) == (16, "entropy", 0.5)
    for bad in [{"segment": 0}, {"segment": "words"}, {"keep": 0}, {"keep": 1.5},
                {"candidates": 65}, {"max_segment": 1}, {"entropy_threshold": 0}, {"beam": 2}]:
        with pytest.raises(ValidationError):
            SpeculativeRejectionParams.model_validate(bad)
    with pytest.raises(ValidationError):
        ParticleFilterParams.model_validate({"resample_temperature": 0})


def test_prune_ranks_by_partial_reward_and_breaks_ties_by_population_order():
    from alignserve.decoding.segments import Particle
    from alignserve.rewardmodels.protocol import RewardScore

    def particle(reward: float, lps: list[float]) -> Particle:
        return Particle(None, tokens=list(range(len(lps))), lps=lps,
                        score=RewardScore(total=reward))

    # ties at 0 coverage: the likelier texts are not preferred (they are the generic ones)
    pool = [particle(0.0, [-3.0, -3.0]), particle(0.0, [-0.1, -0.1]),
            particle(0.25, [-5.0, -5.0]), particle(0.0, [-0.2, -0.2])]
    assert prune(0.5, 1)(pool, 0) == [1, 0, 1, 0]  # 0.25 first, then the first of the ties
    assert prune(0.25, 1)(pool, 0) == [0, 0, 1, 0]
    assert prune(0.25, 2)(pool, 0) == [1, 0, 1, 0]  # at least n
    # pausing: those dropped only by the tie-break pause; a lower reward is still dropped
    assert prune(0.5, 1, pause_ties=True)(pool, 0) == [1, PAUSE, 1, PAUSE]
    assert prune(0.25, 1, pause_ties=True)(pool, 0) == [0, 0, 1, 0]
    pool[0].score = RewardScore(total=0.25 - 1e-12)  # a float sum's rounding is still a tie
    assert prune(0.25, 1, pause_ties=True)(pool, 0) == [PAUSE, 0, 1, 0]


# ---- the driver on a bigram fake engine ----------------------------------------------------------

# a chain whose greedy path is " a b c d" then EOS: tokens 0 EOS, 1-4 a-d, 5 "Q:", 6 " z"
CHAIN_WORDS = ["", " a", " b", " c", " d", "Q:", " z"]
CHAIN = {5: [0, .6, 0, 0, 0, 0, .4], 1: [0, 0, .6, 0, 0, 0, .4], 2: [0, 0, 0, .6, 0, 0, .4],
         3: [0, 0, 0, 0, .6, 0, .4], 4: [.6, 0, 0, 0, 0, 0, .4], 6: [.3, .25, .2, .1, .1, 0, .05],
         0: [1, 0, 0, 0, 0, 0, 0]}


def _run(engine, strategy, params, rewards=None, n=1, stream=False, max_tokens=8):
    spec = STRATEGIES[strategy]
    req = DecodeRequest("r", [5], "Q:", SamplingParams(temperature=0, max_tokens=max_tokens), n,
                        strategy, spec.params.model_validate(params),
                        RewardRegistry.default().build(rewards), stream=stream)
    ctx = DecodeContext(engine=engine, request=req)

    async def go():
        async with contextlib.aclosing(spec.run(ctx)) as agen:
            return [e async for e in agen]
    return asyncio.run(go())


# keywords alone settle: a complete keyword stays, so " a b c d" is sure of the ceiling after
# the second segment (" c" is followed by " d": it cannot grow into another word) and one
# particle (of the identical greedy ones) runs on; a length reward beside it has an optimistic
# partial rule, which is never sure, so the policy prunes as before
SURE = [{"name": "keywords", "keywords": ["c"]}]
NEVER_SURE = SURE + [{"name": "length", "target_words": 4}]


@pytest.mark.parametrize("strategy, params, rewards, population, settled_at", [
    ("speculative_rejection", {"candidates": 4, "segment": 2, "keep": 0.5}, SURE, [2, 1], 2),
    ("speculative_rejection", {"candidates": 4, "segment": 2, "keep": 0.5}, NEVER_SURE, [2, 1],
     None),
    ("particle_filter", {"candidates": 4, "segment": 2, "keep": 0.5}, SURE, [2, 1], 2),
    ("particle_filter", {"candidates": 3, "segment": 2, "keep": 1.0}, SURE, [3, 1], 2),
    ("particle_filter", {"candidates": 3, "segment": 2, "keep": 1.0}, NEVER_SURE, [3, 3], None),
])
def test_driver_rounds_prune_and_release_everything(strategy, params, rewards, population,
                                                    settled_at):
    eng = FakeEngine(CHAIN_WORDS, CHAIN)
    events = _run(eng, strategy, params, rewards, stream=True)
    finals = [e for e in events if isinstance(e, ChoiceFinal)]
    summary = events[-1]
    assert isinstance(summary, RequestSummary)
    (final,) = finals
    # greedy: every particle follows " a b c d" EOS; segments of 2 tokens end at a b | c d | EOS
    assert (final.text, final.token_ids, final.finish_reason) == (" a b c d", [1, 2, 3, 4, 0],
                                                                 "stop")
    assert final.reward == len(rewards) and final.cumulative_logprob == pytest.approx(
        5 * math.log(.6))
    assert summary.search["rounds"] == 3 and summary.search["population"] == population
    assert summary.search["settled_at"] == settled_at
    start = params["candidates"]
    assert summary.search["pruned"] == start - population[-1]
    # every particle's tokens after the first segment are fed once: a segment's last token by
    # `extend` at the next round, the others inside `generate`
    deltas = [e for e in events if isinstance(e, ChoiceDelta)]
    assert "".join(d.text for d in deltas) == final.text and final.streamed
    assert not eng.live  # every sequence released


@pytest.mark.parametrize("keyword, reward, finished, pruned", [("z", 0.0, 4, 0),
                                                                ("d", 1.0, 1, 3)])
def test_driver_pauses_ties_and_resumes_them_only_below_the_ceiling(keyword, reward, finished,
                                                                     pruned):
    """Greedy particles are all alike, so every pruning is a tie and the ties pause. " a b c d"
    never has "z": each time the particles going have finished the paused ones go on, until
    every candidate has finished (what best_of_n would have done). It has "d": the first
    survivor to finish reaches the ceiling and the paused ones are dropped (released)."""
    eng = FakeEngine(CHAIN_WORDS, CHAIN)
    params = {"candidates": 4, "segment": 2, "keep": 0.5, "pause_ties": True}
    events = _run(eng, "speculative_rejection", params, [{"name": "keywords",
                                                          "keywords": [keyword]}])
    (final,) = [e for e in events if isinstance(e, ChoiceFinal)]
    search = events[-1].search
    assert final.text == " a b c d" and final.reward == reward
    assert (search["finished"], search["pruned"]) == (finished, pruned)
    assert search["paused"] >= 1
    assert search["resumed"] == (search["paused"] if reward < 1 else 0)
    assert (search["segment"], search["keep"], search["pause_ties"]) == (2, 0.5, True)
    assert not eng.live


@pytest.mark.parametrize("keyword, resumed, pruned", [("z", True, 0), ("d", False, 4)])
def test_driver_with_n_choices_pauses_and_resumes_as_with_one(keyword, resumed, pruned):
    """n = 2 (never fewer than 2 going): "z" resumes every paused tie and returns the best 2
    of all 6; with "d" the 2 survivors finish at the ceiling and the paused 4 are dropped."""
    eng = FakeEngine(CHAIN_WORDS, CHAIN)
    params = {"candidates": 6, "segment": 2, "keep": 0.5, "pause_ties": True}
    events = _run(eng, "speculative_rejection", params, [{"name": "keywords",
                                                          "keywords": [keyword]}], n=2)
    finals = [e for e in events if isinstance(e, ChoiceFinal)]
    search = events[-1].search
    assert [f.index for f in finals] == [0, 1] and all(f.text == " a b c d" for f in finals)
    assert search["paused"] >= 1 and search["pruned"] == pruned
    assert search["resumed"] == (search["paused"] if resumed else 0)
    assert search["finished"] == 6 - pruned
    assert not eng.live


# ---- live server -----------------------------------------------------------------------------------

DOG = [{"role": "user", "content": "Write one sentence that uses all of these words: dog, ball, "
        "park, throw."}]
DOG_REWARD = [{"name": "keywords", "keywords": ["dog", "ball", "park", "throw"]}]


def _chat(client, model, strategy, stream=False, max_tokens=24, seed=5, **keys):
    return client.chat.completions.create(
        model=model, messages=DOG, max_tokens=max_tokens, temperature=0.8, seed=seed,
        stream=stream, extra_body={"alignment": {"strategy": strategy, "rewards": DOG_REWARD,
                                                 **keys}})


@pytest.mark.parametrize("strategy, keys", [
    ("speculative_rejection", {"candidates": 8, "segment": 4, "keep": 0.5}),
    ("particle_filter", {"candidates": 8, "segment": 4, "keep": 0.5}),
    ("particle_filter", {"candidates": 6, "segment": "entropy", "max_segment": 8}),
])
def test_live_segment_search_reports_its_pruning_and_is_seeded(client, model_name, strategy,
                                                               keys):
    first = _chat(client, model_name, strategy, **keys).model_dump()
    again = _chat(client, model_name, strategy, **keys).model_dump()
    choice = first["choices"][0]
    text = choice["message"]["content"]
    assert text == again["choices"][0]["message"]["content"]  # the seed fixes the search
    report = first["alignment"]
    assert report["strategy"] == strategy
    search = report["search"]
    assert search["candidates"] == keys["candidates"] and search["rounds"] >= 2
    assert search["finished"] >= 1 and len(search["population"]) >= 1
    # the reported reward is the reward of the returned text
    (score,) = RewardRegistry.default().build(DOG_REWARD).score([text])
    assert choice["alignment"]["reward"] == pytest.approx(score.total)
    if keys.get("keep", 1.0) < 1:
        assert search["pruned"] > 0 and search["population"][0] <= keys["candidates"] // 2
    # a streamed search sends the same text: the agreed prefix as it is agreed, then the rest
    chunks = list(_chat(client, model_name, strategy, stream=True, **keys))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_live_speculative_rejection_spends_less_than_best_of_n(client, model_name):
    """The same candidates, pruned by half every 4 tokens, cost fewer model tokens than all of
    them decoded to the end (each sampled with the same seed)."""
    sr = _chat(client, model_name, "speculative_rejection", candidates=8, segment=4, keep=0.5,
               max_tokens=32).model_dump()["alignment"]
    bon = _chat(client, model_name, "best_of_n", candidates=8, max_tokens=32
                ).model_dump()["alignment"]
    assert sr["model_tokens"] < bon["model_tokens"]


@pytest.mark.parametrize("strategy", ["speculative_rejection", "particle_filter"])
def test_live_search_settles_once_a_text_is_sure_of_the_ceiling(client, model_name, strategy):
    """Asked to use "dog" in a sentence about a dog, the model writes it within a few tokens:
    that candidate's coverage is 1 and can only stay there, so the search stops the others and
    lets it finish alone, and spends fewer tokens than without pruning."""
    keys = {"candidates": 8, "segment": 4, "keep": 1.0}
    reward = [{"name": "keywords", "keywords": ["dog"]}]

    def ask(strategy: str, **more):
        return client.chat.completions.create(
            model=model_name, messages=DOG, max_tokens=32, temperature=0.8, seed=5,
            extra_body={"alignment": {"strategy": strategy, "rewards": reward, **more}}
        ).model_dump()

    out = ask(strategy, **keys)
    search = out["alignment"]["search"]
    assert out["choices"][0]["alignment"]["reward"] == 1.0
    assert search["settled_at"] is not None and search["population"][-1] == 1
    assert search["pruned"] >= keys["candidates"] - 1
    bon = ask("best_of_n", candidates=keys["candidates"])
    assert out["alignment"]["model_tokens"] < bon["alignment"]["model_tokens"]


def test_live_paused_ties_resume_and_never_lose_to_dropping_them(client, model_name):
    """"zebra" keeps the ceiling out of reach, so every tie paused is resumed. With the same
    seed both searches are the same until the first resumption: pausing can only add
    finished candidates, so its reward is at least the dropping search's, for more tokens."""
    keys = {"candidates": 8, "segment": 2, "keep": 0.5}
    reward = [{"name": "keywords", "keywords": [*DOG_REWARD[0]["keywords"], "zebra"]}]

    def ask(pause_ties: bool):
        return client.chat.completions.create(
            model=model_name, messages=DOG, max_tokens=24, temperature=0.8, seed=5,
            extra_body={"alignment": {"strategy": "speculative_rejection", "rewards": reward,
                                      "pause_ties": pause_ties, **keys}}).model_dump()

    on, off = ask(True), ask(False)
    search = on["alignment"]["search"]
    assert search["paused"] > 0 and search["resumed"] == search["paused"]
    assert off["alignment"]["search"]["paused"] == 0
    assert on["choices"][0]["alignment"]["reward"] >= off["choices"][0]["alignment"]["reward"]
    assert on["alignment"]["model_tokens"] > off["alignment"]["model_tokens"]


def test_live_soft_best_of_n_is_seeded_and_tiny_lambda_is_argmax(client, model_name):
    soft = [_chat(client, model_name, "best_of_n", candidates=6, selection="soft", seed=s,
                  **{"lambda": 0.5}).model_dump()["choices"][0] for s in (9, 9)]
    assert soft[0]["message"]["content"] == soft[1]["message"]["content"]
    argmax = _chat(client, model_name, "best_of_n", candidates=6, seed=9).model_dump()
    sharp = _chat(client, model_name, "best_of_n", candidates=6, seed=9, selection="soft",
                  **{"lambda": 1e-4}).model_dump()
    assert sharp["choices"][0]["alignment"]["reward"] == argmax["choices"][0]["alignment"]["reward"]


@pytest.mark.parametrize("keys, param", [
    ({"strategy": "particle_filter", "segment": 0}, "alignment.segment"),
    ({"strategy": "speculative_rejection", "keep": 0}, "alignment.keep"),
    ({"strategy": "best_of_n", "selection": "random"}, "alignment.selection"),
])
def test_live_bad_keys_name_the_field(client, model_name, keys, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=DOG, max_tokens=4,
                                       extra_body={"alignment": keys})
    assert e.value.body["param"] == param
