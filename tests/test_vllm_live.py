"""The vllm engine on real vLLM (its CPU build): `alignserve serve --engine vllm`, started once
per session (tests/conftest.py: vllm_server), called with the official openai client.

Every strategy streamed and not; greedy decoding the same streamed and not; `model_tokens`
equal on both engines; vLLM's own validation errors as 400s and bad `alignment` input refused
before vLLM sees it; /metrics with ours and vLLM's; a client that disconnects aborts vLLM's
request. Data parallel and SIGTERM: tests/test_vllm_live_dp.py.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

MESSAGES = [{"role": "user", "content": "Name three colors of the sea."}]
KEYWORDS = {"name": "keywords", "weight": 1.0, "keywords": ["blue", "green", "sea"]}

# one entry per strategy configuration a user can send; each runs with the server's defaults
STRATEGIES = {
    "sample": {"strategy": "sample"},
    "best_of_n": {"strategy": "best_of_n", "candidates": 4, "rewards": [KEYWORDS]},
    "deal": {"strategy": "deal", "rewards": [KEYWORDS], "lookahead": 4, "top_k": 3},
    # keywords: speculative_rejection pauses its ties (and may resume them) by default
    "speculative_rejection": {"strategy": "speculative_rejection", "candidates": 6,
                              "rewards": [KEYWORDS]},
    "particle_filter": {"strategy": "particle_filter", "candidates": 6, "rewards": [KEYWORDS]},
    "vas": {"strategy": "vas"},
    "contrastive_self": {"strategy": "contrastive", "amateur": "self:8"},
    "contrastive_lame_prompt": {"strategy": "contrastive", "amateur": "lame_prompt"},
    "contrastive_served": {"strategy": "contrastive", "amateur": "small"},
}


def _chat(client, alignment, *, stream, **kw):
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                          max_tokens=kw.pop("max_tokens", 10), stream=stream,
                                          extra_body={"alignment": alignment}, **kw)


def _metrics(base_url: str) -> str:
    r = httpx.get(base_url + "/metrics", timeout=30)
    assert r.status_code == 200
    return r.text


def _sample_value(text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples whose label set contains `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+|NaN)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
            found = True
    assert found, f"no {name}{{{labels}}} in /metrics"
    return total


def test_health_was_503_until_vllm_was_up(vllm_server):
    # the port answers while vLLM's engine core loads: 503, then 200 (0: not yet listening)
    seen = [s for s in vllm_server.process.health if s != 0]
    assert seen[-1] == 200 and 503 in seen, vllm_server.process.health
    assert vllm_server.process.ready_s > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("config", list(STRATEGIES))
def test_every_strategy_on_real_vllm(vllm_client, config, stream):
    alignment = STRATEGIES[config]
    scored = "rewards" in alignment
    if not stream:
        r = _chat(vllm_client, alignment, stream=False)
        (choice,) = r.choices
        assert choice.message.content.strip()
        assert choice.finish_reason in ("stop", "length")
        report = choice.model_extra["alignment"]
        assert (report["reward"] is not None) == scored
        summary = r.model_extra["alignment"]
        assert summary["strategy"] == alignment["strategy"]
        assert summary["model_tokens"] >= r.usage.prompt_tokens + r.usage.completion_tokens - 1
        if config == "best_of_n":
            assert summary["candidates_scored"] == 4
        if config in ("speculative_rejection", "particle_filter"):
            search = summary["search"]
            assert search["rounds"] >= 1 and search["candidates"] == 6
            assert search.get("pause_ties") is (True if config == "speculative_rejection"
                                                else None)
        return
    chunks = list(_chat(vllm_client, alignment, stream=True,
                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert "alignment" in last.choices[0].model_extra
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


# One vLLM request each, on a prompt shorter than one KV block (128 tokens on CPU), so nothing
# differs between the two runs. Not deal: its rollouts are concurrent requests whose batch
# shapes vary from run to run, and bf16 results with them, which can flip near-tied actions.
@pytest.mark.parametrize("config", ["sample", "contrastive_self", "vas"])
def test_greedy_is_the_same_streamed_and_whole(vllm_client, config):
    alignment = STRATEGIES[config]
    whole = _chat(vllm_client, alignment, stream=False, temperature=0, max_tokens=12)
    chunks = list(_chat(vllm_client, alignment, stream=True, temperature=0, max_tokens=12))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content


def test_responses_api_on_real_vllm(vllm_client):
    """/v1/responses rides the chat path on either engine: greedy, its answer is chat's, and
    a best_of_n stream ends in response.completed with the reward report."""
    r = vllm_client.responses.create(model="SmolLM2-135M-Instruct", input=MESSAGES[0]["content"],
                                     max_output_tokens=12, temperature=0)
    whole = _chat(vllm_client, STRATEGIES["sample"], stream=False, temperature=0, max_tokens=12)
    assert r.output_text == whole.choices[0].message.content
    assert r.usage.input_tokens == whole.usage.prompt_tokens
    events = list(vllm_client.responses.create(
        model="SmolLM2-135M-Instruct", input=MESSAGES[0]["content"], max_output_tokens=10,
        stream=True, extra_body={"alignment": STRATEGIES["best_of_n"]}))
    assert events[-1].type in ("response.completed", "response.incomplete")
    report = events[-1].response.model_extra["alignment"]
    assert report["strategy"] == "best_of_n" and report["candidates_scored"] == 4
    assert "keywords" in report["components"]


def test_token_ids_on_real_vllm(vllm_server, vllm_client):
    """return_token_ids: the ids vLLM sampled are the ones the text was decoded from."""
    r = vllm_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                            max_tokens=8, seed=1,
                                            extra_body={"return_token_ids": True})
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == r.usage.completion_tokens
    back = httpx.post(vllm_server.base_url + "/detokenize", json={"tokens": ids}, timeout=30)
    assert back.json()["prompt"] == r.choices[0].message.content
    assert len(r.model_extra["prompt_token_ids"]) == r.usage.prompt_tokens


def test_include_stop_str_in_output_on_real_vllm(vllm_client):
    kw = {"model": "SmolLM2-135M-Instruct", "messages": MESSAGES, "max_tokens": 40,
          "temperature": 0, "stop": [",", "."]}
    cut = vllm_client.chat.completions.create(**kw).choices[0]
    kept = vllm_client.chat.completions.create(
        **kw, extra_body={"include_stop_str_in_output": True}).choices[0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.message.content[-1] in ",." and kept.message.content[:-1] == cut.message.content


@pytest.mark.parametrize("config", ["sample", "best_of_n", "vas"])
def test_allowed_token_ids_on_real_vllm(vllm_server, vllm_client, config):
    only = sorted({t for word in (" blue", " green", ".") for t in httpx.post(
        vllm_server.base_url + "/tokenize", json={"prompt": word, "add_special_tokens": False},
        timeout=30).json()["tokens"]})
    r = vllm_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=5, seed=3,
        extra_body={"alignment": STRATEGIES[config], "allowed_token_ids": only,
                    "return_token_ids": True})
    ids = r.choices[0].model_extra["token_ids"]
    assert ids and set(ids) <= set(only), (ids, only)


def test_greedy_n_children_are_served(vllm_client):
    # vLLM refuses n > 1 with temperature 0; the adapter sends greedy children one by one.
    # (Their texts may differ: concurrent requests batch differently in bf16 on vLLM's CPU
    # build, which can flip a near-tied greedy token.)
    r = vllm_client.completions.create(model="SmolLM2-135M-Instruct", prompt="The sea is",
                                       max_tokens=6, n=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.text and c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 3 * 6


def test_the_largest_seed_serves_every_child(vllm_client):
    # the largest seed the API takes (int64): child i samples with seed + i, and vLLM adds i
    # again; the sums stay within vLLM's uint64, never a 503
    r = vllm_client.completions.create(model="SmolLM2-135M-Instruct", prompt="The sea is",
                                       max_tokens=4, n=2, temperature=1, seed=2**63 - 1)
    assert len(r.choices) == 2


def test_model_tokens_mean_the_same_on_both_engines(vllm_server, vllm_client, client,
                                                   live_server):
    """API.md: a prompt shared by n samples or candidates counts once, plus every token fed
    back to the model. ignore_eos fixes every length, so the two counts must be equal, but
    for the twin rows the native engine computed once (twins.py), which its
    alignserve_twin_tokens_total counts."""
    for extra in ({"n": 4}, {"n": 1, "extra_body": {"alignment": {"strategy": "best_of_n",
                                                                    "candidates": 4}}}):
        counts = []
        twins_before = _sample_value(_metrics(live_server.base_url), "alignserve_twin_tokens_total")
        for c in (vllm_client, client):
            kw = dict(extra)
            body = kw.pop("extra_body", {})
            r = c.completions.create(model=c.models.list().data[0].id,
                                     prompt="Once upon a time, in a small village by the sea,",
                                     max_tokens=6, temperature=1,
                                     extra_body={"ignore_eos": True, **body}, **kw)
            counts.append((r.usage.prompt_tokens, r.model_extra["alignment"]["model_tokens"]))
        twins = _sample_value(_metrics(live_server.base_url),
                              "alignserve_twin_tokens_total") - twins_before
        (prompt, on_vllm), (_, on_native) = counts
        assert on_vllm == on_native + twins == prompt + 4 * (6 - 1), (extra, counts, twins)


def test_vllm_validation_errors_are_400s():
    """A parameter vLLM's own SamplingParams refuses (here n > 1 with greedy sampling, which
    the adapter never sends) becomes a RequestError, which the server answers 400."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    from alignserve.engine.protocol import RequestError, SamplingParams
    from alignserve.engine.vllm.engine import VllmApi, VllmEngine
    from alignserve.server.errors import as_api_error

    engine = VllmEngine(None, None, "m", max_model_len=64, vocab_size=10,
                        api=VllmApi(VSamplingParams, None, RequestOutputKind.DELTA))
    with pytest.raises(RequestError) as e:
        engine._vllm_params(SamplingParams(temperature=0.0, max_tokens=4), 2, 0, 0, None, None)
    err = as_api_error(e.value)
    assert err.status == 400 and "greedy" in err.message


@pytest.mark.parametrize(("alignment", "param"), [
    ({"strategy": "sample", "bogus": 1}, "alignment.bogus"),
    ({"strategy": "nope"}, "alignment.strategy"),
    ({"strategy": "contrastive", "amateur": "not-served"}, "alignment.amateur"),
    ({"strategy": "best_of_n", "candidates": 0}, "alignment.candidates"),
])
def test_bad_alignment_is_a_400_before_vllm_sees_it(vllm_server, alignment, param):
    before = _sample_value(_metrics(vllm_server.base_url), "vllm:prompt_tokens_total")
    r = httpx.post(vllm_server.base_url + "/v1/chat/completions", timeout=60,
                   json={"messages": MESSAGES, "max_tokens": 4, "alignment": alignment})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert err["param"] == param, err
    after = _sample_value(_metrics(vllm_server.base_url), "vllm:prompt_tokens_total")
    assert after == before  # vLLM computed nothing for it
    assert httpx.get(vllm_server.base_url + "/health", timeout=10).status_code == 200


def test_metrics_carry_ours_and_vllms(vllm_server, vllm_client):
    before = _metrics(vllm_server.base_url)
    r = vllm_client.completions.create(model="SmolLM2-135M-Instruct", prompt="The ocean",
                                       max_tokens=5, extra_body={"ignore_eos": True})
    after = _metrics(vllm_server.base_url)
    prompt = r.usage.prompt_tokens
    for name in ("vllm:prompt_tokens_total", "alignserve_prompt_tokens_total"):
        assert _sample_value(after, name) - _sample_value(before, name) == prompt, name
    assert (_sample_value(after, "vllm:generation_tokens_total")
            - _sample_value(before, "vllm:generation_tokens_total")) == 5
    assert (_sample_value(after, "alignserve_strategy_requests_total", 'strategy="sample"')
            - _sample_value(before, "alignserve_strategy_requests_total",
                            'strategy="sample"')) == 1
    assert "alignserve_kv_cache_usage_perc" in after and "vllm:kv_cache_usage_perc" in after


def test_a_client_that_disconnects_aborts_vllms_request(vllm_server):
    url = vllm_server.base_url
    body = {"prompt": "Tell me a very long story.", "max_tokens": 3000, "ignore_eos": True,
            "stream": True}
    before = _sample_value(_metrics(url), "vllm:generation_tokens_total")
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # leave with the request in flight
    deadline = time.monotonic() + 30
    while _sample_value(_metrics(url), "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vLLM still runs the abandoned request"
        time.sleep(0.5)
    settled = _sample_value(_metrics(url), "vllm:generation_tokens_total")
    time.sleep(2)
    assert _sample_value(_metrics(url), "vllm:generation_tokens_total") == settled  # stopped
    assert settled - before < 3000  # it never ran to its end
    # and the server serves the next request
    assert httpx.get(url + "/health", timeout=10).status_code == 200
