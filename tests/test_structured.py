"""server/structured.py: OpenAI's response_format / tools / tool_choice into a GrammarSpec, the
400s that name the field or JSON path, tools and tool-call history in SmolLM2's chat prompt
(its real template), and finished texts parsed back into tool calls."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from alignserve.engine.grammar import (
    GrammarError,
    GrammarLimitError,
    GrammarSpec,
    TokenizerGrammars,
    mask_logits,
)
from alignserve.server.errors import APIError
from alignserve.server.structured import (
    LEGACY,
    NamedToolChoice,
    ResponseFormat,
    ToolChatMessage,
    ToolDefinition,
    api_error,
    grammar_spec_for,
    parse_tool_calls,
    render_messages,
    render_tool_calls,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def tools(*items) -> list[ToolDefinition]:
    return [ToolDefinition.model_validate(t) for t in items]


def fmt(value) -> ResponseFormat:
    return ResponseFormat.model_validate(value)


def choice(name: str) -> NamedToolChoice:
    return NamedToolChoice.model_validate({"type": "function", "function": {"name": name}})


def error(fn, *args) -> APIError:
    with pytest.raises(APIError) as err:
        fn(*args)
    return err.value


# ---------------------------------------------------------------------------- response_format


def test_response_formats_map_to_specs():
    assert grammar_spec_for(None, None, None, None) is None
    assert grammar_spec_for(fmt({"type": "text"}), None, None, None) is None
    assert grammar_spec_for(fmt({"type": "json_object"}), None, None, None) == GrammarSpec(
        response="json_object")
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {}}}
    spec = grammar_spec_for(fmt({"type": "json_schema", "json_schema": {
        "name": "thing", "schema": schema, "strict": True, "description": "d"}}), None, None, None)
    assert spec.kind == "json_schema" and spec.strict is True
    assert spec.schema == '{"type":"object","properties":{"b":{"type":"integer"},"a":{}}}'
    anything = grammar_spec_for(fmt({"type": "json_schema", "json_schema": {"name": "x"}}),
                                None, None, None)
    assert anything.schema == "{}"  # no schema: any JSON value


@pytest.mark.parametrize("body, where", [
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_object", "json_schema": {"name": "x"}}, "json_schema"),
    ({"type": "xml"}, "type"),
    ({"type": "json_schema", "json_schema": {"name": "has space"}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}, "extra"),
])
def test_malformed_response_formats_are_refused(body, where):
    with pytest.raises(ValidationError) as err:
        fmt(body)
    assert where in str(err.value)


def test_bad_schemas_name_their_json_path():
    body = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}}}}
    err = error(grammar_spec_for, fmt(body), None, None, None)
    assert err.status == 400
    assert err.param == "response_format.json_schema.schema.properties.n.multipleOf"
    assert "multipleOf" in err.message
    body["json_schema"]["schema"] = {"type": "object", "properties": {"n": {"type": "nope"}}}
    err = error(grammar_spec_for, fmt(body), None, None, None)
    assert err.param == "response_format.json_schema.schema.properties.n.type"


def test_engine_side_errors_land_on_the_wire_path():
    err = api_error(GrammarError("bad", ("tools", 2, "parameters", "properties", "x")))
    assert err.param == "tools[2].function.parameters.properties.x"
    err = api_error(GrammarError("bad", ("schema", "items")))
    assert err.param == "response_format.json_schema.schema.items"
    err = api_error(GrammarLimitError("too big", "max_grammar_bytes"))
    assert err.param is None and "--max-grammar-bytes" in err.message
    # a deprecated `functions` request hears of its functions as it spelled them
    err = api_error(GrammarError("bad", ("tools", 2, "parameters", "properties", "x")), LEGACY)
    assert err.param == "functions[2].parameters.properties.x"
    assert err.message.startswith("functions[2].parameters.properties.x: ")


# ---------------------------------------------------------------------------- tools


def test_tool_choices_map_to_modes():
    auto = grammar_spec_for(None, tools(WEATHER, TIME), None, None)
    assert auto.tool_mode == "auto" and [t.name for t in auto.tools] == ["get_weather", "get_time"]
    assert json.loads(auto.tools[1].parameters) == {"type": "object", "properties": {}}
    required = grammar_spec_for(None, tools(WEATHER, TIME), "required", False)
    assert required.tool_mode == "required" and not required.parallel
    named = grammar_spec_for(None, tools(WEATHER, TIME), choice("get_time"), True)
    assert named.tool_mode == "required" and [t.name for t in named.tools] == ["get_time"]
    assert not named.parallel  # a named choice is one call of that function
    assert grammar_spec_for(None, tools(WEATHER), "none", None) is None
    with_json = grammar_spec_for(fmt({"type": "json_object"}), tools(WEATHER), "none", None)
    assert with_json == GrammarSpec(response="json_object")
    both = grammar_spec_for(fmt({"type": "json_object"}), tools(WEATHER), "auto", None)
    assert both.kind == "tools" and both.response == "json_object"


def test_tool_errors_name_the_field():
    assert error(grammar_spec_for, None, None, "auto", None).param == "tool_choice"
    err = error(grammar_spec_for, None, tools(WEATHER), choice("nope"), None)
    assert err.param == "tool_choice.function.name" and "get_weather" in err.message
    err = error(grammar_spec_for, None, tools(WEATHER, TIME, WEATHER), None, None)
    assert err.param == "tools[2].function.name"
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {}}}}}}
    err = error(grammar_spec_for, None, tools(TIME, bad), None, None)
    assert err.param == "tools[1].function.parameters.properties.a.not"
    # the same mistakes in a deprecated `functions` request, named as it spelled them
    err = error(grammar_spec_for, None, tools(TIME, bad), None, None, LEGACY)
    assert err.param == "functions[1].parameters.properties.a.not"
    err = error(grammar_spec_for, None, tools(WEATHER, TIME, WEATHER), None, None, LEGACY)
    assert (err.param, err.message) == ("functions[2].name",
                                        "Two functions are named `get_weather`.")
    err = error(grammar_spec_for, None, tools(WEATHER), choice("nope"), None, LEGACY)
    assert err.param == "function_call.name" and "not among the functions" in err.message
    with pytest.raises(ValidationError):
        ToolDefinition.model_validate({"type": "retrieval", "function": {"name": "f"}})
    with pytest.raises(ValidationError):
        ToolDefinition.model_validate({"type": "function", "function": {"name": "f g"}})


# ---------------------------------------------------------------------------- messages and prompt


HISTORY = [
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "10:00"}]},
]


def messages(items) -> list[ToolChatMessage]:
    return [ToolChatMessage.model_validate(m) for m in items]


@pytest.mark.parametrize("bad", [
    {"role": "user", "content": "x", "tool_calls": []},
    {"role": "tool", "content": "x"},
    {"role": "user", "content": "x", "tool_call_id": "c"},
    {"role": "assistant", "content": None},
    {"role": "function", "content": "x"},
])
def test_message_fields_belong_to_their_role(bad):
    with pytest.raises(ValidationError):
        ToolChatMessage.model_validate(bad)


def test_history_renders_into_the_real_chat_template(native_engine):
    spec = grammar_spec_for(None, tools(WEATHER, TIME), None, None)
    rendered = render_messages(messages(HISTORY), tools(WEATHER, TIME), spec)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user", "user"]
    system = rendered[0]["content"]
    assert "<tools>" in system and '"name": "get_weather"' in system and "maxLength" in system
    assert rendered[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert rendered[3]["content"] == (
        '<tool_response>\n{"name": "get_weather", "content": "18 C, sunny"}\n</tool_response>')
    text, ids = native_engine.encode_chat(rendered)
    assert text.startswith("<|im_start|>system\nYou can call functions")
    assert "You are a helpful AI assistant named SmolLM" not in text  # ours replaces the default
    assert text.endswith("<|im_start|>assistant\n") and len(ids) > 100
    # a client's own system message keeps its place, the tools follow it
    own = render_messages(messages([{"role": "developer", "content": "Be brief."}] + HISTORY[:1]),
                          tools(WEATHER), spec)
    assert own[0]["content"].startswith("Be brief.\n\nYou can call functions")


def test_no_tools_in_the_prompt_when_the_choice_is_none():
    rendered = render_messages(messages(HISTORY[:1]), tools(WEATHER), None)
    assert rendered == [{"role": "user", "content": "Weather in Paris and the time?"}]
    named = grammar_spec_for(None, tools(WEATHER, TIME), choice("get_time"), None)
    system = render_messages(messages(HISTORY[:1]), tools(WEATHER, TIME), named)[0]["content"]
    assert system.endswith("You must call get_time now.")


def test_history_errors_name_the_message():
    bad_args = [HISTORY[0], {**HISTORY[1], "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{oops"}}]}]
    err = error(render_messages, messages(bad_args), None, None)
    assert err.param == "messages[1].tool_calls[0].function.arguments"
    orphan = [HISTORY[0], {"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    assert error(render_messages, messages(orphan), None, None).param == "messages[1].tool_call_id"


# ---------------------------------------------------------------------------- parsing answers


def counter():
    n = iter(range(100))
    return lambda: f"call_{next(n)}"


def test_rendered_calls_parse_back():
    calls = messages(HISTORY)[1].tool_calls
    text = render_tool_calls(calls, "messages[1]")
    parsed = parse_tool_calls(text, ["get_weather", "get_time"], counter())
    assert parsed.content is None and parsed.finish_reason("stop") == "tool_calls"
    assert [(c.id, c.function["name"], json.loads(c.function["arguments"]))
            for c in parsed.tool_calls] == [("call_0", "get_weather", {"city": "Paris"}),
                                            ("call_1", "get_time", {})]


def test_text_around_calls_is_content_and_bad_blocks_stay_text():
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    parsed = parse_tool_calls(f"Let me check.\n{call}", ["get_time"], counter())
    assert parsed.content == "Let me check." and len(parsed.tool_calls) == 1
    assert parsed.finish_reason("length") == "length"  # cut off: not a finished call
    for text in ('<tool_call>\n{"name": "get_time", "arguments": {}}',  # never closed
                 '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',  # unknown
                 '<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>',
                 '<tool_call>\nnot json\n</tool_call>'):
        parsed = parse_tool_calls(text, ["get_time"], counter())
        assert parsed.tool_calls == [] and parsed.content == text.strip()
        assert parsed.finish_reason("stop") == "stop"
    plain = parse_tool_calls("Just words.", ["get_time"])
    assert plain.content == "Just words." and plain.tool_calls == []
    tricky = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": '
                              '{"note": "</tool_call>"}}\n</tool_call>', ["get_time"], counter())
    assert json.loads(tricky.tool_calls[0].function["arguments"]) == {"note": "</tool_call>"}


def test_grammar_sampled_calls_always_parse(native_engine):
    """Whatever the tools grammar lets out (random logits through the mask), the parser reads
    back as calls of the allowed tools whose arguments are the schema's."""
    import jsonschema

    spec = grammar_spec_for(None, tools(WEATHER, TIME), "required", True)
    tok, vocab = native_engine.tokenizer, native_engine.vocab_size
    grammars = TokenizerGrammars(tok, vocab)
    compiled = grammars.compile(spec)
    gen = torch.Generator().manual_seed(1)
    try:
        for _ in range(6):
            state, out = compiled.new_state(), []
            while not state.terminated and len(out) < 300:
                logits = mask_logits([state], torch.randn(1, vocab, generator=gen) * 3)
                token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
                state.accept(token)
                out.append(token)
            assert state.terminated
            parsed = parse_tool_calls(tok.decode(out[:-1]), ["get_weather", "get_time"])
            assert parsed.content is None and parsed.tool_calls
            for call in parsed.tool_calls:
                args = json.loads(call.function["arguments"])
                if call.function["name"] == "get_weather":
                    jsonschema.validate(args, WEATHER["function"]["parameters"])
                else:
                    assert args == {}
    finally:
        grammars.close()


def test_the_openai_sdk_parse_format_compiles_and_round_trips(native_engine):
    """What `client.chat.completions.parse(response_format=Model)` sends (the SDK's own
    conversion of a pydantic model: $defs/$ref, anyOf with null, enums, strict) passes our
    checks, compiles, and the grammar lets the model's own JSON of an instance through."""
    from typing import Literal

    from openai.lib._parsing._completions import type_to_response_format_param
    from pydantic import BaseModel

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        name: str

    class Person(BaseModel):
        name: str
        age: int
        pets: list[Pet]
        nick: str | None

    wire = type_to_response_format_param(Person)
    spec = grammar_spec_for(fmt(wire), None, None, None)
    assert spec.strict is True
    grammars = TokenizerGrammars(native_engine.tokenizer, native_engine.vocab_size)
    try:
        state = grammars.compile(spec).new_state()
        person = Person(name="Ada", age=36, pets=[Pet(kind="cat", name="Tom")], nick=None)
        text = json.dumps(person.model_dump())
        tok = native_engine.tokenizer
        for token in tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]:
            state.accept(token)
        assert state.terminated
        assert Person.model_validate_json(text) == person
    finally:
        grammars.close()
