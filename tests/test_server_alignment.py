"""The `alignment` extension end to end: rewards reported per choice, best_of_n picks the best."""

from __future__ import annotations

import re

import pytest

PROMPT = [{"role": "user", "content": "Describe the ocean in one sentence."}]
KEYWORDS = ["the", "ocean", "blue", "water", "is"]
REWARDS = [{"name": "keywords", "weight": 1.0, "keywords": KEYWORDS},
           {"name": "length", "weight": 0.5, "target_words": 8}]


def keyword_fraction(text: str) -> float:
    """Our own reading of the `keywords` reward: fraction of keywords present as whole words."""
    hits = sum(1 for k in KEYWORDS
               if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text, re.IGNORECASE))
    return hits / len(KEYWORDS)


def rescore(text: str, prompt: str = "") -> tuple[float, dict[str, float]]:
    from alignserve.rewardmodels.compose import RewardRegistry

    score = RewardRegistry.default().build(REWARDS).score([text], prompt)[0]
    return score.total, score.components


def _chat(client, model, **alignment):
    return client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=16, temperature=1.0, seed=7,
        n=alignment.pop("n", 1), extra_body={"alignment": alignment})


def test_sample_reports_rewards_of_each_choice(client, model_name):
    r = _chat(client, model_name, strategy="sample", rewards=REWARDS, n=2)
    for choice in r.choices:
        text = choice.message.content
        report = choice.alignment
        assert set(report["components"]) == {"keywords", "length"}
        assert report["components"]["keywords"] == pytest.approx(keyword_fraction(text))
        total, components = rescore(text)
        assert report["reward"] == pytest.approx(total)
        assert report["components"] == pytest.approx(components)
        assert report["reward"] == pytest.approx(
            components["keywords"] + 0.5 * components["length"])
    assert r.alignment["strategy"] == "sample"


def test_best_of_n_returns_the_best_candidate(client, model_name):
    every = _chat(client, model_name, strategy="best_of_n", candidates=4, n=4, rewards=REWARDS)
    assert every.alignment["strategy"] == "best_of_n"
    assert every.alignment["candidates_scored"] == 4
    rewards = [c.alignment["reward"] for c in every.choices]
    for c in every.choices:  # each reported reward is the reward of the returned text
        assert c.alignment["reward"] == pytest.approx(rescore(c.message.content)[0])
    best = _chat(client, model_name, strategy="best_of_n", candidates=4, n=1, rewards=REWARDS)
    assert len(best.choices) == 1
    choice = best.choices[0]
    # Same seed, same candidates: the one returned is the best of the four.
    assert choice.alignment["reward"] == pytest.approx(max(rewards))
    assert all(choice.alignment["reward"] >= r - 1e-9 for r in rewards)
    assert choice.alignment["reward"] == pytest.approx(rescore(choice.message.content)[0])
    assert best.usage.completion_tokens <= 16


def test_best_of_n_top_two(client, model_name):
    every = _chat(client, model_name, strategy="best_of_n", candidates=4, n=4, rewards=REWARDS)
    two = _chat(client, model_name, strategy="best_of_n", candidates=4, n=2, rewards=REWARDS)
    got = sorted((c.alignment["reward"] for c in two.choices), reverse=True)
    want = sorted((c.alignment["reward"] for c in every.choices), reverse=True)[:2]
    assert got == pytest.approx(want)
    assert [c.index for c in two.choices] == [0, 1]


def test_best_of_n_stream_sends_the_winner(client, model_name):
    kw = {"model": model_name, "messages": PROMPT, "max_tokens": 12, "temperature": 1.0,
          "seed": 3, "extra_body": {"alignment": {"strategy": "best_of_n", "candidates": 3,
                                                  "rewards": REWARDS}}}
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].alignment["reward"] == pytest.approx(
        full.choices[0].alignment["reward"])
    assert chunks[-1].alignment["candidates_scored"] == 3


def test_best_of_n_defaults_need_only_the_strategy(client, model_name):
    r = client.completions.create(model=model_name, prompt="The sea", max_tokens=6,
                                  extra_body={"alignment": {"strategy": "best_of_n"}})
    assert len(r.choices) == 1
    assert r.choices[0].alignment == {"reward": None, "components": {}}
    assert r.alignment["candidates_scored"] >= 1
