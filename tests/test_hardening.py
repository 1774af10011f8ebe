"""Production hardening, against live servers with the real model: request ids and access logs,
auth, limits, body size, backpressure (429), KV budgeting, deadlines (408), cancellation of
every strategy, Prometheus lint (promtool) and the Grafana dashboard.

Tests that need other settings than the session's live server get a *side server*: another
app (create_app with those settings) served by uvicorn on another port, on the live server's
event loop, so it shares the already-loaded engine (its lifespan leaves that engine alone) or,
for the KV tests, a second engine with a tiny KV cache built on the same loaded model.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from alignserve.server.admission import Admission, Overloaded, kv_slots_needed
from alignserve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
CHAT = [{"role": "user", "content": "Tell me a long story about the sea."}]
# Long enough to be mid-decode when a test acts (~16 tok/s on 2 CPU cores).
LONG = {"max_tokens": 400, "ignore_eos": True}


# ---------------------------------------------------------------------------- helpers


@contextmanager
def side_server(live_server: Any, engine: Any = None, **overrides: Any) -> Iterator[Any]:
    """Serve create_app(engine, ServerSettings(**overrides)) on a free port of the live
    server's event loop. `engine` None: the live server's own (not started or closed here)."""
    import uvicorn

    from alignserve.server.app import create_app

    loop = live_server.engine.loop
    own = engine is not None
    settings = ServerSettings(host="127.0.0.1", port=0, **overrides)
    app = create_app(engine or live_server.engine, settings, own_engine=own)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    done = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop)
    deadline = time.monotonic() + 30
    while not server.started:
        if done.done() or time.monotonic() > deadline:
            raise RuntimeError(f"side server did not start: {done.exception()}")
        time.sleep(0.05)
    app.state.base_url = f"http://127.0.0.1:{port}"
    try:
        yield app
    finally:
        server.should_exit = True
        done.result(timeout=60)
        sock.close()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_idle(engine: Any, kv_baseline: int, timeout: float = 30.0) -> None:
    """Nothing runs or waits in the engine and its KV use is back to the baseline."""
    def idle() -> bool:
        s = engine.stats()
        return (s.running_sequences == 0 and s.waiting_requests == 0
                and s.kv_used_slots <= kv_baseline)

    try:
        wait_for(idle, timeout, "the engine to go idle")
    except AssertionError:
        s = engine.stats()
        for sid, st in list(getattr(engine, "_states", {}).items()):
            print("LEFT", sid, st.handle.prompt_len, len(st.handle.token_ids), st.busy,
                  st.group, [len(seg) for seg in st.chain], flush=True)
        raise AssertionError(f"engine busy: {s.running_sequences} running, "
                             f"{s.waiting_requests} waiting, {s.kv_used_slots} KV slots "
                             f"(baseline {kv_baseline})") from None


def idle_kv(engine: Any) -> int:
    wait_idle(engine, 10**12)
    return engine.stats().kv_used_slots


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def scrape(base_url: str, **headers: str) -> str:
    r = httpx.get(base_url + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200
    return r.text


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    return err


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield "[DONE]" if data == "[DONE]" else json.loads(data)


# ---------------------------------------------------------------------------- request ids, logs


def test_request_id_is_echoed_generated_and_names_the_response(http, model_name):
    body = {"model": model_name, "messages": CHAT, "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "req-42.a"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-42.a"
    assert r.json()["id"] == "chatcmpl-req-42.a"
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 1})
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and r.json()["id"] == f"cmpl-{rid}"
    # an unsafe id is replaced, not echoed into logs
    r = http.get("/v1/models", headers={"X-Request-Id": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    # errors carry one too
    r = http.post("/v1/completions", json={"prompt": ""}, headers={"X-Request-Id": "e-1"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "e-1"


def test_access_log_has_one_json_line_per_request(http, model_name, caplog):
    from alignserve.server.logs import JsonFormatter, RequestIdFilter

    caplog.set_level(logging.INFO, logger="alignserve.access")
    body = {"model": model_name, "messages": CHAT, "max_tokens": 3, "ignore_eos": True,
            "alignment": {"strategy": "best_of_n", "candidates": 2}}
    assert http.post("/v1/chat/completions", json=body,
                     headers={"X-Request-Id": "log-1"}).status_code == 200
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                     headers={"X-Request-Id": "log-2"}) as r:
        assert r.status_code == 200
        r.read()
    assert http.post("/v1/chat/completions", json={**body, "n": 99},
                     headers={"X-Request-Id": "log-3"}).status_code == 400

    def line(rid: str) -> dict[str, Any]:
        wait_for(lambda: any(getattr(rec, "request_id", None) == rid
                             for rec in caplog.records), 10, f"access line {rid}")
        records = [rec for rec in caplog.records
                   if rec.name == "alignserve.access" and rec.request_id == rid]
        assert len(records) == 1, records
        RequestIdFilter().filter(records[0])
        return json.loads(JsonFormatter().format(records[0]))

    whole, streamed, bad = line("log-1"), line("log-2"), line("log-3")
    for entry in (whole, streamed):
        assert entry["route"] == "/v1/chat/completions" and entry["status"] == 200
        assert entry["strategy"] == "best_of_n" and entry["latency_s"] > 0
        assert entry["completion_tokens"] == 3 and entry["prompt_tokens"] > 0
        assert entry["level"] == "info" and entry["logger"] == "alignserve.access"
    assert whole["request_id"] == "log-1" and whole["stream"] is False
    assert streamed["stream"] is True
    assert bad["status"] == 400 and "completion_tokens" not in bad


def test_json_formatter_carries_the_context_request_id():
    from alignserve.server.logs import REQUEST_ID, JsonFormatter, RequestIdFilter

    record = logging.LogRecord("alignserve.server", logging.WARNING, __file__, 1, "hello %s",
                               ("world",), None)
    token = REQUEST_ID.set("ctx-7")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "hello world" and out["request_id"] == "ctx-7"
    assert out["level"] == "warning" and out["ts"].endswith("+00:00")


# ---------------------------------------------------------------------------- auth


def test_bearer_compares_every_key_in_constant_time(monkeypatch):
    from alignserve.server import middleware

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    keys = ["alpha", "beta", "gamma"]
    assert middleware.bearer_ok("Bearer alpha", keys)
    assert len(calls) == 3  # no early exit on the first match
    assert middleware.bearer_ok("bearer gamma", keys)
    assert not middleware.bearer_ok("Bearer alph", keys)
    assert not middleware.bearer_ok("Basic alpha", keys)
    assert not middleware.bearer_ok(None, keys) and not middleware.bearer_ok("", keys)


def test_api_keys_from_flags_and_environment(monkeypatch):
    import argparse

    from alignserve.server.settings import add_arguments, from_args

    def parse(argv: list[str]) -> ServerSettings:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return from_args(parser.parse_args(argv))

    monkeypatch.setenv("ALIGNSERVE_API_KEY", "env1, env2")
    s = parse(["--api-key", "flag1", "--protect-metrics", "--request-timeout", "5"])
    assert s.api_keys() == ["env1", "env2", "flag1"]
    assert s.protect_metrics and s.request_timeout == 5.0
    monkeypatch.delenv("ALIGNSERVE_API_KEY")
    monkeypatch.setenv("ALIGNSERVE_PROTECT_METRICS", "false")
    assert parse([]).api_keys() == [] and not parse([]).protect_metrics
    with pytest.raises(ValueError, match="max-regex-chars"):
        ServerSettings(max_regex_chars=10**6).check()
    with pytest.raises(ValueError, match="max-running-requests"):
        ServerSettings(max_running_requests=0).check()
    with pytest.raises(ValueError, match="disconnect-poll-s must be positive"):
        ServerSettings(disconnect_poll_s=0).check()


def test_auth_on_every_v1_route(live_server, model_name):
    with side_server(live_server, api_key=["k-one", "k-two"], protect_metrics=True) as app:
        url = app.state.base_url
        routes = [("GET", "/v1/models", None), ("GET", "/v1/alignment", None),
                  ("POST", "/v1/completions", {"model": model_name, "prompt": "Hi",
                                               "max_tokens": 1}),
                  ("POST", "/v1/chat/completions", {"model": model_name, "messages": CHAT,
                                                    "max_tokens": 1}),
                  ("POST", "/v1/responses", {"model": model_name, "input": "Hi",
                                             "max_output_tokens": 1}),
                  ("POST", "/tokenize", {"prompt": "Hi"}),
                  ("POST", "/detokenize", {"tokens": [1]})]
        with httpx.Client(base_url=url, timeout=60) as c:
            for method, path, body in routes:
                for headers in ({}, {"Authorization": "Bearer nope"},
                                {"Authorization": "k-one"}):
                    r = c.request(method, path, json=body, headers=headers)
                    err = assert_error(r, 401)
                    assert err["type"] == "AuthenticationError"
                    assert r.headers["www-authenticate"] == "Bearer"
                for key in ("k-one", "k-two"):
                    r = c.request(method, path, json=body,
                                  headers={"Authorization": f"Bearer {key}"})
                    assert r.status_code == 200, r.text
            # a 401 comes before the body is even read: bad JSON gets 401 too
            r = c.post("/v1/completions", content=b"{nope", headers={"content-type":
                                                                      "application/json"})
            assert r.status_code == 401
            for path in ("/metrics", "/health"):  # --protect-metrics
                assert_error(c.get(path), 401)
                assert c.get(path, headers={"Authorization": "Bearer k-two"}).status_code == 200
            assert c.get("/openapi.json").status_code == 200
            schema = c.get("/openapi.json").json()
            text = c.get("/metrics", headers={"Authorization": "Bearer k-one"}).text
            assert metric(text, "alignserve_http_requests_total", route="/v1/models",
                          status="401") == 3
            assert "bearer" in schema["components"]["securitySchemes"]
            for path in ("/v1/responses", "/tokenize"):  # the schema says which take the key
                assert schema["paths"][path]["post"]["security"] == [{"bearer": []}]
            assert "security" not in schema["paths"]["/health"]["get"]
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="k-two", max_retries=0)
        assert keyed.completions.create(model=model_name, prompt="Hi", max_tokens=1).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="k-three",
                          max_retries=0).models.list()
    # the live server has no keys and leaves /metrics and /health open
    assert httpx.get(live_server.base_url + "/metrics").status_code == 200


# ---------------------------------------------------------------------------- limits

TIGHT = {"max_n": 2, "max_candidates": 2, "max_top_k": 2, "max_lookahead": 2, "max_beam": 2,
         "max_tokens_limit": 8, "max_prompt_tokens": 40, "max_body_bytes": 4096,
         "max_rewards": 2, "max_regex_chars": 10, "max_schema_bytes": 100}
M = [{"role": "user", "content": "Hi"}]


def _body(**kw: Any) -> dict[str, Any]:
    return {"messages": M, "max_tokens": 2, **kw}


LIMIT_CASES = [  # (body, param, flag named in the message)
    (_body(n=3), "n", "--max-n"),
    (_body(max_tokens=9), "max_tokens", "--max-tokens-limit"),
    (_body(max_completion_tokens=9), "max_completion_tokens", "--max-tokens-limit"),
    (_body(alignment={"strategy": "best_of_n", "candidates": 3}), "alignment.candidates",
     "--max-candidates"),
    (_body(alignment={"strategy": "deal", "top_k": 3}), "alignment.top_k", "--max-top-k"),
    (_body(alignment={"strategy": "vas", "top_k": 3}), "alignment.top_k", "--max-top-k"),
    (_body(alignment={"strategy": "deal", "lookahead": 3}), "alignment.lookahead",
     "--max-lookahead"),
    (_body(alignment={"strategy": "deal", "beam": 3}), "alignment.beam", "--max-beam"),
    (_body(messages=[{"role": "user", "content": "word " * 60}]), "messages",
     "--max-prompt-tokens"),
    (_body(alignment={"rewards": [{"name": "length", "target_words": 3}] * 3}),
     "alignment.rewards", "--max-rewards"),
    (_body(alignment={"rewards": [{"name": "regex", "pattern": "a" * 11}]}),
     "alignment.rewards[0].pattern", "--max-regex-chars"),
    (_body(alignment={"rewards": [{"name": "json_schema", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(8)}}}]}),
     "alignment.rewards[0].schema", "--max-schema-bytes"),
    # the strategies' own bounds come first (pydantic), as before
    (_body(alignment={"strategy": "deal", "top_k": 999}), "alignment.top_k", "16"),
]


def test_limits_are_400s_naming_the_limit(live_server, model_name):
    with side_server(live_server, **TIGHT) as app, \
            httpx.Client(base_url=app.state.base_url, timeout=120) as c:
        info = c.get("/v1/alignment").json()
        limits = info["limits"]
        for key in ("max_n", "max_candidates", "max_top_k", "max_lookahead", "max_beam",
                    "max_rewards", "max_regex_chars", "max_schema_bytes", "max_body_bytes",
                    "max_prompt_tokens"):
            assert limits[key] == TIGHT[key], key
        assert limits["max_tokens"] == 8
        for key in ("max_running_requests", "max_waiting_requests", "request_timeout_s",
                    "kv_cache_slots", "max_model_len"):
            assert key in limits
        deal = {s["name"]: s for s in info["strategies"]}["deal"]["params"]["properties"]
        assert deal["top_k"]["maximum"] == 2 and deal["lookahead"]["maximum"] == 2
        for body, param, named in LIMIT_CASES:
            for path, payload in (("/v1/chat/completions", {"model": model_name, **body}),):
                err = assert_error(c.post(path, json=payload), 400, param)
                assert named in err["message"], (param, err["message"])
        # completions: prompt tokens, as text and as token ids
        err = assert_error(c.post("/v1/completions", json={"prompt": list(range(100, 150)),
                                                           "max_tokens": 1}), 400, "prompt")
        assert "--max-prompt-tokens" in err["message"]
        # a strategy whose defaults exceed the limits still runs with `strategy` alone
        # (deal's default top_k 4 and lookahead 8 are lowered to 2)
        r = c.post("/v1/chat/completions", json={"model": model_name, "messages": M,
                                                  "max_tokens": 2,
                                                  "alignment": {"strategy": "deal"}})
        assert r.status_code == 200, r.text
        assert r.json()["alignment"]["strategy"] == "deal"


def test_regex_timeout_flag_reaches_the_reward(live_server, model_name):
    from alignserve.server.app import default_rewards
    from alignserve.server.prepare import Preparer
    from alignserve.server.protocol import ChatCompletionRequest

    settings = ServerSettings(regex_timeout=0.001)
    preparer = Preparer(live_server.engine, settings, default_rewards(settings), model_name)
    req = ChatCompletionRequest.model_validate(
        _body(alignment={"rewards": [{"name": "regex", "pattern": "(a|aa)+$"}]}))
    regex_reward = preparer.chat(req, "rid").decode.reward.items[0].reward
    assert regex_reward.timeout_s == 0.001
    start = time.perf_counter()
    assert regex_reward.score(["a" * 30 + "!"]) == [0.0]  # catastrophic: cut off, scores 0
    assert time.perf_counter() - start < 0.5 and regex_reward.timeouts == 1
    # the same bound applies to a json_schema reward's `pattern`
    req = ChatCompletionRequest.model_validate(_body(alignment={"rewards": [
        {"name": "json_schema", "schema": {"type": "string", "pattern": "^(a|aa)+$"}}]}))
    schema_reward = preparer.chat(req, "rid").decode.reward.items[0].reward
    assert schema_reward.timeout_s == 0.001
    start = time.perf_counter()
    assert schema_reward.score(['"' + "a" * 40 + '!"', '"aaaa"']) == [0.5, 1.0]
    assert time.perf_counter() - start < 0.5


def test_body_limit_413_before_parsing(live_server):
    with side_server(live_server, max_body_bytes=2048) as app, \
            httpx.Client(base_url=app.state.base_url, timeout=60) as c:
        big = {"prompt": "x" * 4000, "max_tokens": 1}
        err = assert_error(c.post("/v1/completions", json=big), 413)
        assert "--max-body-bytes" in err["message"] and err["type"] == "RequestTooLargeError"
        # no Content-Length (chunked): counted as it streams in
        raw = json.dumps(big).encode()

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(raw), 512):
                yield raw[i:i + 512]

        assert_error(c.post("/v1/completions", content=chunks(),
                            headers={"content-type": "application/json"}), 413)
        # not even parsed: invalid JSON over the limit is a 413, not a 400
        assert_error(c.post("/v1/completions", content=b"{" * 3000,
                            headers={"content-type": "application/json"}), 413)
        # under the limit, all is normal
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code \
            == 200
        with pytest.raises(openai.APIStatusError) as info:
            openai.OpenAI(base_url=app.state.base_url + "/v1", api_key="x",
                          max_retries=0).completions.create(model="m", prompt="y" * 5000)
        assert info.value.status_code == 413


# ---------------------------------------------------------------------------- backpressure


def test_admission_queue_unit():
    async def scenario() -> None:
        adm = Admission(max_running=1, max_waiting=1, kv_total=100)
        a = adm.enter(10)
        assert a.running and adm.running == 1
        b = adm.enter(10)
        assert not b.running and adm.waiting == 1
        with pytest.raises(Overloaded):
            adm.enter(10)
        waiter = asyncio.ensure_future(b.acquire())
        await asyncio.sleep(0)
        a.release()
        await asyncio.wait_for(waiter, 1)
        assert b.running and adm.waiting == 0 and adm.kv_reserved == 10
        b.release()
        b.release()  # idempotent
        assert adm.running == 0 and adm.kv_reserved == 0
        # KV: a big reservation waits for memory even with running slots free
        adm = Admission(max_running=4, max_waiting=4, kv_total=100)
        big1 = adm.enter(60)
        big2 = adm.enter(60)
        small = adm.enter(10)  # FIFO: behind big2 even though it would fit
        assert big1.running and not big2.running and not small.running
        gave_up = asyncio.ensure_future(small.acquire())
        await asyncio.sleep(0)
        gave_up.cancel()  # a client that leaves while waiting gives its place up
        await asyncio.sleep(0)
        assert adm.waiting == 1 and small.state == "done"
        big1.release()
        assert big2.running and adm.kv_reserved == 60
        big2.release()

    asyncio.run(scenario())


def test_kv_estimate_grows_with_what_a_request_can_hold():
    from alignserve.decoding.base import STRATEGIES, DecodeRequest
    from alignserve.engine.protocol import SamplingParams

    def need(strategy: str, n: int = 1, max_tokens: int = 100, **params: Any) -> int:
        import alignserve.decoding  # noqa: F401

        p = STRATEGIES[strategy].params.model_validate(params)
        req = DecodeRequest("r", list(range(20)), "", SamplingParams(max_tokens=max_tokens), n,
                            strategy, p, None)
        return kv_slots_needed(req, 16)

    assert need("sample") >= 20 + 100
    assert need("sample", n=4) > need("sample", n=2) > need("sample")
    assert need("sample", max_tokens=200) > need("sample")
    assert need("best_of_n", candidates=8) >= 8 * 100
    # token by token: a page per step; committing blocks needs fewer steps, so fewer pages
    assert need("deal", beam=2, top_k=4, lookahead=8, commit=1) >= 2 * 100 * 16
    assert need("deal", beam=2, top_k=4, lookahead=8, commit=4) < \
        need("deal", beam=2, top_k=4, lookahead=8, commit=1)
    assert need("contrastive", amateur="lame_prompt") >= 2 * (20 + 100)
    # speculative rejection only prunes: best_of_n's worst case; particle filtering forks a
    # leaf per particle and round
    assert need("speculative_rejection", candidates=8) == need("best_of_n", candidates=8)
    assert need("particle_filter", candidates=8, segment=4) >= 8 * (100 // 4) * 16
    assert need("particle_filter", candidates=8, segment="entropy") > \
        need("particle_filter", candidates=8, segment=4)


def test_kv_reservation_is_what_the_strategy_declares():
    """Admission asks the strategy (Strategy.kv_slots) and knows no strategy by name: a new
    strategy's declaration is what gets reserved, plus the prefill's slack."""
    import dataclasses

    import alignserve.decoding  # noqa: F401
    from alignserve.decoding.base import STRATEGIES, DecodeRequest
    from alignserve.engine.protocol import SamplingParams
    from alignserve.server.admission import PREFILL_SLACK

    seen = []

    def declared(decode, prompt, tokens, page):
        seen.append((decode.strategy, prompt, tokens, page))
        return 1000 * prompt + tokens

    base = STRATEGIES["sample"]
    STRATEGIES["kv_probe"] = dataclasses.replace(base, name="kv_probe", kv_slots=declared)
    try:
        req = DecodeRequest("r", list(range(20)), "", SamplingParams(max_tokens=100), 1,
                            "kv_probe", base.params.model_validate({}), None)
        assert kv_slots_needed(req, 16) == 20_100 + PREFILL_SLACK
        assert kv_slots_needed(req, 16, max_tokens=7) == 20_007 + PREFILL_SLACK
        assert seen == [("kv_probe", 20, 100, 16), ("kv_probe", 20, 7, 16)]
    finally:
        del STRATEGIES["kv_probe"]


def test_backpressure_429_with_retry_after(live_server, model_name):
    engine = live_server.engine
    kv = idle_kv(engine)
    with side_server(live_server, max_running_requests=1, max_waiting_requests=1,
                     retry_after=7) as app, \
            httpx.Client(base_url=app.state.base_url, timeout=120) as c:
        adm = app.state.admission
        body = {"model": model_name, "messages": CHAT, "stream": True, **LONG}
        with c.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            next(sse_events(lines))
            wait_for(lambda: adm.running == 1, what="the first request to run")
            with c.stream("POST", "/v1/chat/completions", json=body) as second:
                assert second.status_code == 200  # accepted into the queue
                second_lines = second.iter_lines()
                next(sse_events(second_lines))  # the role chunk; its decode waits
                wait_for(lambda: adm.waiting == 1, what="the second request to queue")
                text = scrape(app.state.base_url)
                assert metric(text, "alignserve_num_requests_waiting") >= 1
                assert metric(text, "alignserve_server_requests_running") == 1
                r = c.post("/v1/chat/completions", json={**body, "stream": False})
                err = assert_error(r, 429)
                assert r.headers["retry-after"] == "7" and err["type"] == "RateLimitError"
                assert "--max-waiting-requests" in err["message"]
                r = c.post("/v1/chat/completions", json={**body, "stream": True})
                assert_error(r, 429)  # before the stream starts: a real status
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=app.state.base_url + "/v1", api_key="x",
                                  max_retries=0).chat.completions.create(
                        model=model_name, messages=CHAT, max_tokens=1)
                # the first one leaves: the second gets its turn and decodes
                first.close()
                wait_for(lambda: adm.running == 1 and adm.waiting == 0, 30,
                         "the queued request to be admitted")
                content = next(e for e in sse_events(second_lines)
                               if e != "[DONE]" and e["choices"]
                               and e["choices"][0]["delta"].get("content"))
                assert content
        wait_for(lambda: adm.running == 0 and adm.waiting == 0, 30, "admission to empty")
        text = scrape(app.state.base_url)
        assert metric(text, "alignserve_http_requests_total", route="/v1/chat/completions",
                      status="429") == 3
    wait_idle(engine, kv)


# ---------------------------------------------------------------------------- KV budget


def _tiny_kv_engine(live_server: Any, slots: int) -> Any:
    """An engine on the live one's model whose KV pool holds about `slots` tokens (bf16 or
    fp32, as the live engine's pool)."""
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.engine.native.kv_cache import KVCache

    e = live_server.engine
    cfg = e.cfg
    per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, e.kv.k.dtype)
    return NativeEngine(e.model, e.tokenizer, e.model_name, e.device,
                        kv_cache_gib=slots * per_token / 2**30)


def test_kv_never_fits_is_400_and_not_now_waits(live_server, model_name):
    tiny = _tiny_kv_engine(live_server, 460)
    total = tiny.kv.num_slots
    assert 300 < total < 600
    with side_server(live_server, engine=tiny) as app, \
            httpx.Client(base_url=app.state.base_url, timeout=120) as c:
        adm = app.state.admission
        assert c.get("/v1/alignment").json()["limits"]["kv_cache_slots"] == total
        # can never fit: n=2 x 300 tokens
        err = assert_error(c.post("/v1/completions", json={
            "prompt": "Hi", "max_tokens": 300, "n": 2}), 400, "max_tokens")
        assert "KV cache" in err["message"] and str(total) in err["message"]
        err = assert_error(c.post("/v1/chat/completions", json={
            "messages": M, "max_tokens": 100, "alignment": {"strategy": "deal"}}), 400,
            "max_tokens")
        # a list of prompts that each fit but together never could
        err = assert_error(c.post("/v1/completions", json={
            "prompt": ["Hi", "Ho", "Ha"], "max_tokens": 200}), 400, "prompt")
        assert "--kv-cache-gib" in err["message"]
        # max_tokens left to the server: it picks the most that fits (no 400)
        from alignserve.server.protocol import ChatCompletionRequest

        prepared = app.state.preparer.chat(ChatCompletionRequest(messages=M), "r")
        assert 0 < prepared.kv_slots <= total
        assert prepared.decode.sampling.max_tokens < total
        # fits alone, not twice: the second waits its turn, then runs
        one = {"prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": True,
               "stream": True}
        assert 2 * kv_estimate(app, one) > total >= kv_estimate(app, one)
        with c.stream("POST", "/v1/completions", json=one) as first:
            first_events = sse_events(first.iter_lines())  # (a dropped iterator disconnects)
            next(first_events)
            wait_for(lambda: adm.running == 1, what="the first to run")
            result: dict[str, Any] = {}

            def second() -> None:
                # as big a reservation, but it stops at its first space
                result["r"] = httpx.post(app.state.base_url + "/v1/completions", timeout=120,
                                         json={**one, "stream": False, "ignore_eos": False,
                                               "stop": [" "]})

            t = threading.Thread(target=second)
            t.start()
            wait_for(lambda: adm.waiting == 1, what="the second to wait for KV")
            assert adm.running == 1  # a running slot was free: it waits for memory
            first.close()
        t.join(120)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert tiny.stats().kv_used_slots == 0


def kv_estimate(app: Any, body: dict[str, Any]) -> int:
    from alignserve.server.protocol import CompletionRequest

    return app.state.preparer.completion(CompletionRequest.model_validate(body), "e").kv_slots


# ---------------------------------------------------------------------------- deadlines


def test_request_timeout_408(live_server, model_name):
    engine = live_server.engine
    kv = idle_kv(engine)
    with side_server(live_server, request_timeout=1.5, max_running_requests=1) as app, \
            httpx.Client(base_url=app.state.base_url, timeout=120) as c:
        url = app.state.base_url
        body = {"model": model_name, "messages": CHAT, **LONG}
        # non-streamed: 408, not retried by the openai client (x-should-retry: false)
        r = c.post("/v1/chat/completions", json=body)
        err = assert_error(r, 408)
        assert err["type"] == "RequestTimeoutError" and "--request-timeout" in err["message"]
        assert r.headers["x-should-retry"] == "false"
        wait_idle(engine, kv)
        before = metric(scrape(url), "alignserve_http_requests_total",
                        route="/v1/chat/completions", status="408")
        with pytest.raises(openai.APIStatusError) as info:
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=2,
                          timeout=60).chat.completions.create(
                model=model_name, messages=CHAT, max_tokens=400,
                extra_body={"ignore_eos": True})
        assert info.value.status_code == 408
        after = metric(scrape(url), "alignserve_http_requests_total",
                       route="/v1/chat/completions", status="408")
        assert after == before + 1  # one try: the client obeyed x-should-retry
        wait_idle(engine, kv)
        # streamed: an error event, then [DONE]
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            events = list(sse_events(s.iter_lines()))
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 408
        assert any(e != "[DONE]" and "choices" in e for e in events[:-2])
        wait_idle(engine, kv)
        # timed out while queued (the one running slot held meanwhile): a 408 that invites
        # a retry later
        loop = live_server.engine.loop

        async def hold() -> Any:
            return app.state.admission.enter(0)

        blocker = asyncio.run_coroutine_threadsafe(hold(), loop).result(10)
        try:
            r = c.post("/v1/chat/completions", json={**body, "max_tokens": 1})
        finally:
            loop.call_soon_threadsafe(blocker.release)
        assert_error(r, 408)
        assert "retry-after" in r.headers and "x-should-retry" not in r.headers
        assert "waited for capacity" in r.json()["error"]["message"]
        text = scrape(url)
        assert metric(text, "alignserve_request_aborts_total", reason="timeout") >= 4
    wait_idle(engine, kv)


# ---------------------------------------------------------------------------- cancellation

STRATEGIES = {
    "sample": {"strategy": "sample"},
    "best_of_n": {"strategy": "best_of_n", "candidates": 3},
    "deal": {"strategy": "deal", "top_k": 3, "lookahead": 4, "beam": 2},
    "vas": {"strategy": "vas"},
    "contrastive": {"strategy": "contrastive"},
    "contrastive-lame": {"strategy": "contrastive", "amateur": "lame_prompt",
                         "lame_prompt": "Say anything."},
    "speculative_rejection": {"strategy": "speculative_rejection", "candidates": 4},
    "particle_filter": {"strategy": "particle_filter", "candidates": 4, "keep": 1.0},
}


def _busy_with(engine: Any, tokens_before: int) -> bool:
    s = engine.stats()
    return sum(s.model_tokens.values()) > tokens_before + 8


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_disconnect_mid_stream_frees_everything(live_server, http, model_name, name):
    engine = live_server.engine
    kv = idle_kv(engine)
    before = scrape(live_server.base_url)
    running = metric(before, "alignserve_num_requests_running")
    aborts = metric(before, "alignserve_request_aborts_total", reason="disconnect")
    tokens = sum(engine.stats().model_tokens.values())
    body = {"model": model_name, "messages": CHAT, "stream": True, **LONG,
            "alignment": STRATEGIES[name]}
    with httpx.Client(base_url=live_server.base_url, timeout=120) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r.iter_lines())  # (a dropped iterator would disconnect)
        next(events)
        wait_for(lambda: _busy_with(engine, tokens), 60, f"{name} to compute")
        assert engine.stats().kv_used_slots > kv
    # the connection is closed mid-search: within a step or two all of it is freed
    wait_idle(engine, kv, timeout=20)
    stopped = sum(engine.stats().model_tokens.values())
    time.sleep(0.3)
    assert sum(engine.stats().model_tokens.values()) == stopped  # no work goes on
    after = scrape(live_server.base_url)
    assert metric(after, "alignserve_num_requests_running") == running
    assert metric(after, "alignserve_server_requests_running") == 0
    wait_for(lambda: metric(scrape(live_server.base_url), "alignserve_request_aborts_total",
                            reason="disconnect") == aborts + 1, 10, "the abort to be counted")


def test_disconnect_mid_search_non_streamed(live_server, model_name):
    engine = live_server.engine
    kv = idle_kv(engine)
    tokens = sum(engine.stats().model_tokens.values())
    body = {"model": model_name, "messages": CHAT, **LONG,
            "alignment": STRATEGIES["deal"]}

    def go() -> None:
        with httpx.Client(base_url=live_server.base_url, timeout=3) as c, \
                pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=body)

    t = threading.Thread(target=go)
    t.start()
    wait_for(lambda: _busy_with(engine, tokens), 60, "deal to search")
    t.join(30)
    wait_idle(engine, kv, timeout=20)
    assert metric(scrape(live_server.base_url), "alignserve_server_requests_running") == 0


# ---------------------------------------------------------------------------- metrics, dashboard

API_METRICS = ["num_requests_running", "num_requests_waiting", "e2e_request_latency_seconds",
               "time_to_first_token_seconds", "inter_token_latency_seconds",
               "prompt_tokens", "generation_tokens", "request_success", "kv_cache_usage_perc",
               "prefill_tokens", "strategy_requests", "candidates_scored", "reward_seconds",
               "model_tokens"]
OURS = ["server_requests_running", "kv_cache_reserved_perc", "request_aborts",
        "http_requests"]


def _exercise(client: openai.OpenAI, model: str) -> None:
    """Give every labelled metric some samples."""
    client.chat.completions.create(
        model=model, messages=M, max_tokens=3, stream=True,
        extra_body={"alignment": {"strategy": "best_of_n", "candidates": 2,
                                  "rewards": [{"name": "keywords", "keywords": ["hi"]},
                                              {"name": "length", "target_words": 3}]}})
    client.completions.create(model=model, prompt="Hi", max_tokens=2)


def _metric_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_every_metric_is_exposed(http, client, model_name):
    _exercise(client, model_name)
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    for name in API_METRICS + OURS:
        assert "alignserve_" + name in families, name


def test_promtool_check_metrics(http, client, model_name):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("ALIGNSERVE_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required here (ALIGNSERVE_REQUIRE_PROMTOOL) but missing")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; .ci/run does)")
    _exercise(client, model_name)
    text = http.get("/metrics").text
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    # and promtool does object to a bad exposition (the check can fail)
    bad = subprocess.run([promtool, "check", "metrics"], text=True, capture_output=True,
                         input="# TYPE x_total counter\nx_total{a=\"b\"} 1\nx:y 2\n",
                         timeout=60, check=False)
    assert bad.returncode != 0


def test_grafana_dashboard_uses_only_real_metrics(http, client, model_name):
    _exercise(client, model_name)
    exposed = _metric_names(http.get("/metrics").text)
    path = ROOT / "deploy" / "grafana" / "alignserve.json"
    dash = json.loads(path.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\balignserve_[a-z0-9_]+", target["expr"]))
            assert names, target["expr"]
            used |= names
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    for t in dash["templating"]["list"]:
        used |= set(re.findall(r"\balignserve_[a-z0-9_]+", json.dumps(t)))
    missing = used - exposed
    assert not missing, f"the dashboard uses metrics /metrics does not have: {missing}"
    # the dashboard covers what API.md promises
    for name in API_METRICS:
        assert any(u.startswith("alignserve_" + name) for u in used), name
