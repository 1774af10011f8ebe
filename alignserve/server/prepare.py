"""From a validated wire request to a DecodeRequest: the checks pydantic cannot do alone.

These need the engine (tokenizer, context length), the strategy registry, the reward registry
or the server's limits. Every failure is an APIError naming the offending field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from alignserve.decoding.base import (
    STRATEGIES,
    DecodeRequest,
    Strategy,
    StrategyInputError,
    StrategyParams,
)
from alignserve.engine.protocol import Engine
from alignserve.rewardmodels.protocol import RewardSpecError
from alignserve.server.errors import APIError, validation_error
from alignserve.server.protocol import (
    AlignmentRequest,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from alignserve.server.settings import ServerSettings

Kind = Literal["chat", "completion"]


@dataclass
class Prepared:
    """Everything the response side needs besides the decode events."""

    kind: Kind
    request_id: str
    created: int
    model: str
    strategy: Strategy
    decode: DecodeRequest
    include_usage: bool
    echo: str = ""  # completions with echo=true: the prompt text put before each choice


class Preparer:
    def __init__(self, engine: Engine, settings: ServerSettings, rewards: Any,
                 served_model_name: str, resources: Any = None) -> None:
        self.engine = engine
        self.resources = resources  # decoding.resources.DecodingResources (None: defaults)
        self.settings = settings
        self.rewards = rewards  # rewardmodels.compose.RewardRegistry
        self.served_model_name = served_model_name

    # -- entry points

    def chat(self, req: ChatCompletionRequest) -> Prepared:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("`top_logprobs` requires `logprobs: true`.", param="top_logprobs")
        messages = req.template_messages()
        try:
            prompt_text, prompt_ids = self.engine.encode_chat(messages)
        except Exception as e:  # noqa: BLE001  (templates raise anything; it is the input's fault)
            raise APIError(f"The chat template rejected the messages: {e}",
                           param="messages") from None
        return self._finish("chat", req, prompt_text, list(prompt_ids), messages, "messages")

    def completion(self, req: CompletionRequest) -> Prepared:
        self._check_common(req)
        if req.echo and req.logprobs is not None:
            raise APIError("`echo` with `logprobs` (prompt logprobs) is not supported.",
                           param="echo")
        prompt = req.prompt_value()
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, list(self.engine.encode(prompt))
        else:
            bad = [t for t in prompt if not 0 <= t < self.engine.vocab_size]
            if bad:
                raise APIError(f"Token id {bad[0]} is outside the vocabulary "
                               f"(0..{self.engine.vocab_size - 1}).", param="prompt")
            prompt_ids = list(prompt)
            prompt_text = self.engine.tokenizer.decode(prompt_ids)
        prepared = self._finish("completion", req, prompt_text, prompt_ids, None, "prompt")
        prepared.echo = prompt_text if req.echo else ""
        return prepared

    # -- shared steps

    def _check_common(self, req: SamplingFields) -> None:
        if req.model is not None and req.model != self.served_model_name:
            raise APIError(f"The model `{req.model}` does not exist.", param="model", status=404)
        if req.n > self.settings.max_n:
            raise APIError(f"n is {req.n}; this server allows at most {self.settings.max_n}.",
                           param="n")
        bad = [t for t in req.stop_token_ids or () if t >= self.engine.vocab_size]
        if bad:
            raise APIError(f"Token id {bad[0]} is outside the vocabulary "
                           f"(0..{self.engine.vocab_size - 1}).", param="stop_token_ids")

    def _strategy(self, spec: AlignmentRequest, n: int) -> tuple[Strategy, StrategyParams]:
        strategy = STRATEGIES.get(spec.strategy)
        if strategy is None:
            names = ", ".join(sorted(STRATEGIES))
            raise APIError(f"Unknown strategy `{spec.strategy}`; this server offers: {names}.",
                           param="alignment.strategy")
        try:
            params = strategy.params.model_validate(spec.strategy_params())
        except ValidationError as e:
            raise validation_error(list(e.errors()), prefix="alignment") from None
        candidates = getattr(params, "candidates", None)
        if isinstance(candidates, int):
            if candidates > self.settings.max_candidates:
                raise APIError(f"alignment.candidates is {candidates}; this server allows at "
                               f"most {self.settings.max_candidates}.",
                               param="alignment.candidates")
            if n > candidates:
                raise APIError(f"n ({n}) must not exceed alignment.candidates ({candidates}): "
                               "the best n of the candidates are returned.",
                               param="alignment.candidates")
        return strategy, params

    def _reward(self, spec: AlignmentRequest) -> Any:
        try:
            return self.rewards.build(spec.rewards, max_rewards=self.settings.max_rewards)
        except RewardSpecError as e:
            raise APIError(str(e), param=getattr(e, "param", None) or "alignment.rewards") from None

    def _max_tokens(self, req: SamplingFields, kind: Kind, prompt_len: int, where: str) -> int:
        limit, ctx = self.settings.max_tokens_limit, self.engine.max_model_len
        if prompt_len == 0:
            raise APIError("The prompt is empty.", param=where)
        if prompt_len >= ctx:
            raise APIError(f"This model's maximum context length is {ctx} tokens. However, your "
                           f"{where} resulted in {prompt_len} tokens. Please reduce the length "
                           f"of the {where}.", param=where)
        requested = req.requested_max_tokens()
        if requested is None:
            # OpenAI's defaults: completions 16 tokens; chat whatever the context leaves.
            default = 16 if kind == "completion" else ctx - prompt_len
            return min(default, limit, ctx - prompt_len)
        name = ("max_completion_tokens" if getattr(req, "max_completion_tokens", None)
                else "max_tokens")
        if requested > limit:
            raise APIError(f"{name} is {requested}; this server allows at most {limit}.",
                           param=name)
        if prompt_len + requested > ctx:
            raise APIError(f"This model's maximum context length is {ctx} tokens. However, you "
                           f"requested {prompt_len + requested} tokens ({prompt_len} in the "
                           f"{where}, {requested} in the completion). Please reduce the length "
                           f"of the {where} or completion.", param=name)
        return requested

    def _finish(self, kind: Kind, req: SamplingFields, prompt_text: str, prompt_ids: list[int],
                messages: list[dict[str, str]] | None, where: str) -> Prepared:
        spec = req.alignment_or_default()
        strategy, params = self._strategy(spec, req.n)
        reward = self._reward(spec)
        max_tokens = self._max_tokens(req, kind, len(prompt_ids), where)
        if req.min_tokens > max_tokens:
            raise APIError(f"min_tokens ({req.min_tokens}) must not exceed max_tokens "
                           f"({max_tokens}).", param="min_tokens")
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        decode = DecodeRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            prompt_text=prompt_text,
            sampling=req.to_sampling_params(max_tokens),
            n=req.n,
            strategy=strategy.name,
            params=params,
            reward=reward,
            stream=req.stream,
            messages=messages,
        )
        check = getattr(strategy, "check", None)
        if check is not None:  # strategy checks that need the engine or resources
            try:
                check(decode, self.engine, self.resources)
            except StrategyInputError as e:
                raise APIError(e.message, param=e.param) from None
        return Prepared(kind=kind, request_id=request_id, created=int(time.time()),
                        model=self.served_model_name, strategy=strategy, decode=decode,
                        include_usage=req.include_usage())
