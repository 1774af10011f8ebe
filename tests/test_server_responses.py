"""POST /v1/responses, live, with the official `openai` client: the same answer as the chat
request it stands for, OpenAI's shapes (output items, usage, typed stream events the SDK's own
stream helper assembles), structured outputs and function tools, the `alignment` extension,
and errors that name the Responses field."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from pydantic import BaseModel

from alignserve.server.errors import APIError
from alignserve.server.protocol import ResponsesRequest
from alignserve.server.responses import responses_error, to_chat_request
from tests.test_server_disconnect import _aborts, _wait_idle

QUESTION = "Name three animals that live in the ocean."
INSTRUCTIONS = "Answer in one short sentence."
WEATHER = [{"type": "function", "name": "get_weather", "description": "Today's weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}]


def _chat(client, model_name, messages, **kw):
    return client.chat.completions.create(model=model_name, messages=messages, **kw)


# ---------------------------------------------------------------- the request, as chat


def test_translation_to_chat():
    req = ResponsesRequest.model_validate_json(json.dumps({
        "instructions": "Be brief.", "max_output_tokens": 9, "top_logprobs": 2,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                  {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                   "content": [{"type": "output_text", "text": "Let me look.",
                                "annotations": []}]},
                  {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                  {"type": "function_call", "call_id": "b", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "a", "output": "sun"},
                  {"type": "function_call_output", "call_id": "b", "output": "rain"}],
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"}}))
    chat = to_chat_request(req)
    roles = [m.role for m in chat.messages]
    # instructions first; parallel calls are one assistant turn; one tool message per output
    assert roles == ["system", "user", "assistant", "tool", "tool"], roles
    # the text before the calls and the calls are one assistant turn, as chat has them
    assert chat.messages[2].content == "Let me look."
    assert [c.id for c in chat.messages[2].tool_calls] == ["a", "b"]
    assert [(m.tool_call_id, m.content) for m in chat.messages[3:]] == [("a", "sun"),
                                                                        ("b", "rain")]
    assert chat.max_completion_tokens == 9 and chat.logprobs and chat.top_logprobs == 2
    assert chat.response_format.json_schema.name == "w"
    assert chat.tools[0].function.name == "f" and chat.tool_choice.function.name == "f"


def test_errors_name_the_responses_fields():
    err = responses_error(APIError("max_completion_tokens is 9000; at most 4096 "
                                   "(--max-tokens-limit).", param="max_completion_tokens"))
    assert (err.param, err.message) == (
        "max_output_tokens", "max_output_tokens is 9000; at most 4096 (--max-tokens-limit).")
    err = responses_error(APIError("response_format.json_schema.schema.type: bad",
                                   param="response_format.json_schema.schema.type"))
    assert err.param == "text.format.schema.type" and err.message.startswith("text.format.")
    err = responses_error(APIError("The prompt is too long: shorten `messages`.",
                                   param="messages[2].content"))
    assert err.param == "input" and "`input`" in err.message
    assert responses_error(APIError("x", param="temperature")).param == "temperature"


# ---------------------------------------------------------------- whole answers


def test_same_answer_as_chat(client, model_name):
    """A Responses request is its chat request: same seed, same text, same token counts."""
    r = client.responses.create(model=model_name, input=QUESTION, instructions=INSTRUCTIONS,
                                max_output_tokens=24, temperature=0.8, extra_body={"seed": 11})
    c = _chat(client, model_name, [{"role": "system", "content": INSTRUCTIONS},
                                   {"role": "user", "content": QUESTION}],
              max_completion_tokens=24, temperature=0.8, seed=11)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.usage.output_tokens == c.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    finished = c.choices[0].finish_reason
    assert r.status == ("incomplete" if finished == "length" else "completed")
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == r.status
    assert r.store is False and r.instructions == INSTRUCTIONS


def test_cut_short_is_incomplete(client, model_name):
    r = client.responses.create(model=model_name, input=QUESTION, max_output_tokens=3,
                                metadata={"team": "a"}, store=True, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    assert r.metadata == {"team": "a"} and r.store is False  # nothing is stored


def test_logprobs_when_included(client, model_name):
    r = client.responses.create(model=model_name, input=QUESTION, max_output_tokens=5,
                                include=["message.output_text.logprobs"], top_logprobs=3,
                                temperature=0)
    entries = r.output[0].content[0].logprobs
    assert len(entries) == r.usage.output_tokens == 5
    # a token may hold part of a character (its `token` text is then U+FFFD): join the bytes
    assert bytes(b for e in entries for b in e.bytes).decode() == r.output_text
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-4  # the best is at least the pick
    plain = client.responses.create(model=model_name, input=QUESTION, max_output_tokens=5)
    assert plain.output[0].content[0].logprobs is None


def test_alignment_extension(client, model_name):
    words = ["whale", "shark"]
    r = client.responses.create(
        model=model_name, input=QUESTION, max_output_tokens=20, extra_body={
            "seed": 5, "alignment": {"strategy": "best_of_n", "candidates": 4, "rewards": [
                {"name": "keywords", "keywords": words}]}})
    report = r.model_extra["alignment"]
    assert report["strategy"] == "best_of_n" and report["candidates_scored"] == 4
    # keywords counts whole words, case-insensitively, no stemming
    covered = sum(bool(re.search(rf"(?<!\w){w}(?!\w)", r.output_text, re.IGNORECASE))
                  for w in words) / len(words)
    assert report["components"]["keywords"] == pytest.approx(covered)
    assert report["model_tokens"] >= r.usage.output_tokens


# ---------------------------------------------------------------- streams


def test_stream_events(client, model_name):
    kw = {"model": model_name, "input": QUESTION, "max_output_tokens": 16,
          "extra_body": {"seed": 3}}
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    last = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", last]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == whole.output_text == final.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.model_extra["alignment"]["strategy"] == "sample"
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}


def test_sdk_stream_helper_assembles_the_answer(client, model_name):
    with client.responses.stream(model=model_name, input="Say hello.", max_output_tokens=400,
                                 temperature=0) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()  # needs response.completed, as from OpenAI
    assert final.status == "completed" and final.output_text == deltas and deltas


# ---------------------------------------------------------------- structured outputs and tools


class Animal(BaseModel):
    name: str
    legs: int


def test_text_format_json_schema(client, model_name):
    r = client.responses.parse(model=model_name, input="Describe an animal as JSON.",
                               text_format=Animal, max_output_tokens=200, temperature=0)
    assert r.status == "completed", r.output_text
    assert isinstance(r.output_parsed, Animal)
    assert r.text.format.type == "json_schema"


def test_function_call_round_trip(client, model_name):
    first = client.responses.create(model=model_name, input="What is the weather in Paris?",
                                    tools=WEATHER, tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=60,
                                    temperature=0)
    calls = [o for o in first.output if o.type == "function_call"]
    assert first.status == "completed" and len(calls) == 1, first.output
    call = calls[0]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    assert call.id.startswith("fc_") and call.call_id
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               *[o.model_dump(exclude_none=True) for o in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]
    second = client.responses.create(model=model_name, input=history, tools=WEATHER,
                                     max_output_tokens=12, temperature=0)
    # the same conversation as chat messages gives the same answer
    chat = _chat(client, model_name, [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER[0].items()
                                                 if k != "type"}}],
        max_completion_tokens=12, temperature=0)
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == (chat.choices[0].message.content or "")


def test_function_call_stream(client, model_name):
    with client.responses.stream(model=model_name, input="What is the weather in Rome?",
                                 tools=WEATHER, tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=60,
                                 temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-4:] == ["response.function_call_arguments.delta",
                          "response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"], kinds
    (call,) = final.output
    assert call.type == "function_call" and "city" in json.loads(call.arguments)


# ---------------------------------------------------------------- errors and cancellation

BAD = [
    ({"max_output_tokens": 10**6}, "max_output_tokens", "--max-tokens-limit"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
    ({"background": True}, "background", "foreground"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content", "text-only"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]", "function_call_output"),
    ({"input": []}, "input", "at least 1"),
    ({"input": 5}, "input", "string or a list"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "function"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "intgr"}}}},
     "text.format.schema.type", "not a valid JSON schema"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format", "needs `name`"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"alignment": {"strategy": "nope"}}, "alignment.strategy", "offers"),
    ({"n": 2}, "n", "Unknown field"),
]


@pytest.mark.parametrize(("extra", "param", "says"), BAD, ids=[b[1] for b in BAD])
def test_bad_requests(http, model_name, extra, param, says):
    body = {"model": model_name, "input": "hi", "max_output_tokens": 4, **extra}
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_client_that_leaves_cancels(live_server, http, model_name):
    kv = _wait_idle(live_server.engine)
    aborts = _aborts(http)
    body = {"model": model_name, "input": "Write a very long story about the sea.",
            "max_output_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=live_server.base_url, timeout=60) as c, \
            c.stream("POST", "/v1/responses", json=body) as r:
        lines = r.iter_lines()
        while "response.output_text.delta" not in next(lines):
            pass
        assert live_server.engine.stats().running_sequences == 1
    _wait_idle(live_server.engine, kv)
    assert _aborts(http) == aborts + 1
    assert openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="x").responses.create(
        model=model_name, input="hi", max_output_tokens=2).usage.output_tokens == 2


def test_chat_media_parts_are_named(http, model_name):
    """The same clear refusal on chat, where pydantic would say "should be a valid string"."""
    body = {"model": model_name, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}
    error = http.post("/v1/chat/completions", json=body).json()["error"]
    assert error["param"] == "messages[0].content", error
    assert "`image_url` is not supported" in error["message"] and "text-only" in error["message"]


def test_nothing_is_stored(client, model_name):
    r = client.responses.create(model=model_name, input="hi", max_output_tokens=2, store=True)
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id),
                 lambda: client.responses.cancel(r.id)):
        with pytest.raises(openai.NotFoundError, match="stores no responses"):
            call()


def test_stream_error_after_start_is_an_error_event(live_server, model_name):
    """A deadline that passes mid-stream: OpenAI's `error` event, then response.failed with
    what was said so far, and the decode is freed."""
    from tests.test_hardening import side_server

    kv = _wait_idle(live_server.engine)
    body = {"model": model_name, "input": "Write a very long story about the sea.",
            "max_output_tokens": 2000, "temperature": 0, "stream": True}
    with side_server(live_server, request_timeout=1.0) as app, \
            httpx.Client(base_url=app.state.base_url, timeout=60) as c, \
            c.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[len("data: "):]) for line in lines]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    error, failed = events[-2:]
    assert error["type"] == "error" and error["code"] == "408", error
    assert "--request-timeout" in error["message"]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "408"
    said = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    (cut,) = failed["response"]["output"]  # the message cut short, with what was said
    assert said and cut["status"] == "incomplete" and cut["content"][0]["text"] == said
    _wait_idle(live_server.engine, kv)
