"""Server pieces that need no live server: settings and CLI flags, schema conversion, errors."""

from __future__ import annotations

import argparse

import pytest

from alignserve.cli import build_parser
from alignserve.server.errors import dotted_param, validation_error
from alignserve.server.protocol import ChatCompletionRequest, CompletionRequest
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
    assert req.prompt_value() == "one"
    p = req.to_sampling_params(16)
    assert p.logprobs == 0 and p.top_p == 0.5 and p.temperature == 1.0
    assert CompletionRequest.model_validate({"prompt": [[1, 2]]}).prompt_value() == [1, 2]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompt_value() == [1, 2]


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
