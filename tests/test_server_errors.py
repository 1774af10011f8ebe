"""Bad input gets a 4xx in OpenAI's error shape naming the field, and the server keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from alignserve.decoding.base import STRATEGIES, Strategy, StrategyParams
from alignserve.engine.protocol import CapacityError, EngineError

MSG = [{"role": "user", "content": "Hi"}]
LONG = "hello " * 9000  # ~9000 tokens: beyond SmolLM2's 8192-token context

# (body without model, or a function of the server's settings giving it; status; param)
CHAT_CASES = [
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": MSG, "frobnicate": 1}, 400, "frobnicate"),
    ({"messages": [{"role": "function", "content": "x"}]}, 400, "messages[0]"),  # no name
    ({"messages": [{"role": "user", "content": "x", "function_call": {"name": "f",
                                                                       "arguments": "{}"}}]},
     400, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "messages[0].extra"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ({"messages": MSG, "n": 0}, 400, "n"),
    (lambda s: {"messages": MSG, "n": s.max_n + 1}, 400, "n"),
    ({"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    (lambda s: {"messages": MSG, "max_tokens": s.max_tokens_limit + 1}, 400, "max_tokens"),
    ({"messages": MSG, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": LONG}], "max_tokens": 4}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hello " * 6000}], "max_tokens": 4000},
     400, "max_tokens"),
    ({"messages": MSG, "temperature": -1}, 400, "temperature"),
    ({"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ({"messages": MSG, "top_p": 0}, 400, "top_p"),
    ({"messages": MSG, "top_k": -2}, 400, "top_k"),
    ({"messages": MSG, "presence_penalty": 3}, 400, "presence_penalty"),
    ({"messages": MSG, "stop": ""}, 400, "stop"),
    ({"messages": MSG, "stop": [1]}, 400, "stop"),
    ({"messages": MSG, "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens"),
    ({"messages": MSG, "stop_token_ids": [10**7]}, 400, "stop_token_ids"),
    ({"messages": MSG, "logit_bias": {"50": 101}}, 400, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"50": -100.5}}, 400, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"token": 1}}, 400, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"49152": 1}}, 400, "logit_bias"),  # SmolLM2: 49152 ids
    ({"messages": MSG, "logit_bias": {"50": 1}, "alignment": {"strategy": "deal"}}, 400,
     "logit_bias"),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": MSG, "stream": False, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ({"messages": MSG, "seed": 2**63}, 400, "seed"),
    ({"messages": MSG, "seed": -(2**63) - 1}, 400, "seed"),
    ({"messages": MSG, "modalities": ["text", "audio"]}, 400, "modalities"),
    ({"messages": MSG, "audio": {"voice": "alloy", "format": "mp3"}}, 400, "audio"),
    ({"messages": MSG, "function_call": {"name": "f"}}, 400, "function_call"),  # no functions
    ({"messages": [{"role": "assistant", "content": None,
                    "function_call": {"name": "f", "arguments": "{"}}] + MSG}, 400,
     "messages[0].function_call.arguments"),
    ({"messages": [{"role": "assistant", "function_call": {"name": "f"}}] + MSG}, 400,
     "messages[0].function_call.arguments"),
    ({"messages": MSG, "functions": [{"name": "f"}], "function_call": {"name": "g"}}, 400,
     "function_call.name"),
    ({"messages": MSG, "functions": [{"name": "f", "parameters": {"type": "nope"}}]}, 400,
     "functions[0].parameters.type"),
    ({"messages": MSG, "functions": [{"name": "f"}], "tools": [
        {"type": "function", "function": {"name": "g"}}]}, 400, "functions"),
    ({"messages": MSG, "functions": [{"name": "f"}, {"name": "f"}]}, 400, "functions[1].name"),
    ({"messages": MSG, "store": "yes"}, 400, "store"),
    ({"messages": MSG, "metadata": {"k": 1}}, 400, "metadata.k"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     400, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
     400, "messages[0]"),
    ({"messages": MSG, "response_format": {"type": "json"}}, 400, "response_format.type"),
    ({"messages": MSG, "response_format": {"type": "json_object"}, "ignore_eos": True}, 400,
     "ignore_eos"),
    ({"messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ({"messages": MSG, "stream_options": {"include_usage": True, "x": 1}}, 400,
     "stream_options.x"),
    ({"messages": MSG, "alignment": {"strategy": "nope"}}, 400, "alignment.strategy"),
    ({"messages": MSG, "alignment": {"strategy": "sample", "beam": 2}}, 400, "alignment.beam"),
    ({"messages": MSG, "alignment": {"rewards": [{"name": "nope"}]}}, 400,
     "alignment.rewards[0].name"),
    ({"messages": MSG, "alignment": {"rewards": [{"name": "keywords", "keywords": []}]}}, 400,
     "alignment.rewards[0].keywords"),
    ({"messages": MSG, "alignment": {"rewards": [{"name": "length", "bogus": 1}]}}, 400,
     "alignment.rewards[0].bogus"),
    ({"messages": MSG, "alignment": {"rewards": "keywords"}}, 400, "alignment.rewards"),
    ({"messages": MSG, "alignment": {"strategy": "best_of_n", "candidates": 2}, "n": 3}, 400,
     "alignment.candidates"),
    (lambda s: {"messages": MSG, "alignment": {"strategy": "best_of_n",
                                               "candidates": s.max_candidates + 1}}, 400,
     "alignment.candidates"),
    ({"messages": MSG, "alignment": {"strategy": "best_of_n", "candidates": "many"}}, 400,
     "alignment.candidates"),
    # strategy keys are strict, as the request's own fields: a wrong JSON type is never coerced
    ({"messages": MSG, "alignment": {"strategy": "best_of_n", "candidates": "8"}}, 400,
     "alignment.candidates"),
    ({"messages": MSG, "alignment": {"strategy": "vas", "keep_non_candidates": "yes"}}, 400,
     "alignment.keep_non_candidates"),
    ({"messages": MSG, "alignment": {"strategy": "vas", "value_models": [
        {"name": "sentiment-positive", "weight": "2"}]}}, 400, "alignment.value_models[0].weight"),
    ({"messages": MSG, "alignment": {"strategy": "best_of_n", "extra_knob": 1}}, 400,
     "alignment.extra_knob"),
    ({"messages": MSG, "model": "gpt-4"}, 404, "model"),
]

COMPLETION_CASES = [
    ({"prompt": ""}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ["a", [1]]}, 400, "prompt"),
    ({"prompt": ["a"] * 65}, 400, "prompt"),
    ({"prompt": [1, 10**8]}, 400, "prompt"),
    ({"prompt": [[1, 2], [3, 10**8]]}, 400, "prompt[1]"),
    ({"prompt": ["a", ""]}, 400, "prompt[1]"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": LONG}, 400, "prompt"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1, "echo": True}, 400, "max_tokens"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "seed": 2**64 - 1}, 400, "seed"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    # best_of is honoured (best_of_n without rewards), within its own checks
    ({"prompt": "x", "best_of": 2, "n": 3}, 400, "best_of"),
    ({"prompt": "x", "best_of": 0}, 400, "best_of"),
    ({"prompt": "x", "best_of": 65}, 400, "best_of"),
    ({"prompt": "x", "best_of": 3, "alignment": {"strategy": "best_of_n"}}, 400, "best_of"),
    ({"prompt": "x", "messages": MSG}, 400, "messages"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
]


def _assert_error(r, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}.get(status, err["type"])
    return err


@pytest.mark.parametrize(("body", "status", "param"), CHAT_CASES)
def test_chat_rejects(http, live_server, model_name, body, status, param):
    body = body(live_server.settings) if callable(body) else body
    body = {"model": model_name, "max_tokens": 4, **body}
    _assert_error(http.post("/v1/chat/completions", json=body), status, param)


@pytest.mark.parametrize(("body", "status", "param"), COMPLETION_CASES)
def test_completion_rejects(http, model_name, body, status, param):
    body = {"model": model_name, "max_tokens": 4, **body}
    _assert_error(http.post("/v1/completions", json=body), status, param)


def test_context_message_is_vllms(http, model_name, live_server):
    body = {"model": model_name, "prompt": "hello " * 6000, "max_tokens": 4000}
    err = _assert_error(http.post("/v1/completions", json=body), 400, "max_tokens")
    ctx = live_server.engine.max_model_len
    assert f"maximum context length is {ctx} tokens" in err["message"]
    assert "in the completion" in err["message"]


def test_unparseable_json(http):
    r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={
        "content-type": "application/json"})
    err = _assert_error(r, 400, None)
    assert "JSON" in err["message"]


def test_body_not_an_object(http):
    _assert_error(http.post("/v1/completions", json=["prompt"]), 400, None)
    err = _assert_error(http.post("/v1/chat/completions"), 400, None)  # no body at all
    assert "JSON object" in err["message"]
    r = http.post("/v1/chat/completions", content=b'{"messages": []}',
                  headers={"content-type": "text/plain"})
    _assert_error(r, 400, None)


def test_unknown_route_and_method(http):
    err = _assert_error(http.get("/v1/nothing"), 404, None)
    assert err["type"] == "NotFoundError"
    err = _assert_error(http.get("/v1/chat/completions"), 405, None)
    assert err["type"] == "MethodNotAllowedError"


def test_official_client_sees_field(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=MSG, max_tokens=4,
                                       extra_body={"alignment": {"strategy": "sample",
                                                                 "lookahead": 3}})
    assert e.value.body["param"] == "alignment.lookahead"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    # ... and the server still serves.
    r = client.completions.create(model=model_name, prompt="Hello", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# Strategies that fail on purpose, registered only while a test runs, to reach the paths a
# correct strategy never takes: a bug (500), an engine out of memory (503), a request that can
# never fit (400). Each must answer in the error shape and leave the server serving.


class _NoParams(StrategyParams):
    pass


def _failing(exc: Exception, after_delta: bool) -> Strategy:
    async def run(ctx) -> AsyncIterator:
        from alignserve.decoding.base import ChoiceDelta

        if after_delta:
            yield ChoiceDelta(index=0, text="partial", token_ids=[1])
        raise exc

    return Strategy(name="test_failing", description="fails on purpose", params=_NoParams,
                    run=run)


@pytest.fixture()
def failing_strategy():
    def install(exc: Exception, after_delta: bool = False) -> None:
        STRATEGIES["test_failing"] = _failing(exc, after_delta)

    yield install
    STRATEGIES.pop("test_failing", None)


@pytest.mark.parametrize(("exc", "status"), [
    (RuntimeError("boom"), 500),
    (EngineError("out of KV memory"), 503),
    (CapacityError("too big"), 400),
])
def test_failures_map_to_status(http, model_name, failing_strategy, exc, status):
    failing_strategy(exc)
    body = {"model": model_name, "prompt": "x", "max_tokens": 2,
            "alignment": {"strategy": "test_failing"}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/health").status_code == 200


def test_error_mid_stream(http, model_name, failing_strategy):
    failing_strategy(RuntimeError("boom mid-stream"), after_delta=True)
    body = {"model": model_name, "messages": MSG, "max_tokens": 2, "stream": True,
            "alignment": {"strategy": "test_failing"}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "boom mid-stream" in lines[-2]
    assert any('"partial"' in line for line in lines[:-2])


def test_error_mid_stream_raises_in_client(client, model_name, failing_strategy):
    failing_strategy(RuntimeError("boom"), after_delta=True)
    stream = client.chat.completions.create(
        model=model_name, messages=MSG, max_tokens=2, stream=True,
        extra_body={"alignment": {"strategy": "test_failing"}})
    with pytest.raises(openai.APIError):
        list(stream)
