"""The wire format: every request, response and stream chunk, mirroring OpenAI/vLLM field for field.

Requests forbid unknown fields (a 400 naming the field, never a silent drop); the one open
object is `alignment`, whose extra keys belong to the chosen strategy and are validated by that
strategy's params model. Each request model converts itself into engine SamplingParams with
`to_sampling_params` at the boundary; nothing past it sees the wire format.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from alignserve.engine.protocol import SamplingParams

# ---------------------------------------------------------------------------- requests


class RequestModel(BaseModel):
    # strict: a JSON value of the wrong type is an error, never coerced (`"n": "2"` or
    # `"min_p": true` are 400s, as the schema says), except ints where floats go.
    model_config = ConfigDict(extra="forbid", strict=True)


class AlignmentRequest(BaseModel):
    """The `alignment` extension. Keys other than these two belong to the strategy."""

    model_config = ConfigDict(extra="allow")

    strategy: str = "sample"
    rewards: Any = None  # validated item by item by the reward registry (RewardSpecError)

    def strategy_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StreamOptions(RequestModel):
    include_usage: bool = False


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    # Tool and function roles need tool calling, which this server does not offer.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        # Chat templates know "system"; OpenAI's "developer" is the same thing by a newer name.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class ResponseFormat(RequestModel):
    model_config = ConfigDict(extra="allow")  # json_schema etc. are rejected by type anyway

    type: Literal["text", "json_object", "json_schema"]

    @field_validator("type")
    @classmethod
    def _only_text(cls, value: str) -> str:
        if value != "text":
            raise ValueError(
                f"'{value}' is not supported; only 'text'. For structured output use an "
                "`alignment.rewards` json_schema reward."
            )
        return value


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(RequestModel):
    """Sampling fields shared by chat and completions (OpenAI's plus vLLM's extras)."""

    model: str | None = None  # None: the served model, as vLLM allows
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 and 0 disable (vLLM uses -1)
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    alignment: AlignmentRequest | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        if len(items) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int | None:
        """None: no logprobs; 0: the chosen token's; k: plus the top k."""
        raise NotImplementedError

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def alignment_or_default(self) -> AlignmentRequest:
        return self.alignment or AlignmentRequest()

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's view of this request; `max_tokens` is resolved by the caller."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop_list(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs_k(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
        )


def _unsupported(what: str) -> Any:
    def check(cls: Any, value: Any) -> Any:
        if value:
            raise ValueError(f"{what} is not supported by this server")
        return value

    return classmethod(check)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None  # meaningful only with tools
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None

    _no_tools = field_validator("tools")(_unsupported("Tool calling (`tools`)"))
    _no_functions = field_validator("functions")(_unsupported("Function calling (`functions`)"))
    _no_function_call = field_validator("function_call")(_unsupported("`function_call`"))

    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for chat in favour of max_completion_tokens.
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [m.for_template() for m in self.messages]


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    _no_suffix = field_validator("suffix")(_unsupported("`suffix`"))

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError('use `alignment: {"strategy": "best_of_n", "candidates": N}`')
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        batched = isinstance(value, list) and value and isinstance(value[0], (str, list))
        if batched and len(value) != 1:
            raise ValueError("one prompt per request (batched prompts are not supported)")
        return value

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompt_value(self) -> str | list[int]:
        """The single prompt, as text or token ids."""
        value = self.prompt
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            return value[0]
        return value


# ---------------------------------------------------------------------------- responses


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChoiceAlignment(ResponseModel):
    """What one choice scored: the weighted total and each reward's own score."""

    reward: float | None = None
    components: dict[str, float] = Field(default_factory=dict)


class AlignmentReport(ResponseModel):
    """What the search behind one response cost."""

    strategy: str
    candidates_scored: int
    model_tokens: int
    reward_seconds: float
    seconds: float
    # what a pruning search did (speculative_rejection, particle_filter): rounds, pruned, ...;
    # left out of the body for the strategies that report none
    search: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _drop_empty_search(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("search") is None:
            data.pop("search", None)
        return data


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(ResponseModel):
    content: list[ChatLogprobToken] | None = None


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    alignment: ChoiceAlignment


def _created() -> int:
    return int(time.time())


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    alignment: AlignmentReport
    system_fingerprint: str | None = None


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    alignment: ChoiceAlignment


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    alignment: AlignmentReport
    system_fingerprint: str | None = None


# Stream chunks. They are dumped with exclude_unset, so a field appears only where it is set
# (e.g. `alignment` on a choice's last chunk, `usage` on the usage chunk).


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    alignment: AlignmentReport | None = None


class CompletionStreamChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None


class CompletionChunk(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None
    alignment: AlignmentReport | None = None


# ---------------------------------------------------------------------------- listings


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_created)
    owned_by: str = "alignserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


STREAM_MODES = {
    "tokens": "each choice's tokens are sent as they are decoded",
    "winner": "each returned choice is sent whole, in one delta, once the search picks it",
    "agreed-prefix": "text is sent once every live hypothesis agrees on it",
}


class StrategyInfo(ResponseModel):
    name: str
    description: str
    streams: str  # one of STREAM_MODES
    streams_description: str
    params: dict[str, Any]  # the JSON schema of its `alignment` keys (defaults, bounds)


class AlignmentInfo(ResponseModel):
    engine: str | None = Field(None, description="the engine serving: native or vllm")
    strategies: list[StrategyInfo]
    rewards: list[dict[str, Any]]
    value_models: list[dict[str, Any]] = Field(default_factory=list)
    amateurs: list[dict[str, Any]] = Field(default_factory=list)
    # every limit a request is held to (counts, tokens, bytes; seconds for the timeouts)
    limits: dict[str, int | float | None]


# ---------------------------------------------------------------------------- errors, health


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(ResponseModel):
    """Every error this server sends, in OpenAI's shape."""

    error: ErrorInfo


class HealthStatus(ResponseModel):
    status: Literal["ok", "unavailable", "draining"]
