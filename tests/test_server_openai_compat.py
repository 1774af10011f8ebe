"""What real OpenAI clients send, answered as OpenAI and vLLM answer it (issue 16), live
against the server with the official `openai` client (httpx where the client cannot say it)."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from tests.test_hardening import side_server

MSG = [{"role": "user", "content": "Name three animals that live in the ocean."}]
PROMPT = "The three largest animals in the ocean are"
# A shared prefix long enough to be shared (decoding.batch.MIN_SHARED_PREFIX), then two endings.
PREFIX = "Here is a list of facts about whales, dolphins and other animals of the sea. "
ENDINGS = ["The blue whale", "Dolphins are"]


def _texts(r) -> list[str]:
    return [c.text for c in sorted(r.choices, key=lambda c: c.index)]


# ---------------------------------------------------------------- 1. every spec field accepted

SPEC_EXTRAS = {  # the official client's own keyword arguments, none of them about the text
    "store": True, "metadata": {"team": "a"}, "service_tier": "auto", "reasoning_effort": "low",
    "verbosity": "low", "prompt_cache_key": "k1", "prompt_cache_retention": "in_memory",
    "safety_identifier": "user-1", "parallel_tool_calls": False, "user": "u1",
    "prediction": {"type": "content", "content": "whales"}, "web_search_options": {},
    "modalities": ["text"], "tool_choice": "none", "tools": [],
}


def test_spec_fields_are_accepted_and_change_nothing(client, model_name, caplog):
    plain = client.chat.completions.create(model=model_name, messages=MSG, max_tokens=8,
                                           temperature=0)
    with caplog.at_level(logging.DEBUG, logger="alignserve.server"):
        extra = client.chat.completions.create(model=model_name, messages=MSG, max_tokens=8,
                                               temperature=0, **SPEC_EXTRAS)
    assert extra.choices[0].message.content == plain.choices[0].message.content
    logged = " ".join(r.getMessage() for r in caplog.records if "ignored" in r.getMessage())
    for name in ("store", "metadata", "service_tier", "reasoning_effort", "prediction"):
        assert name in logged, logged
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                                  best_of=1, user="u1", suffix=None)
    assert r.choices[0].text


def test_best_of_returns_the_likeliest_of_its_samples(client, model_name):
    """Legacy completions' `best_of`: best_of samples, the n with the highest cumulative
    log-probability returned, as best_of_n without rewards does (the alignment report says so)."""
    kw = {"model": model_name, "prompt": PROMPT, "max_tokens": 6, "seed": 7, "logprobs": 0}
    r = client.completions.create(best_of=4, n=2, **kw)
    report = r.model_extra["alignment"]
    assert report["strategy"] == "best_of_n" and report["candidates_scored"] == 4, report
    sums = [sum(c.logprobs.token_logprobs) for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(sums) == 2 and sums[0] >= sums[1]
    same = client.completions.create(
        extra_body={"alignment": {"strategy": "best_of_n", "candidates": 4}}, n=2, **kw)
    assert _texts(same) == _texts(r)  # the same request, spelled as the extension


def test_history_with_assistant_extras(client, model_name):
    """An assistant turn as clients send their history back: refusal, null tool fields."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief.",
                                        "prompt_cache_breakpoint": {"type": "ephemeral"}}]},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": None, "refusal": "I cannot say.", "tool_calls": None,
         "function_call": None, "audio": None},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."},
                                          {"type": "refusal", "refusal": "No more."}]},
        {"role": "user", "content": "Name a fish."},
    ]
    r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- 2. null means the default


def test_nulls_mean_the_defaults(http, model_name):
    nulls = {k: None for k in ("n", "stream", "stop", "seed", "temperature", "top_p",
                               "presence_penalty", "frequency_penalty", "logit_bias", "user",
                               "stream_options", "logprobs")}
    chat = http.post("/v1/chat/completions", json={
        "model": model_name, "messages": MSG, "max_tokens": 3, "top_logprobs": None,
        "max_completion_tokens": None, **nulls})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None
    completion = http.post("/v1/completions", json={
        "model": model_name, "prompt": PROMPT, "max_tokens": 3, "echo": None, **nulls})
    assert completion.status_code == 200, completion.text
    assert not completion.json()["choices"][0]["text"].startswith(PROMPT)  # echo off


# ---------------------------------------------------------------- 3. lists of prompts


def test_prompt_list_indexes_choices_as_openai(client, model_name, exact_engine):
    """Choice i*n + j is sample j of prompt i; greedy, each prompt's choices are the text a
    request with that prompt alone gets (the shared-prefix path computes the same logits)."""
    prompts = [PREFIX + e for e in ENDINGS]
    alone = [client.completions.create(model=model_name, prompt=p, max_tokens=6,
                                       temperature=0).choices[0].text for p in prompts]
    r = client.completions.create(model=model_name, prompt=prompts, max_tokens=6,
                                  temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert _texts(r) == [alone[0], alone[0], alone[1], alone[1]]
    ids = [exact_engine.encode(p) for p in prompts]
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)  # each prompt counted once
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=6,
                                       temperature=0)
    assert _texts(by_ids) == alone


def test_prompts_sharing_a_prefix_share_its_kv(client, model_name, live_server):
    engine = live_server.engine
    ids = [engine.encode(PREFIX + e) for e in ENDINGS]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert shared >= 8
    before = engine.stats().prefill_tokens
    client.completions.create(model=model_name, prompt=ids, max_tokens=1)
    computed = engine.stats().prefill_tokens - before
    # the common prefix once, then each prompt's own rest
    assert computed == shared + sum(len(i) - shared for i in ids)
    assert computed < sum(len(i) for i in ids)


def test_prompt_list_streamed_and_with_a_strategy(client, model_name):
    prompts = [PREFIX + e for e in ENDINGS]
    chunks = list(client.completions.create(model=model_name, prompt=prompts, max_tokens=4,
                                            n=2, stream=True, seed=3,
                                            stream_options={"include_usage": True}))
    finished = sorted(c.choices[0].index for c in chunks
                      if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2, 3]
    assert chunks[-1].usage.completion_tokens > 0
    r = client.completions.create(model=model_name, prompt=prompts, max_tokens=4, n=1,
                                  extra_body={"alignment": {
                                      "strategy": "best_of_n", "candidates": 2,
                                      "rewards": [{"name": "length", "target_words": 3}]}})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.alignment["candidates_scored"] == 4  # two per prompt
    assert all(c.alignment["reward"] is not None for c in r.choices)


# ---------------------------------------------------------------- 4. echo with logprobs


def test_echo_logprobs_score_the_prompt(client, model_name, exact_engine):
    """lm-evaluation-harness' log-likelihood request: the prompt's own token log-probs, the
    first null. The log-prob the prompt pass gives a token is the one the sampler gave it
    when it generated that token (one model, two code paths)."""
    ids = exact_engine.encode(PROMPT)
    first = client.completions.create(model=model_name, prompt=ids, max_tokens=1,
                                      temperature=0, logprobs=1)
    token_lp = first.choices[0].logprobs.token_logprobs[0]
    token = exact_engine.encode(first.choices[0].text)  # the generated token's id, read back
    assert len(token) == 1
    generated = ids + token
    r = client.completions.create(model=model_name, prompt=generated, max_tokens=0,
                                  echo=True, logprobs=2)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == exact_engine.tokenizer.decode(generated)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(generated)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]):
        assert token in top and len(top) <= 3
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # fp32 both ways; the decode step and the prompt pass reduce in different orders
    assert lp.token_logprobs[-1] == pytest.approx(token_lp, abs=1e-3)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(generated)


def test_echo_logprobs_with_generation_and_batches(client, model_name, exact_engine):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3, echo=True,
                                  logprobs=0, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None
    assert all(x is not None for x in lp.token_logprobs[1:])
    # the same prompt alone and inside a batch (the shared-prefix path) scores the same
    prompts = [PREFIX + e for e in ENDINGS]
    batch = client.completions.create(model=model_name, prompt=prompts, max_tokens=0,
                                      echo=True, logprobs=1)
    for i, p in enumerate(prompts):
        alone = client.completions.create(model=model_name, prompt=p, max_tokens=0, echo=True,
                                          logprobs=1)
        got = batch.choices[i].logprobs.token_logprobs
        want = alone.choices[0].logprobs.token_logprobs
        assert got[0] is None and want[0] is None
        # fp32 both ways, one model: only the attention's reduction order differs
        assert got[1:] == pytest.approx(want[1:], abs=1e-3)
        assert batch.choices[i].text == p


def test_echo_logprobs_streamed(client, model_name):
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2,
                                            echo=True, logprobs=1, stream=True,
                                            temperature=0))
    opening = chunks[0].choices[0]
    assert opening.text == PROMPT
    assert opening.logprobs.token_logprobs[0] is None
    assert len(opening.logprobs.tokens) > 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2,
                                     echo=True, temperature=0)
    assert text == full.choices[0].text


# ---------------------------------------------------------------- 5. logit_bias


def test_logit_bias_steers_sampling(client, model_name, live_server):
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3,
                                      temperature=0, logprobs=0)
    first = live_server.engine.encode(plain.choices[0].text)[0]
    banned = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3,
                                       temperature=0, logit_bias={str(first): -100})
    assert live_server.engine.encode(banned.choices[0].text)[0] != first
    forced_id = live_server.engine.encode(" whale")[0]
    forced = client.chat.completions.create(
        model=model_name, messages=MSG, max_tokens=3, temperature=1.0, seed=1,
        logit_bias={str(forced_id): 100}, logprobs=True)
    tokens = forced.choices[0].logprobs.content
    assert len(tokens) == 3 and all(t.token == " whale" for t in tokens)
    # the logprobs are the model's own, not the biased distribution's (vLLM's default): the
    # model alone would hardly open its answer with " whale"
    assert tokens[0].logprob < -1.0


# ---------------------------------------------------------------- 8. model "" and one model


def test_blank_model_and_model_by_id(client, model_name, http):
    r = client.completions.create(model="", prompt=PROMPT, max_tokens=2)
    assert r.model == model_name
    card = client.models.retrieve(model_name)
    assert card.id == model_name and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["param"] == "model"
    assert http.get("/v1/models/no/such").status_code == 404


# ---------------------------------------------------------------- 9. CORS


def test_cors_is_off_unless_asked(http):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = http.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


def test_cors_with_allowed_origins(live_server, model_name):
    with side_server(live_server, allowed_origins=["https://app.example"],
                     api_key=["sekret"]) as app, \
            httpx.Client(base_url=app.state.base_url, timeout=60) as c:
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        r = c.options("/v1/chat/completions", headers=preflight)  # no key: preflights have none
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "POST" in r.headers["access-control-allow-methods"]
        other = c.options("/v1/chat/completions", headers={**preflight,
                                                           "Origin": "https://evil.example"})
        assert other.status_code == 400
        r = c.post("/v1/completions", json={"model": model_name, "prompt": "Hi",
                                            "max_tokens": 1},
                   headers={"Origin": "https://app.example", "Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        # errors carry the headers too, so the browser can read them
        r = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == "https://app.example"


# ---------------------------------------------------------------- 10. logprob bytes


def test_logprob_bytes_rebuild_split_characters(client, model_name, live_server):
    """A whale emoji is three tokens of SmolLM2 that each hold part of its four UTF-8
    bytes: each token's text is U+FFFD, its bytes are its own, and they join to the emoji."""
    engine = live_server.engine
    ids = engine.encode(" 🐳")
    assert len(ids) > 1 and all("\ufffd" in engine.tokenizer.decode([i]) for i in ids)
    seen: list[int] = []
    for token_id in ids:  # force each token in turn, read back its bytes
        r = client.chat.completions.create(
            model=model_name, messages=MSG, max_tokens=1, logprobs=True, top_logprobs=1,
            logit_bias={str(token_id): 100})
        item = r.choices[0].logprobs.content[0]
        assert item.token == engine.tokenizer.decode([token_id])
        seen.extend(item.bytes)
    assert bytes(seen).decode("utf-8") == " 🐳"


def test_lm_eval_loglikelihood_payload(http, model_name, live_server):
    """The body lm-evaluation-harness' `local-completions` sends to score continuations: token
    lists, echo, logprobs 1, max_tokens 1 (or 0), temperature 0; choice i answers prompt i."""
    engine = live_server.engine
    context = engine.encode(PREFIX)
    prompts = [context + engine.encode(e) for e in ENDINGS]
    for max_tokens in (0, 1):
        r = http.post("/v1/completions", json={
            "model": model_name, "prompt": prompts, "temperature": 0, "max_tokens": max_tokens,
            "logprobs": 1, "seed": 1234, "echo": True})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1]
        for c, ids in zip(choices, prompts):
            lp = c["logprobs"]
            assert len(lp["token_logprobs"]) == len(ids) + max_tokens
            continuation = lp["token_logprobs"][len(context):len(ids)]
            assert all(isinstance(x, float) and x <= 0 for x in continuation)
            assert c["text"].startswith(engine.tokenizer.decode(ids))


def test_echo_only_streamed_batch(client, model_name):
    prompts = [PREFIX + e for e in ENDINGS]
    chunks = list(client.completions.create(model=model_name, prompt=prompts, max_tokens=0,
                                            echo=True, logprobs=0, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: prompts[0], 1: prompts[0], 2: prompts[1], 3: prompts[1]}
    assert chunks[-1].usage.completion_tokens == 0
    assert chunks[-1].usage.prompt_tokens > 0


# ---------------------------------------------------------------- vLLM's include_stop_str_in_output

STOP_ALIGNMENTS = {
    "sample": None,
    "best_of_n": {"strategy": "best_of_n", "candidates": 3},
    "deal": {"strategy": "deal", "top_k": 2, "lookahead": 2,
             "rewards": [{"name": "keywords", "keywords": ["whale"]}]},
    "speculative_rejection": {"strategy": "speculative_rejection", "candidates": 4,
                              "rewards": [{"name": "keywords", "keywords": ["whale"]}]},
}


@pytest.mark.parametrize("strategy", list(STOP_ALIGNMENTS))
def test_include_stop_str_in_output(client, model_name, strategy):
    """The same tokens, the text cut after the stop string instead of before it, whichever
    strategy (each detokenizes where it decodes); streamed as whole."""
    align = STOP_ALIGNMENTS[strategy]
    extra = {"alignment": align} if align else {}
    kw = {"model": model_name, "messages": MSG, "max_tokens": 60, "seed": 3,
          "stop": [",", "."]}
    cut = client.chat.completions.create(**kw, extra_body=extra)
    kept = client.chat.completions.create(
        **kw, extra_body={**extra, "include_stop_str_in_output": True})
    assert cut.choices[0].finish_reason == kept.choices[0].finish_reason == "stop", cut
    text = kept.choices[0].message.content
    assert text[-1] in ",." and text[:-1] == cut.choices[0].message.content
    chunks = client.chat.completions.create(
        **kw, stream=True, extra_body={**extra, "include_stop_str_in_output": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


# ---------------------------------------------------------------- vLLM's truncate_prompt_tokens, request_id


def test_truncate_prompt_tokens(http, client, model_name):
    """Only the prompt's last k tokens are fed: the same answer as a prompt of those tokens."""
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    kw = {"model": model_name, "max_tokens": 6, "temperature": 0}
    cut = client.completions.create(prompt=PROMPT, extra_body={"truncate_prompt_tokens": 3},
                                    **kw)
    assert cut.usage.prompt_tokens == 3
    assert cut.choices[0].text == client.completions.create(prompt=ids[-3:], **kw).choices[0].text
    whole = client.completions.create(prompt=PROMPT, extra_body={"truncate_prompt_tokens": -1},
                                      **kw)
    assert whole.usage.prompt_tokens == len(ids)  # -1: as much as the context holds
    chat = client.chat.completions.create(messages=MSG, extra_body={"truncate_prompt_tokens": 5},
                                          **kw)
    assert chat.usage.prompt_tokens == 5
    r = http.post("/v1/completions", json={"prompt": PROMPT, "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_request_id_names_the_response(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSG, max_tokens=2,
                                       extra_body={"request_id": "job-42"})
    assert r.id == "chatcmpl-job-42"
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2,
                                  extra_body={"request_id": "job-43"})
    assert r.id == "cmpl-job-43"
