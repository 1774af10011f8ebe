"""vLLM's `continue_final_message` and `add_generation_prompt` on chat, live: a prefilled
answer is continued (the prompt ends inside it), the model's answer is the same as a raw
completion of that prompt, /tokenize counts it, and the lame-prompt amateur continues it too."""

from __future__ import annotations

import pytest

from alignserve.decoding.base import DecodeRequest
from alignserve.decoding.contrastive import lame_prompt_ids

PREFIX = "My favourite colour is"
BEGUN = [{"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": PREFIX}]


def _tokens(http, **body):
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_continue_final_message(http, client, model_name, native_engine):
    ids = _tokens(http, messages=BEGUN, continue_final_message=True)
    prefix_ids = native_engine.encode(PREFIX)
    assert ids[-len(prefix_ids):] == prefix_ids  # the prompt ends inside the begun answer
    chat = client.chat.completions.create(model=model_name, messages=BEGUN, max_tokens=12,
                                          temperature=0,
                                          extra_body={"continue_final_message": True})
    assert chat.usage.prompt_tokens == len(ids)
    raw = client.completions.create(model=model_name, prompt=ids, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == raw.choices[0].text  # only the continuation
    # without it the final message is closed and a new turn opens after it
    fresh = _tokens(http, messages=BEGUN)
    assert len(fresh) > len(ids) and fresh[:len(ids)] == ids


def test_add_generation_prompt_false(http, client, model_name):
    closed = _tokens(http, messages=BEGUN[:1], add_generation_prompt=False)
    opened = _tokens(http, messages=BEGUN[:1])
    assert opened[:len(closed)] == closed and len(opened) > len(closed)  # the turn opening
    r = client.chat.completions.create(model=model_name, messages=BEGUN[:1], max_tokens=4,
                                       extra_body={"add_generation_prompt": False})
    assert r.usage.prompt_tokens == len(closed)


def test_the_lame_prompt_continues_the_begun_answer(native_engine, model_name, client):
    req = DecodeRequest(request_id="x", prompt_ids=[1], prompt_text="", sampling=None, n=1,
                        strategy="contrastive", params=_lame_params(), reward=None,
                        messages=BEGUN, continue_final=True)
    ids = lame_prompt_ids(req, native_engine)
    expected = native_engine.encode_chat(BEGUN, add_generation_prompt=False,
                                         continue_final_message=True)[1]
    assert ids == expected
    r = client.chat.completions.create(
        model=model_name, messages=BEGUN, max_tokens=6,
        extra_body={"continue_final_message": True,
                    "alignment": {"strategy": "contrastive", "amateur": "lame_prompt"}})
    assert r.choices[0].finish_reason in ("stop", "length")


def _lame_params():
    from alignserve.decoding.base import STRATEGIES

    return STRATEGIES["contrastive"].params.model_validate({"amateur": "lame_prompt"})


BAD = [
    ({"messages": BEGUN[:1], "continue_final_message": True}, "continue_final_message"),
    ({"messages": BEGUN, "continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message"),
    ({"messages": BEGUN, "continue_final_message": True,
      "response_format": {"type": "json_object"}}, "continue_final_message"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
def test_bad_continuations(http, model_name, body, param):
    r = http.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    if "response_format" not in body:  # /tokenize refuses the same prompts
        r = http.post("/tokenize", json={k: v for k, v in body.items()})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenize_flags_go_with_messages(http):
    r = http.post("/tokenize", json={"prompt": "x", "continue_final_message": True})
    assert r.status_code == 400, r.text


def test_chat_template_kwargs(http, client, model_name):
    """vLLM's chat_template_kwargs reach the template (a template variable changes the
    prompt); SmolLM2's template reads none, so Qwen3's `enable_thinking` changes nothing here."""
    from alignserve.engine.text import TextCodec
    from tests.test_server_units import _llama_style_tokenizer

    codec = TextCodec()
    codec.tokenizer = _llama_style_tokenizer()
    codec.tokenizer.chat_template = ("{% if greeting %}hello {% endif %}"
                                     "{% for m in messages %}{{ m.content }}{% endfor %}")
    plain = codec.encode_chat([{"role": "user", "content": "world"}],
                              add_generation_prompt=False)
    greeted = codec.encode_chat([{"role": "user", "content": "world"}],
                                add_generation_prompt=False, template_kwargs={"greeting": True})
    assert (plain[1], greeted[1]) == ([4], [3, 4])
    body = {"model": model_name, "messages": BEGUN[:1], "max_tokens": 2}
    r = client.chat.completions.create(**body, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}})
    assert r.usage.prompt_tokens == len(_tokens(http, messages=BEGUN[:1], chat_template_kwargs={
        "enable_thinking": False})) == len(_tokens(http, messages=BEGUN[:1]))
    for path, payload in (("/v1/chat/completions", body), ("/tokenize", {"messages": BEGUN})):
        bad = http.post(path, json={**payload, "chat_template_kwargs": {"tokenize": True}})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == "chat_template_kwargs"
