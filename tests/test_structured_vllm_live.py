"""Structured outputs on real vLLM (its CPU build; the session's one `serve --engine vllm`,
tests/conftest.py: vllm_server), called with the official openai client.

vLLM holds the grammar itself (its structured outputs, xgrammar backend) and applies its
bitmask before our logits processor runs, so these fail if a request's grammar is not handed
to vLLM, or if steering (VAS's candidates, contrastive's scores, with every amateur kind)
revives a token the bitmask removed: every answer must parse and validate, ending by the stop
token. Strategies that continue partial answers in later vLLM requests are refused with a 400
naming the field (vLLM would restart the grammar mid-answer)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from structured_cases import ASK, KEYWORDS, SMALL, SMALL_FORMAT, WEATHER, WEATHER_ASK

MODEL = "SmolLM2-135M-Instruct"
MAX = 40

STRATEGIES = {
    "sample": {"strategy": "sample"},
    "best_of_n": {"strategy": "best_of_n", "candidates": 3, "rewards": [KEYWORDS]},
    "vas": {"strategy": "vas", "top_k": 5},
    "contrastive_self": {"strategy": "contrastive", "amateur": "self:8"},
    "contrastive_lame_prompt": {"strategy": "contrastive", "amateur": "lame_prompt"},
    "contrastive_served": {"strategy": "contrastive", "amateur": "small"},
}


@pytest.mark.parametrize("config", list(STRATEGIES))
def test_json_schema_on_vllm(vllm_client, config):
    r = vllm_client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=MAX, temperature=0.8, seed=3,
        response_format=SMALL_FORMAT, extra_body={"alignment": STRATEGIES[config]})
    (choice,) = r.choices
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), SMALL)


@pytest.mark.parametrize("config", ["sample", "vas"])
def test_tool_calls_on_vllm(vllm_client, config):
    with vllm_client.beta.chat.completions.stream(
            model=MODEL, messages=WEATHER_ASK, tools=[WEATHER], tool_choice="required",
            parallel_tool_calls=False, max_tokens=MAX + 16, temperature=0.8, seed=5,
            extra_body={"alignment": STRATEGIES[config]}) as stream:
        for _ in stream:
            pass
        r = stream.get_final_completion()
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_parse_and_json_object_on_vllm(vllm_client):
    class Ball(BaseModel):
        color: str = Field(max_length=10)
        size: int = Field(ge=0, le=99)

    parse = (getattr(vllm_client.chat.completions, "parse", None)
             or vllm_client.beta.chat.completions.parse)
    r = parse(model=MODEL, messages=ASK, response_format=Ball, max_tokens=MAX,
              temperature=0.7, seed=1, n=2)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Ball)
    r = vllm_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX,
                                            temperature=0.0,
                                            response_format={"type": "json_object"})
    # vLLM runs without free whitespace (disable_any_whitespace): one line, whatever the model
    # would like (a raw newline cannot stand inside a JSON string)
    content = r.choices[0].message.content
    assert isinstance(json.loads(content), dict)
    assert "\n" not in content, content


@pytest.mark.parametrize("strategy", ["deal", "speculative_rejection", "particle_filter"])
def test_resuming_strategies_are_refused_on_vllm(vllm_client, strategy):
    with pytest.raises(openai.BadRequestError) as err:
        vllm_client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=8, response_format=SMALL_FORMAT,
            extra_body={"alignment": {"strategy": strategy}})
    assert err.value.body["param"] == "response_format"
    assert "vllm" in err.value.body["message"]
