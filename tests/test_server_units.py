"""Server pieces that need no live server: settings and CLI flags, schema conversion, errors."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from pydantic import ValidationError

from alignserve.cli import build_parser
from alignserve.server.errors import dotted_param, validation_error
from alignserve.server.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from alignserve.server.settings import ServerSettings, add_arguments, from_args


def _settings(argv: list[str]) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv))


def test_settings_defaults_and_flags():
    s = _settings([])
    assert s == ServerSettings()
    s = _settings(["--port", "9001", "--max-n", "4", "--reward-model", "rm=/tmp/rm",
                   "--reward-model", "b=/x", "--kv-cache-gib", "0.5", "--device", "cuda"])
    assert (s.port, s.max_n, s.kv_cache_gib, s.device) == (9001, 4, 0.5, "cuda")
    assert s.reward_model_pairs() == [("rm", "/tmp/rm"), ("b", "/x")]


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("ALIGNSERVE_PORT", "7777")
    monkeypatch.setenv("ALIGNSERVE_SERVED_MODEL_NAME", "smol")
    monkeypatch.setenv("ALIGNSERVE_REWARD_MODELS", "a=/p")
    s = _settings(["--reward-model", "b=/q"])
    assert s.port == 7777 and s.served_model_name == "smol"
    assert s.reward_model_pairs() == [("a", "/p"), ("b", "/q")]
    assert _settings(["--port", "1"]).port == 1  # a flag beats the environment


def test_bad_reward_model_flag():
    with pytest.raises(ValueError, match="NAME=PATH"):
        _settings(["--reward-model", "nopath"]).reward_model_pairs()


def test_cli_has_serve():
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "1234"])
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 1234
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--device", "tpu"])


def test_chat_to_sampling_params():
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}]}],
        "temperature": 0, "top_k": -1, "stop": "END", "logprobs": True, "top_logprobs": 2,
        "max_tokens": 5, "max_completion_tokens": 7, "seed": 3, "stop_token_ids": [9]})
    assert req.template_messages() == [{"role": "system", "content": "a\nb"}]
    assert req.requested_max_tokens() == 7
    p = req.to_sampling_params(7)
    assert p.greedy and p.top_k == 0 and p.stop == ("END",) and p.logprobs == 2
    assert p.seed == 3 and p.stop_token_ids == (9,) and p.max_tokens == 7
    assert ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}]}).to_sampling_params(4).logprobs is None


def test_completion_to_sampling_params_and_prompts():
    req = CompletionRequest.model_validate({"prompt": ["one"], "logprobs": 0, "top_p": 0.5})
    assert req.prompt_values() == ["one"]
    p = req.to_sampling_params(16)
    assert p.logprobs == 0 and p.top_p == 0.5 and p.temperature == 1.0
    assert p.prompt_logprobs is None  # without echo the prompt is not scored
    assert CompletionRequest.model_validate({"prompt": [[1, 2]]}).prompt_values() == [[1, 2]]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompt_values() == [[1, 2]]
    assert CompletionRequest.model_validate(
        {"prompt": ["a", "b"]}).prompt_values() == ["a", "b"]
    assert CompletionRequest.model_validate(
        {"prompt": [[1], [2, 3]]}).prompt_values() == [[1], [2, 3]]
    echo = CompletionRequest.model_validate({"prompt": "x", "echo": True, "logprobs": 2,
                                             "max_tokens": 0})
    assert echo.to_sampling_params(0).prompt_logprobs == 2


def _openai_fields(typed_dict: type) -> set[str]:
    """Every field a TypedDict of the installed openai package declares, its bases' too."""
    names: set[str] = set()
    for cls in typed_dict.__mro__:
        names |= set(getattr(cls, "__annotations__", {}))
    return names


def test_every_openai_request_field_is_known():
    """The installed official client is the spec: every request field it can send is a field
    of our models (honoured or accepted and ignored), never "unknown"."""
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat

    ours_chat = set(ChatCompletionRequest.model_fields)
    ours_completions = set(CompletionRequest.model_fields)
    for params in (chat.CompletionCreateParamsNonStreaming, chat.CompletionCreateParamsStreaming):
        missing = _openai_fields(params) - ours_chat
        assert not missing, f"chat fields unknown here: {sorted(missing)}"
    for params in (completions.CompletionCreateParamsNonStreaming,
                   completions.CompletionCreateParamsStreaming):
        missing = _openai_fields(params) - ours_completions
        assert not missing, f"completions fields unknown here: {sorted(missing)}"
    from openai.types.responses import response_create_params as responses

    for params in (responses.ResponseCreateParamsNonStreaming,
                   responses.ResponseCreateParamsStreaming):
        missing = _openai_fields(params) - set(ResponsesRequest.model_fields)
        assert not missing, f"responses fields unknown here: {sorted(missing)}"


def test_null_means_the_default():
    nulls = {"n": None, "stream": None, "stop": None, "seed": None, "temperature": None,
             "top_p": None, "presence_penalty": None, "frequency_penalty": None,
             "logit_bias": None, "user": None, "stream_options": None, "min_tokens": None,
             "ignore_eos": None}
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "logprobs": None,
         "top_logprobs": None, "max_completion_tokens": None, **nulls})
    assert chat.n == 1 and chat.stream is False and chat.logprobs is False
    assert chat.logprobs_k() is None and chat.min_tokens == 0
    completion = CompletionRequest.model_validate({"prompt": "x", "echo": None,
                                                   "logprobs": None, **nulls})
    assert completion.n == 1 and completion.echo is False
    p = completion.to_sampling_params(4)
    assert p.temperature == 1.0 and p.stop == () and p.seed is None and not p.logit_bias


def test_seed_is_a_signed_64_bit_integer():
    msg = [{"role": "user", "content": "x"}]
    for seed in (-(2**63), 2**63 - 1):
        assert ChatCompletionRequest.model_validate({"messages": msg, "seed": seed}).seed == seed
    for seed in (2**63, -(2**63) - 1):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"messages": msg, "seed": seed})


def test_logit_bias_range_and_keys():
    msg = [{"role": "user", "content": "x"}]
    req = ChatCompletionRequest.model_validate(
        {"messages": msg, "logit_bias": {"5": 100, "7": -100, "9": 0}})
    assert req.to_sampling_params(4).logit_bias == {5: 100.0, 7: -100.0}  # 0 changes nothing
    for bad in ({"5": 101}, {"5": -100.5}, {"five": 1}, {"-1": 1}, {"5": "1"}, {"\u00b2": 1},
                {"9" * 5000: 1}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"messages": msg, "logit_bias": bad})


def test_ignored_fields_are_named():
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "store": True,
         "metadata": {"k": "v"}, "service_tier": "auto", "reasoning_effort": "low"})
    assert req.ignored_fields() == ["store", "metadata", "service_tier", "reasoning_effort"]
    assert CompletionRequest.model_validate({"prompt": "x"}).ignored_fields() == []


def test_dotted_param():
    assert dotted_param(("body", "messages", 0, "role")) == "messages[0].role"
    assert dotted_param(("body", "stop", "list[str]", 0)) == "stop[0]"
    assert dotted_param(("body",)) is None


def test_alignment_prefix():
    err = validation_error([{"type": "extra_forbidden", "loc": ("beam",), "msg": "x"}],
                           prefix="alignment")
    assert err.param == "alignment.beam" and "alignment.beam" in err.message
    err = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "x",
                             "ctx": {"error": "Expecting value"}}])
    assert err.status == 400 and err.param is None and "JSON" in err.message


def _llama_style_tokenizer() -> Any:
    """A real fast tokenizer that adds a BOS to what it encodes, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_a_raw_prompt_starts_with_the_tokenizers_bos():
    """Completions encode a text prompt with special tokens, as vLLM does (a Llama-family
    model sees its BOS); text inside a sequence (chat template output, continuations) gets
    none added."""
    from alignserve.engine.text import TextCodec
    from alignserve.server.app import default_rewards
    from alignserve.server.prepare import Preparer
    from tests.fakes.fake_engine import FakeEngine, FakeTokenizer

    codec = TextCodec()
    codec.tokenizer = _llama_style_tokenizer()
    assert codec.encode_prompt("hello world") == [0, 3, 4]
    assert codec.encode("hello world") == [3, 4]
    engine = FakeEngine(["</s>", "<s>", " hello", " world"], table={}, eos=0)
    engine.tokenizer = FakeTokenizer(engine.tokenizer.words, eos=0, bos=1)
    settings = ServerSettings()
    preparer = Preparer(engine, settings, default_rewards(settings), "fake")
    prepared = preparer.completion(CompletionRequest(prompt="hello world", max_tokens=2), "r")
    assert prepared.decode.prompt_ids == [1, 2, 3]
    ids = CompletionRequest(prompt=[2, 3], max_tokens=2)  # token ids are taken as they are
    assert preparer.completion(ids, "r").decode.prompt_ids == [2, 3]
