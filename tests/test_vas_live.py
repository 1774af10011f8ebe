"""`vas` through the live server with the official openai client (real SmolLM2, shipped value
model `sentiment-positive`)."""

from __future__ import annotations

import openai
import pytest

SENTIMENT = [{"name": "sentiment", "weight": 1.0}]
# Not in the value model's training prompts.
STAT_PROMPTS = ["Describe your morning commute.", "Tell me about a visit to the library.",
                "Write about a day at the office.", "Describe a broken printer."]


def _chat(client, model, content, **kw):
    alignment = kw.pop("alignment", {"strategy": "vas"})
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}],
        extra_body={"alignment": alignment}, **kw)


def sentiment(text: str) -> float:
    from alignserve.rewardmodels.sentiment import SentimentReward

    return SentimentReward("positive").score([text])[0]


def test_vas_answers_with_the_default_value_model(client, model_name):
    r = _chat(client, model_name, "Tell me about your weekend.", max_tokens=12, seed=3, n=2)
    assert r.alignment["strategy"] == "vas"
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.message.content and c.finish_reason in ("stop", "length")
        assert c.alignment == {"reward": None, "components": {}}
    assert r.usage.completion_tokens > 0


def test_vas_streams_tokens_and_the_reward_report(client, model_name):
    kw = {"max_tokens": 12, "seed": 5, "temperature": 1.0}
    alignment = {"strategy": "vas", "rewards": SENTIMENT, "beta": 4.0}
    whole = _chat(client, model_name, "Describe a walk in the park.", alignment=alignment, **kw)
    stream = _chat(client, model_name, "Describe a walk in the park.", alignment=alignment,
                   stream=True, **kw)
    deltas, last = [], None
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                deltas.append(c.delta.content)
            if c.finish_reason:
                last = c
    assert len(deltas) > 1  # token by token, not one blob
    text = "".join(deltas)
    assert text == whole.choices[0].message.content  # same seed, same tokens
    report = last.model_extra["alignment"]
    assert report["reward"] == pytest.approx(sentiment(text))
    assert report["components"] == {"sentiment": pytest.approx(sentiment(text))}


def test_vas_reports_a_given_reward(client, model_name):
    r = _chat(client, model_name, "Write two sentences about a broken umbrella.", max_tokens=16,
              seed=11, alignment={"strategy": "vas", "rewards": SENTIMENT,
                                  "value_models": [{"name": "sentiment-positive", "weight": 1.0}],
                                  "top_k": 8, "keep_non_candidates": True})
    c = r.choices[0]
    assert c.alignment["reward"] == pytest.approx(sentiment(c.message.content))
    assert r.alignment["strategy"] == "vas"


def test_vas_at_beta_zero_is_top_k_sampling(client, model_name):
    """beta 0 adds nothing: VAS samples the base model's top_k exactly as plain sampling with
    the same top_k and seed does (same seeds, same noise, same tokens)."""
    kw = {"max_tokens": 12, "seed": 21, "temperature": 1.0}
    vas = _chat(client, model_name, "Describe an old house.",
                alignment={"strategy": "vas", "beta": 0.0, "top_k": 5}, **kw)
    plain = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Describe an old house."}],
        extra_body={"top_k": 5, "alignment": {"strategy": "sample"}}, **kw)
    assert vas.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("alignment, param", [
    ({"strategy": "vas", "value_models": [{"name": "no-such-model"}]},
     "alignment.value_models[0].name"),
    ({"strategy": "vas", "value_models": [{"name": "sentiment-positive"}, {"name": "nope"}]},
     "alignment.value_models[1].name"),
    ({"strategy": "vas", "top_k": 0}, "alignment.top_k"),
    ({"strategy": "vas", "beta": 51}, "alignment.beta"),
    ({"strategy": "vas", "candidates": 0}, "alignment.candidates"),
    ({"strategy": "vas", "candidates": 65}, "alignment.candidates"),
    ({"strategy": "vas", "value_models": [{"name": "sentiment-positive", "scale": 2}]},
     "alignment.value_models[0].scale"),
])
def test_vas_bad_input_is_a_400_naming_the_field(client, model_name, alignment, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model_name, "Hi", max_tokens=4, alignment=alignment)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param


def test_vas_n_above_candidates_is_a_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model_name, "Hi", max_tokens=4, n=3,
              alignment={"strategy": "vas", "candidates": 2})
    assert e.value.body["param"] == "alignment.candidates"


def test_vas_candidates_return_the_best_of_the_same_vas_samples(client, model_name):
    """candidates=4, n=2 decodes the very sequences plain VAS with n=4 does (same seed: the
    engine seeds each branch by its index) and returns the best two of them by reward, at
    the same model-token cost: one prefill shared by all four."""
    kw = {"max_tokens": 16, "seed": 7, "temperature": 1.0}
    base = {"strategy": "vas", "rewards": SENTIMENT}
    plain = _chat(client, model_name, "Describe a rainy bus stop.", n=4, alignment=base, **kw)
    best = _chat(client, model_name, "Describe a rainy bus stop.", n=2,
                 alignment={**base, "candidates": 4}, **kw)
    ranked = sorted(((c.alignment["reward"], c.message.content) for c in plain.choices),
                    key=lambda rc: rc[0], reverse=True)
    got = [(c.alignment["reward"], c.message.content) for c in best.choices]
    assert [r for r, _ in got] == pytest.approx([r for r, _ in ranked[:2]])
    assert {t for _, t in got} <= {t for _, t in ranked}
    assert best.alignment["candidates_scored"] == 4
    assert best.alignment["model_tokens"] == plain.alignment["model_tokens"]
    # the prompt is computed once for the four: at most prompt + every candidate's tokens
    assert best.alignment["model_tokens"] <= (best.usage.prompt_tokens
                                              + plain.usage.completion_tokens)


def test_vas_unknown_value_model_in_a_stream_is_a_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        for _ in _chat(client, model_name, "Hi", max_tokens=4, stream=True,
                       alignment={"strategy": "vas", "value_models": [{"name": "nope"}]}):
            pass
    assert e.value.body["param"] == "alignment.value_models[0].name"


def test_vas_is_listed_with_its_defaults(http):
    info = http.get("/v1/alignment").json()
    (vas,) = [s for s in info["strategies"] if s["name"] == "vas"]
    props = vas["params"]["properties"]
    assert {"beta", "top_k", "value_models", "keep_non_candidates", "candidates"} <= set(props)
    assert props["top_k"]["minimum"] == 1 and props["top_k"]["maximum"] <= 100  # server limit
    assert props["top_k"]["default"] == 10 and props["beta"]["default"] == 50.0
    assert props["beta"]["minimum"] == 0 and props["beta"]["maximum"] == 50
    assert props["keep_non_candidates"]["default"] is False
    # candidates: default n (plain VAS), held to the test server's --max-candidates 16
    assert props["candidates"]["default"] is None and props["candidates"]["maximum"] == 16


def test_vas_raises_mean_sentiment_over_plain_sampling(client, model_name):
    """The shipped default value model at full strength against plain sampling: same 4 prompts,
    same seeds, temperature 1, 8 samples of 32 tokens per prompt (32 per strategy).

    Measured on 64 samples of other prompts when the model was trained: plain 0.65, vas at
    beta 32 0.75, at beta 50 (the default) about 0.85, each mean +- 0.03; the sample standard
    deviation is ~0.25, so the standard error of a 32-sample difference is ~0.06 (less here:
    the shared seeds correlate the two). Asserting a gain of 0.05 at beta 50 leaves ~2.5
    standard errors to the expected gain, and all draws are seeded: no run-to-run variation.
    (Measured here: sample 0.505, vas 0.687.)"""
    def mean_reward(alignment):
        scores = []
        for i, prompt in enumerate(STAT_PROMPTS):
            r = _chat(client, model_name, prompt, max_tokens=32, seed=100 + i, n=8,
                      temperature=1.0, alignment={**alignment, "rewards": SENTIMENT})
            scores += [c.alignment["reward"] for c in r.choices]
        assert len(scores) == 32
        return sum(scores) / len(scores)

    plain = mean_reward({"strategy": "sample"})
    vas = mean_reward({"strategy": "vas", "beta": 50.0})
    print(f"mean sentiment over 32 samples: sample {plain:.3f}, vas {vas:.3f}")
    assert vas > plain + 0.05
