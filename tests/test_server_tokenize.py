"""vLLM's /tokenize and /detokenize, live: a prompt counts what the matching request is
charged (`usage.prompt_tokens`), tools included, and token ids decode back to the text."""

from __future__ import annotations

import pytest

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Paris?"}]


def test_a_prompt_counts_what_completions_charge(http, client, model_name):
    text = "The three largest animals in the ocean are"
    r = http.post("/tokenize", json={"model": model_name, "prompt": text,
                                     "return_token_strs": True}).json()
    used = client.completions.create(model=model_name, prompt=text, max_tokens=1)
    assert r["count"] == len(r["tokens"]) == used.usage.prompt_tokens
    assert len(r["token_strs"]) == r["count"] and r["max_model_len"] > r["count"]
    back = http.post("/detokenize", json={"model": model_name, "tokens": r["tokens"]}).json()
    assert back == {"prompt": text}
    # the same ids as a token prompt are charged the same
    same = client.completions.create(model=model_name, prompt=r["tokens"], max_tokens=1)
    assert same.usage.prompt_tokens == r["count"]


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["plain", "tools"])
def test_messages_count_what_chat_charges(http, client, model_name, tools):
    body = {"model": model_name, "messages": MESSAGES, **({"tools": tools} if tools else {})}
    r = http.post("/tokenize", json=body).json()
    used = client.chat.completions.create(max_tokens=1, **body)
    assert r["count"] == used.usage.prompt_tokens
    if tools:  # the tools are listed in the prompt, so they cost tokens
        plain = http.post("/tokenize", json={"messages": MESSAGES}).json()
        assert r["count"] > plain["count"]


BAD = [
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, None),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"prompt": "x", "tools": TOOLS}, 400, None),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400,
     "continue_final_message"),  # the final message is the user's
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "extra": 1}, 400, "extra"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_requests(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
