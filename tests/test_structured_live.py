"""Structured outputs end to end: the live server, the real embedded model, the official openai
client. JSON answers (json_object, json_schema, the SDK's `.parse` with a pydantic model) and
tool calls (tool_choice none / auto / required / named, history round trips, streamed calls the
SDK reassembles) for sample and best_of_n (the other strategies: test_structured_strategies.py);
the 400s for bad schemas, limits and ignore_eos.

Every grammar-constrained answer that finishes by the stop token must parse and validate: the
grammar masks the logits last in the native sampler, so that holds by construction, and these
tests are where it could fail (a token outside the mask, a state not forked or synced)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from alignserve.rewardmodels.partial import json_prefix_ok

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON with name, age and color."}]
PERSON_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["C", "F"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# Enough tokens for every answer to finish by the stop token: the schemas bound the strings.
MAX = 96


def _valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def _check_calls(calls, tools=(WEATHER, TIME)) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


# ---------------------------------------------------------------- JSON answers

@pytest.mark.parametrize("strategy", ["sample", "best_of_n"])
def test_json_schema_answers_validate(client, model_name, strategy):
    alignment = {"strategy": strategy}
    if strategy == "best_of_n":
        alignment |= {"candidates": 3, "rewards": [{"name": "json_schema", "schema": PERSON}]}
    r = client.chat.completions.create(
        model=model_name, messages=ASK, n=3 if strategy == "sample" else 1, temperature=1.0,
        max_tokens=MAX, seed=7, response_format=PERSON_FORMAT,
        extra_body={"alignment": alignment})
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        _valid(choice.message.content, PERSON)
    if strategy == "best_of_n":
        assert r.alignment["candidates_scored"] == 3


@pytest.mark.parametrize("strategy", ["sample", "best_of_n"])
def test_json_object_streamed_validates(client, model_name, strategy):
    alignment = {"strategy": strategy}
    if strategy == "best_of_n":
        alignment |= {"candidates": 2}
    stream = client.chat.completions.create(
        model=model_name, messages=ASK, n=2, temperature=1.0, max_tokens=MAX, seed=3,
        response_format={"type": "json_object"}, stream=True,
        extra_body={"alignment": alignment})
    texts, reasons = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1]
    for i, text in texts.items():
        # At temperature 1 the small model may write an object longer than MAX tokens (which
        # one does depends on the seed and on the arithmetic): cut by the limit, the text is
        # still a prefix the grammar allowed; finished, it is a whole object.
        assert reasons[i] in ("stop", "length")
        if reasons[i] == "length":
            assert text.lstrip().startswith("{") and json_prefix_ok(text), text
        else:
            assert isinstance(_valid(text, {"type": "object"}), dict)


def test_parse_with_a_pydantic_model(client, model_name):
    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=model_name, messages=ASK, response_format=Person, max_tokens=MAX,
              temperature=0.7, seed=1)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person)
    assert r.choices[0].finish_reason == "stop"


def test_min_tokens_yields_to_a_finished_grammar(client, model_name):
    """min_tokens beyond where the grammar ends: the stop token is the only choice, and wins."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": schema}},
        extra_body={"min_tokens": 30})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(_valid(r.choices[0].message.content, schema)["ok"], bool)
    assert r.usage.completion_tokens < 30


# ---------------------------------------------------------------- tools

def test_tool_choice_required_and_named(client, model_name):
    # one call (parallel_tool_calls false): with parallel calls allowed SmolLM2-135M tends to
    # call again and again until max_tokens (finish_reason length, every whole call parsed)
    r = client.chat.completions.create(model=model_name, messages=WEATHER_ASK,
                                       tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=MAX,
                                       temperature=0.8, seed=2)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) == 1
    r = client.chat.completions.create(model=model_name, messages=WEATHER_ASK,
                                       tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=MAX, temperature=0.8, seed=2)
    choice = r.choices[0]
    _check_calls(choice.message.tool_calls)  # whole calls parse whether or not it stopped
    assert choice.finish_reason in ("tool_calls", "length")
    r = client.chat.completions.create(
        model=model_name, messages=WEATHER_ASK, tools=[WEATHER, TIME], max_tokens=MAX,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0.8)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_time"]
    assert json.loads(calls[0].function.arguments) == {}


def test_tool_choice_none_and_auto(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=WEATHER_ASK, tools=[WEATHER],
                                       tool_choice="none", max_tokens=12, temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert "<tool_call>" not in r.choices[0].message.content
    # auto: text or calls, whichever the model writes; either way the answer is well formed
    r = client.chat.completions.create(model=model_name, messages=WEATHER_ASK, tools=[WEATHER],
                                       max_tokens=MAX, temperature=0)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message.tool_calls, (WEATHER,))
    else:
        assert choice.finish_reason in ("stop", "length")
        assert "<tool_call>" not in (choice.message.content or "")


def test_tool_call_history_round_trip(client, model_name):
    first = client.chat.completions.create(model=model_name, messages=WEATHER_ASK,
                                           tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False,
                                           max_tokens=MAX, temperature=0)
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = WEATHER_ASK + [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "unit": "C"}'},
    ]
    r = client.chat.completions.create(model=model_name, messages=history, tools=[WEATHER],
                                       tool_choice="none", max_tokens=16, temperature=0)
    assert r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:  # a reply to no call
        client.chat.completions.create(
            model=model_name, max_tokens=4, tools=[WEATHER],
            messages=WEATHER_ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}])
    assert err.value.body["param"] == "messages[1].tool_call_id"


@pytest.mark.parametrize("strategy", ["sample", "best_of_n"])
def test_streamed_tool_calls_reassembled(client, model_name, strategy):
    alignment = {"strategy": strategy} | ({"candidates": 2} if strategy == "best_of_n" else {})
    with client.beta.chat.completions.stream(
            model=model_name, messages=WEATHER_ASK, tools=[WEATHER, TIME],
            tool_choice="required", parallel_tool_calls=False, max_tokens=MAX,
            temperature=0.9, seed=5,
            extra_body={"alignment": alignment}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)


def _stream_deltas(http, body: dict) -> tuple[list[dict], list[str]]:
    """A streamed chat completion's deltas and finish reasons, as sent."""
    deltas, reasons = [], []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                deltas.append(c["delta"])
                if c.get("finish_reason"):
                    reasons.append(c["finish_reason"])
    return deltas, reasons


def test_streamed_tool_call_chunks_have_openai_shape(http, model_name):
    body = {"model": model_name, "messages": WEATHER_ASK, "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": MAX, "temperature": 0, "stream": True}
    deltas, reasons = _stream_deltas(http, body)
    pieces = [p for d in deltas for p in d.get("tool_calls", [])]
    assert pieces[0]["index"] == 0 and pieces[0]["id"].startswith("call_")
    assert pieces[0]["function"]["name"] == "get_weather"
    arguments = "".join(p["function"].get("arguments", "") for p in pieces)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert reasons == ["tool_calls"]


# ---------------------------------------------------------------- the deprecated `functions`

LEGACY_WEATHER = WEATHER["function"]


def test_legacy_functions_answer_with_one_function_call(client, model_name):
    """`functions` / `function_call` (deprecated, still sent by older clients) are served as
    tools and answered in their own shape: message.function_call, finish_reason
    function_call; the reply comes back as a `function` message."""
    r = client.chat.completions.create(
        model=model_name, messages=WEATHER_ASK, functions=[LEGACY_WEATHER],
        function_call={"name": "get_weather"}, max_tokens=MAX, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "function_call", choice
    assert choice.message.tool_calls is None and choice.message.function_call is not None
    call = choice.message.function_call
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), LEGACY_WEATHER["parameters"])
    history = WEATHER_ASK + [
        {"role": "assistant", "content": None,
         "function_call": {"name": call.name, "arguments": call.arguments}},
        {"role": "function", "name": "get_weather", "content": '{"temp_c": 18, "sky": "clear"}'}]
    answer = client.chat.completions.create(model=model_name, messages=history,
                                            functions=[LEGACY_WEATHER], function_call="none",
                                            max_tokens=24, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.function_call is None and answer.choices[0].message.content


def test_legacy_function_call_streams_in_its_shape(http, model_name):
    body = {"model": model_name, "messages": WEATHER_ASK, "functions": [LEGACY_WEATHER],
            "function_call": {"name": "get_weather"}, "max_tokens": MAX, "temperature": 0,
            "stream": True}
    deltas, reasons = _stream_deltas(http, body)
    assert not any("tool_calls" in d for d in deltas)
    pieces = [d["function_call"] for d in deltas if "function_call" in d]
    assert pieces[0]["name"] == "get_weather"
    arguments = "".join(p.get("arguments", "") for p in pieces)
    jsonschema.validate(json.loads(arguments), LEGACY_WEATHER["parameters"])
    assert reasons == ["function_call"]


# ---------------------------------------------------------------- refusals

def _error(http, body: dict) -> tuple[int, dict]:
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
    return r.status_code, r.json().get("error", {})


def test_bad_schema_names_its_json_path(http):
    bad = {"type": "object", "properties": {"a": {"type": "strnig"}}}
    status, err = _error(http, {"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": bad}}})
    assert status == 400
    assert err["param"] == "response_format.json_schema.schema.properties.a.type", err
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}}}
    status, err = _error(http, {"tools": [bad_tool]})
    assert status == 400
    assert err["param"].startswith("tools[0].function.parameters.properties.n"), err


def test_refusals_name_the_field(http, live_server):
    status, err = _error(http, {"response_format": {"type": "json_object"}, "ignore_eos": True})
    assert (status, err["param"]) == (400, "ignore_eos")
    # a deprecated `functions` request is told about `functions`, the field it sent
    status, err = _error(http, {"functions": [{"name": "f"}], "stop": ["x"]})
    assert (status, err["param"]) == (400, "stop") and "`functions`" in err["message"], err
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 60}
                                            for i in range(live_server.settings.max_grammar_bytes
                                                           // 60 + 1)}}
    status, err = _error(http, {"response_format": {
        "type": "json_schema", "json_schema": {"name": "big", "schema": big}}})
    assert status == 400 and "--max-grammar-bytes" in err["message"], err


def test_limits_listed(http):
    limits = http.get("/v1/alignment").json()["limits"]
    for key in ("max_grammar_bytes", "grammar_compile_timeout_s", "grammar_cache_entries"):
        assert limits[key] > 0


def test_json_on_completions(client, model_name):
    r = client.completions.create(model=model_name, prompt="A person as JSON: ", max_tokens=MAX,
                                  temperature=0.8, seed=4, n=2,
                                  extra_body={"response_format": PERSON_FORMAT})
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        _valid(choice.text, PERSON)
