"""vLLM's `return_token_ids`, live: the prompt's ids and each choice's own beside the text,
whole and streamed (a stream's pieces join into the whole answer's ids), on chat and on
completions with several prompts; absent unless asked for."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "user", "content": "Name two animals of the sea."}]
PROMPTS = ["The ocean is", "Whales are large animals that"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}]


def _tokens(http, **body) -> list[int]:
    return http.post("/tokenize", json=body).json()["tokens"]


def _text(http, ids: list[int]) -> str:
    return http.post("/detokenize", json={"tokens": ids}).json()["prompt"]


def _streamed_ids(chunks, n: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {i: [] for i in range(n)}
    for chunk in chunks:
        for choice in chunk.choices:
            out[choice.index] += choice.model_extra.get("token_ids") or []
    return out


ALIGNMENTS = {"sample": None,
              "best_of_n": {"strategy": "best_of_n", "candidates": 3, "rewards": [
                  {"name": "keywords", "keywords": ["whale"]}]}}


@pytest.mark.parametrize("strategy", list(ALIGNMENTS))
def test_chat(http, client, model_name, strategy):
    extra = {"return_token_ids": True, **({"alignment": ALIGNMENTS[strategy]}
                                          if ALIGNMENTS[strategy] else {})}
    kw = {"model": model_name, "messages": MESSAGES, "max_tokens": 12, "n": 2, "seed": 4,
          "extra_body": extra}
    whole = client.chat.completions.create(**kw)
    prompt = _tokens(http, messages=MESSAGES)
    assert whole.model_extra["prompt_token_ids"] == prompt
    for choice in whole.choices:
        ids = choice.model_extra["token_ids"]
        assert _text(http, ids) == choice.message.content
    assert sum(len(c.model_extra["token_ids"]) for c in whole.choices) == (
        whole.usage.completion_tokens)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].model_extra["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    streamed = _streamed_ids(chunks, 2)
    assert streamed == {c.index: c.model_extra["token_ids"] for c in whole.choices}


def test_chat_tools_stream_sends_the_held_ids_at_the_end(client, model_name):
    kw = {"model": model_name, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
          "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
          "max_tokens": 40, "temperature": 0, "extra_body": {"return_token_ids": True}}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert _streamed_ids(chunks, 1)[0] == whole.choices[0].model_extra["token_ids"]


def test_completions_with_several_prompts(http, client, model_name):
    kw = {"model": model_name, "prompt": PROMPTS, "max_tokens": 8, "n": 2, "seed": 9,
          "extra_body": {"return_token_ids": True}}
    whole = client.completions.create(**kw)
    prompts = [_tokens(http, prompt=p) for p in PROMPTS]
    for choice in whole.choices:  # choice i*n + j is sample j of prompt i
        assert choice.model_extra["prompt_token_ids"] == prompts[choice.index // 2]
        assert _text(http, choice.model_extra["token_ids"]) == choice.text
    chunks = list(client.completions.create(stream=True, **kw))
    firsts: dict[int, list[int]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            if "prompt_token_ids" in choice.model_extra:
                assert choice.index not in firsts  # once per choice
                firsts[choice.index] = choice.model_extra["prompt_token_ids"]
    assert firsts == {i: prompts[i // 2] for i in range(4)}
    assert _streamed_ids(chunks, 4) == {c.index: c.model_extra["token_ids"]
                                        for c in whole.choices}


def test_absent_unless_asked(http, model_name):
    r = http.post("/v1/chat/completions", json={"model": model_name, "messages": MESSAGES,
                                                "max_tokens": 2}).json()
    assert "prompt_token_ids" not in r and "token_ids" not in r["choices"][0]
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "Hi",
                                           "max_tokens": 2}).json()
    assert "token_ids" not in r["choices"][0] and "prompt_token_ids" not in r["choices"][0]


# ---------------------------------------------------------------- vLLM's allowed_token_ids

ONLY_ALIGNMENTS = {
    "sample": None,
    "best_of_n": {"strategy": "best_of_n", "candidates": 3},
    "speculative_rejection": {"strategy": "speculative_rejection", "candidates": 4,
                              "rewards": [{"name": "keywords", "keywords": ["yes"]}]},
    "vas": {"strategy": "vas"},
    "contrastive": {"strategy": "contrastive", "amateur": "self:8"},
}


@pytest.mark.parametrize("strategy", list(ONLY_ALIGNMENTS))
def test_allowed_token_ids(http, client, model_name, strategy):
    """Every sampled token is one of the allowed, whichever strategy steers (the mask is
    applied in the engine's one logit pass, before steering)."""
    only = sorted({t for word in (" yes", " no", " maybe", ".") for t in _tokens(
        http, prompt=word, add_special_tokens=False)})
    align = ONLY_ALIGNMENTS[strategy]
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Is the sea salty?"}],
        max_tokens=6, seed=2, extra_body={"allowed_token_ids": only, "return_token_ids": True,
                                          **({"alignment": align} if align else {})})
    ids = r.choices[0].model_extra["token_ids"]
    assert ids and set(ids) <= set(only), (ids, only)
    assert r.choices[0].finish_reason == "length"  # the end token is not among them


@pytest.mark.parametrize(("extra", "says"), [
    ({"allowed_token_ids": [10**8]}, "outside the vocabulary"),
    ({"allowed_token_ids": []}, "at least 1"),
    ({"allowed_token_ids": [5], "alignment": {"strategy": "deal", "rewards": [
        {"name": "keywords", "keywords": ["a"]}]}}, "deal"),
    ({"allowed_token_ids": [5], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_allowed_token_ids_refusals(http, model_name, extra, says):
    r = http.post("/v1/chat/completions", json={"model": model_name, "messages": MESSAGES,
                                                "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "allowed_token_ids" and says in error["message"], error
