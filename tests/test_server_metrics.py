"""/metrics parses as Prometheus text, names every API.md metric, and moves with requests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

EXPECTED = [
    "num_requests_running", "num_requests_waiting", "e2e_request_latency_seconds",
    "time_to_first_token_seconds", "inter_token_latency_seconds", "prompt_tokens",
    "generation_tokens", "request_success", "kv_cache_usage_perc", "prefill_tokens",
    "strategy_requests", "candidates_scored", "reward_seconds", "model_tokens",
]


def scrape(http) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get(("alignserve_" + name, tuple(sorted(labels.items()))), 0.0)


def test_metric_names(http):
    text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in EXPECTED:
        assert "alignserve_" + name in families, name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert line.startswith("alignserve_"), line
            assert ":" not in line.split("{")[0].split(" ")[0], line
    assert families["alignserve_prompt_tokens"].type == "counter"
    assert families["alignserve_e2e_request_latency_seconds"].type == "histogram"
    assert families["alignserve_kv_cache_usage_perc"].type == "gauge"


def test_counters_move(http, client, model_name):
    before = scrape(http)
    r = client.completions.create(
        model=model_name, prompt="Whales are", max_tokens=4, temperature=0,
        extra_body={"alignment": {"strategy": "sample",
                                  "rewards": [{"name": "keywords", "keywords": ["ocean"]}]}})
    after = scrape(http)
    u = r.usage
    assert value(after, "prompt_tokens_total") - value(before, "prompt_tokens_total") == \
        u.prompt_tokens
    assert value(after, "generation_tokens_total") - value(before, "generation_tokens_total") == \
        u.completion_tokens
    reason = r.choices[0].finish_reason
    assert value(after, "request_success_total", finished_reason=reason) == \
        value(before, "request_success_total", finished_reason=reason) + 1
    assert value(after, "strategy_requests_total", strategy="sample") == \
        value(before, "strategy_requests_total", strategy="sample") + 1
    assert value(after, "e2e_request_latency_seconds_count") == \
        value(before, "e2e_request_latency_seconds_count") + 1
    assert value(after, "time_to_first_token_seconds_count") > \
        value(before, "time_to_first_token_seconds_count")
    assert value(after, "reward_seconds_count", reward="keywords") == \
        value(before, "reward_seconds_count", reward="keywords") + 1
    # Read from the engine at scrape time.
    assert value(after, "prefill_tokens_total") >= value(before, "prefill_tokens_total") + \
        u.prompt_tokens
    assert value(after, "model_tokens_total", kind="decode") > \
        value(before, "model_tokens_total", kind="decode")
    assert 0.0 <= value(after, "kv_cache_usage_perc") <= 1.0


def test_streamed_request_records_inter_token_latency(http, client, model_name):
    before = scrape(http)
    list(client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=6,
                                   stream=True, extra_body={"ignore_eos": True}))
    after = scrape(http)
    assert value(after, "inter_token_latency_seconds_count") >= \
        value(before, "inter_token_latency_seconds_count") + 1


def test_best_of_n_counts_candidates(http, client, model_name):
    before = scrape(http)
    client.completions.create(
        model=model_name, prompt="Whales are", max_tokens=4,
        extra_body={"alignment": {"strategy": "best_of_n", "candidates": 3,
                                  "rewards": [{"name": "length", "target_words": 3}]}})
    after = scrape(http)
    assert value(after, "candidates_scored_total", strategy="best_of_n") - \
        value(before, "candidates_scored_total", strategy="best_of_n") >= 3
