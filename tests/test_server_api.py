"""The OpenAI surface against the live server, through the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Name three animals that live in the ocean."}]
PROMPT = "The three largest animals in the ocean are"


def _chat(client: openai.OpenAI, model: str, **kw):
    kw.setdefault("messages", CHAT)
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=model, **kw)


def _sse_lines(http: httpx.Client, path: str, body: dict) -> list[str]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def test_chat_non_streamed(client, model_name):
    r = _chat(client, model_name, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == model_name
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # Every choice reports what it scored; with no rewards: null and empty.
    assert choice.alignment == {"reward": None, "components": {}}
    report = r.alignment
    assert report["strategy"] == "sample"
    assert report["model_tokens"] >= r.usage.prompt_tokens
    assert report["seconds"] > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 12


def test_greedy_is_deterministic(client, model_name):
    a = _chat(client, model_name, temperature=0).choices[0].message.content
    b = _chat(client, model_name, temperature=0).choices[0].message.content
    assert a == b


def test_chat_stream_joins_to_non_streamed_text(client, model_name):
    full = _chat(client, model_name, temperature=0, max_tokens=16)
    chunks = list(_chat(client, model_name, temperature=0, max_tokens=16, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    last = finishing[0]
    assert last.choices[0].finish_reason == full.choices[0].finish_reason
    assert last.choices[0].alignment == {"reward": None, "components": {}}
    # Without include_usage the request's report rides on the last chunk.
    assert chunks[-1] is last
    assert last.alignment["strategy"] == "sample"


def test_completion_stream_joins_to_non_streamed_text(client, model_name):
    kw = {"model": model_name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stream_wire_format_and_usage_chunk(http, model_name):
    body = {"model": model_name, "messages": CHAT, "max_tokens": 6, "temperature": 0,
            "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    lines = _sse_lines(http, "/v1/chat/completions", body)
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    # One opening chunk per choice, with the role, before anything else.
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}] * 2
    assert {c["choices"][0]["index"] for c in chunks[:2]} == {0, 1}
    finishes = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0].get(
        "finish_reason")]
    assert sorted(f["index"] for f in finishes) == [0, 1]
    assert all("alignment" in f for f in finishes)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    u = usage_chunk["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert 2 <= u["completion_tokens"] <= 12
    assert usage_chunk["alignment"]["strategy"] == "sample"
    # Only the usage chunk carries usage.
    assert all("usage" not in c for c in chunks[:-1])


def test_n_choices(client, model_name):
    r = _chat(client, model_name, n=3, max_tokens=8, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.alignment["reward"] is None for c in r.choices)


def test_usage_counts_every_choice_token(client, model_name):
    r = _chat(client, model_name, n=3, max_tokens=10, temperature=1.0, seed=11, logprobs=True)
    per_choice = [len(c.logprobs.content) for c in r.choices]
    assert r.usage.completion_tokens == sum(per_choice)
    r2 = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, n=2,
                                   temperature=1.0, seed=3, logprobs=0)
    assert r2.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r2.choices)


def test_prompt_tokens_match_the_tokenizer(client, model_name, live_server):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2)
    assert r.usage.prompt_tokens == len(live_server.engine.encode(PROMPT))


def test_stop_string(client, model_name):
    # ignore_eos keeps all three runs on the same 24-token greedy path.
    kw = {"temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}
    base = _chat(client, model_name, **kw).choices[0].message.content
    words = base.split()
    assert len(words) >= 4, base
    stop = words[2]
    cut = base[: base.index(stop)]
    r = _chat(client, model_name, stop=[stop], **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.message.content
    assert choice.message.content == cut
    # Streamed: the stop string never leaks out, even partially held back.
    chunks = list(_chat(client, model_name, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut


def test_seed_reproducibility(client, model_name):
    kw = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "model": model_name}
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3, 4)}
    assert len(others | {a}) > 1


def test_max_tokens_gives_length(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    r = _chat(client, model_name, max_completion_tokens=2, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2


def test_min_tokens_and_top_k_minus_one(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5,
                                  extra_body={"min_tokens": 5, "top_k": -1, "min_p": 0.05})
    assert r.usage.completion_tokens == 5


def test_chat_logprobs(client, model_name):
    r = _chat(client, model_name, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        assert bytes(item.bytes) == item.token.encode()
        # Greedy: the chosen token is the most likely one.
        assert abs(item.top_logprobs[0].logprob - item.logprob) < 1e-4
    no = _chat(client, model_name, max_tokens=2)
    assert no.choices[0].logprobs is None


def test_completion_logprobs(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert token in top and 2 <= len(top) <= 3


def test_completion_echo_and_token_prompt(client, model_name, live_server):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                                  echo=True)
    assert r.choices[0].text.startswith(PROMPT)
    ids = live_server.engine.encode(PROMPT)
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=4,
                                       temperature=0)
    assert r.choices[0].text == PROMPT + by_ids.choices[0].text


def test_models(client, model_name, live_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert models.data[0].max_model_len == live_server.engine.max_model_len


def test_alignment_listing(http, live_server):
    r = http.get("/v1/alignment")
    assert r.status_code == 200
    info = r.json()
    assert info["engine"] == "native"
    strategies = {s["name"]: s for s in info["strategies"]}
    assert {"sample", "best_of_n"} <= set(strategies)
    bon = strategies["best_of_n"]
    assert bon["description"] and bon["streams"] and bon["streams_description"]
    candidates = bon["params"]["properties"]["candidates"]
    assert "default" in candidates
    rewards = {r["name"]: r for r in info["rewards"]}
    assert {"keywords", "length", "regex", "json_schema"} <= set(rewards)
    assert info["value_models"] == [] and info["amateurs"] == []
    assert info["limits"]["max_candidates"] == live_server.settings.max_candidates
    assert info["limits"]["max_n"] == live_server.settings.max_n


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_concurrent_requests_are_batched_and_all_served(client, model_name):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        r = client.completions.create(model=model_name, prompt=f"{PROMPT} number {i}",
                                      max_tokens=6, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 6
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == ["length"] * 4


def test_completion_echo_streamed(client, model_name):
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3,
                                            temperature=0, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    full = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3,
                                     temperature=0, echo=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_api_key(live_server, http, model_name):
    live_server.settings.api_key = "sekret"  # read per request: no restart needed
    try:
        r = http.get("/v1/models")
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "AuthenticationError"
        r = http.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert http.get("/health").status_code == 200  # probes need no key
        keyed = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="sekret",
                              max_retries=0)
        assert keyed.models.list().data[0].id == model_name
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="wrong",
                          max_retries=0).models.list()
    finally:
        live_server.settings.api_key = None
