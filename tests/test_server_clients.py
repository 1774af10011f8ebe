"""Real clients our users use, live against the server: LangChain (`langchain-openai`'s
ChatOpenAI and OpenAI) and LiteLLM, each through chat, streaming, batches and `extra_body`
alignment, and both on the Responses API. Nothing may leave loopback: LiteLLM is told to use its bundled model cost map, and a
guard fails the test on any connection or name lookup that is not for 127.0.0.1/localhost.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

# Before litellm is imported: its cost map from the package, not from GitHub; no telemetry.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ALIGN = {"alignment": {"strategy": "best_of_n", "candidates": 2,
                       "rewards": [{"name": "length", "target_words": 4}]}}
QUESTION = "Name one animal of the sea."


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse (and record) every name lookup and connection that is not loopback."""
    outside: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        if host not in LOOPBACK and host is not None:
            outside.append(str(host))
            raise OSError(f"test: no network beyond loopback ({host})")
        return real_getaddrinfo(host, *args, **kw)

    def connect(self: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            outside.append(str(address[0]))
            raise OSError(f"test: no network beyond loopback ({address[0]})")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield outside
    assert not outside, f"a client tried to reach {outside}"


# ---------------------------------------------------------------------------- LangChain


def _completions_served(base_url: str) -> float:
    """200s the server has answered on /v1/completions (its own metric)."""
    import httpx

    text = httpx.get(base_url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if (line.startswith("alignserve_http_requests_total{")
                and 'route="/v1/completions"' in line and 'status="200"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_langchain_chat_stream_batch_and_alignment(live_server, model_name, loopback_only):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=live_server.base_url + "/v1", api_key="unused",
                      model=model_name, max_tokens=6, temperature=0, max_retries=0)
    reply = chat.invoke(QUESTION)
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    streamed = "".join(str(chunk.content) for chunk in chat.stream(QUESTION))
    assert streamed == reply.content  # greedy: the stream is the same text
    batch = chat.batch([QUESTION, "Name one bird."])
    assert len(batch) == 2 and all(m.content for m in batch)
    aligned = ChatOpenAI(base_url=live_server.base_url + "/v1", api_key="unused",
                         model=model_name, max_tokens=6, max_retries=0,
                         extra_body=ALIGN).invoke(QUESTION)
    assert aligned.content


def test_langchain_completions_batch_sends_a_prompt_list(live_server, model_name, loopback_only,
                                                          exact_engine):
    """LangChain's OpenAI LLM batches prompts into one /v1/completions request (a list of
    prompts): each answer is that prompt's own. In exact fp32 (`exact_engine`): a lone
    sequence's attention takes another path than a batch's (attention.DecodePlan's window),
    and with bf16 linears that rounding difference can flip a near-tie between greedy tokens."""
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", model=model_name,
                 max_tokens=5, temperature=0, max_retries=0)
    prompts = ["The ocean is", "The desert is", "The forest is"]
    before = _completions_served(live_server.base_url)
    batch = llm.batch(prompts)
    assert _completions_served(live_server.base_url) == before + 1  # one request, three prompts
    assert len(batch) == 3
    alone = [llm.invoke(p) for p in prompts]
    assert batch == alone  # greedy: choice i is prompt i's
    aligned = OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", model=model_name,
                     max_tokens=5, max_retries=0, extra_body=ALIGN).invoke("The ocean is")
    assert isinstance(aligned, str)


# ---------------------------------------------------------------------------- LiteLLM


def test_litellm_chat_stream_batch_and_alignment(live_server, model_name, loopback_only):
    import litellm

    litellm.telemetry = False
    kw = {"model": "openai/" + model_name, "api_base": live_server.base_url + "/v1",
          "api_key": "unused", "max_tokens": 6, "temperature": 0}
    messages = [{"role": "user", "content": QUESTION}]
    reply = litellm.completion(messages=messages, **kw)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens > 0
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in litellm.completion(messages=messages, stream=True, **kw))
    assert streamed == text
    batch = litellm.batch_completion(messages=[messages, [{"role": "user",
                                                           "content": "Name one bird."}]], **kw)
    assert len(batch) == 2 and batch[0].choices[0].message.content == text
    aligned = litellm.completion(messages=messages, extra_body=ALIGN,
                                 **{**kw, "temperature": 1.0})
    assert aligned.choices[0].message.content
    # the server's alignment report travels back through LiteLLM's response object
    report = getattr(aligned, "alignment", None) or aligned.model_extra.get("alignment")
    assert report["strategy"] == "best_of_n" and report["candidates_scored"] == 2


# ---------------------------------------------------------------------------- Responses API


def test_langchain_and_litellm_on_the_responses_api(live_server, model_name, loopback_only):
    """LangChain's ChatOpenAI with `use_responses_api=True` (invoke, stream, a tool call and
    its result sent back) and LiteLLM's `responses()`, against POST /v1/responses."""
    import litellm
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    def chat(**kw: Any) -> Any:
        return ChatOpenAI(base_url=live_server.base_url + "/v1", api_key="unused",
                          model=model_name, temperature=0, max_retries=0,
                          use_responses_api=True, **kw)

    reply = chat(max_tokens=8).invoke(QUESTION)
    text = "".join(block["text"] for block in reply.content if block["type"] == "text")
    assert text and reply.usage_metadata["output_tokens"] <= 8
    streamed = "".join(block.get("text", "") for chunk in chat(max_tokens=8).stream(QUESTION)
                       for block in chunk.content)
    assert streamed == text  # greedy: the stream is the same text

    @tool
    def get_weather(city: str) -> str:
        """Today's weather in a city."""
        return "sunny"

    bound = chat(max_tokens=60).bind_tools([get_weather], tool_choice="get_weather",
                                           parallel_tool_calls=False)
    called = bound.invoke("What is the weather in Paris?")
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    after = chat(max_tokens=8).bind_tools([get_weather]).invoke([
        HumanMessage("What is the weather in Paris?"), called,
        ToolMessage("sunny", tool_call_id=call["id"])])
    assert after.response_metadata["status"] in ("completed", "incomplete")

    litellm.telemetry = False
    # (LiteLLM raises max_output_tokens to OpenAI's minimum, 16)
    r = litellm.responses(model="openai/" + model_name, input="Name one bird.",
                          api_base=live_server.base_url + "/v1", api_key="unused",
                          max_output_tokens=16, temperature=0)
    assert r.output[0].content[0].text and r.usage.output_tokens <= 16
