"""The wire format: every request, response and stream chunk, mirroring OpenAI/vLLM field for field.

Requests forbid unknown fields (a 400 naming the field, never a silent drop); the one open
object is `alignment`, whose extra keys belong to the chosen strategy and are validated by that
strategy's params model. Each request model converts itself into engine SamplingParams with
`to_sampling_params` at the boundary; nothing past it sees the wire format.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from alignserve.engine.protocol import SamplingParams
from alignserve.server.structured import (
    ChosenFunction,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    ResponseFormat,
    ResponseToolCall,
    ToolCall,
    ToolCallFunction,
    ToolChoice,
    ToolDefinition,
)

# ---------------------------------------------------------------------------- requests


class RequestModel(BaseModel):
    # strict: a JSON value of the wrong type is an error, never coerced (`"n": "2"` or
    # `"min_p": true` are 400s, as the schema says), except ints where floats go.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """`null` where OpenAI allows it means the field's default (`"n": null` is n=1), as
        OpenAI and vLLM read it. Fields are declared `X | None` so the schema says so."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if not (v is None and k in fields and fields[k].default is not None)}

    # Spec fields this server accepts and ignores (each logged at debug level when sent);
    # the README lists them. A value that would change what comes back is refused instead.
    IGNORED: ClassVar[tuple[str, ...]] = ()

    def ignored_fields(self) -> list[str]:
        return [name for name in self.IGNORED if getattr(self, name, None) is not None]


class AlignmentRequest(BaseModel):
    """The `alignment` extension. Keys other than these two belong to the strategy."""

    model_config = ConfigDict(extra="allow")

    strategy: str = "sample"
    rewards: Any = None  # validated item by item by the reward registry (RewardSpecError)

    def strategy_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # padding against side channels: nothing to pad

    IGNORED = ("include_obfuscation",)


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a hint for OpenAI's cache

    IGNORED = ("prompt_cache_breakpoint",)


class RefusalContentPart(RequestModel):
    """An assistant turn's refusal, as OpenAI returned it; fed back as plain text."""

    type: Literal["refusal"]
    refusal: str


def _empty_only(what: str) -> Any:
    """A tool-calling field: accepted only where it asks for nothing (null, [] or "none")."""

    def check(cls: Any, value: Any) -> Any:
        if value not in (None, [], "none"):
            raise ValueError(f"{what} is not supported by this server")
        return value

    return classmethod(check)


def _no_media(parts: Any, allowed: tuple[str, ...]) -> None:
    """A clear refusal for image, audio and file parts (a text-only model), before pydantic
    would report every union member's mismatch."""
    for part in parts if isinstance(parts, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in allowed:
            raise ValueError(f"content part type `{kind}` is not supported: this server serves "
                             f"a text-only model (part types: {', '.join(allowed)})")


class ChatMessage(RequestModel):
    # `tool` replies answer an earlier assistant message's `tool_calls` (by `tool_call_id`);
    # the deprecated `function` role answers an assistant's legacy `function_call` (by `name`).
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextContentPart | RefusalContentPart] | None = None
    name: str | None = None  # ignored (chat templates have no place for it) but on `function`
    # assistant turns, as clients send their history back
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: ToolCallFunction | None = None  # a legacy call: {name, arguments}
    audio: dict[str, Any] | None = None

    IGNORED = ("name",)

    _no_audio = field_validator("audio")(_empty_only("Audio (`audio`)"))

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        _no_media(value, ("text", "refusal"))
        return value

    @model_validator(mode="after")
    def _content_by_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        if self.function_call is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry `function_call`")
        if self.role == "function" and not self.name:
            raise ValueError("a `function` message needs the `name` of the function it answers")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("`tool_call_id` is required on tool messages, and only there")
        if self.role != "assistant":
            if self.content is None:
                raise ValueError("`content` is required for this role")
            if isinstance(self.content, list) and any(
                    isinstance(p, RefusalContentPart) for p in self.content):
                raise ValueError("refusal parts belong to assistant messages")
        elif (self.content is None and self.refusal is None and not self.tool_calls
              and self.function_call is None):
            raise ValueError("an assistant message needs `content`, `refusal`, `tool_calls` or "
                             "`function_call`")
        return self

    def ignored_fields(self) -> list[str]:
        return [] if self.role == "function" else super().ignored_fields()

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text if isinstance(p, TextContentPart) else p.refusal
                         for p in self.content)

    def for_template(self) -> dict[str, str]:
        # Chat templates know "system"; OpenAI's "developer" is the same thing by a newer name.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# OpenAI documents the seed as a signed 64-bit integer; vLLM answers 400 outside it.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value


class SamplingFields(RequestModel):
    """Sampling fields shared by chat and completions (OpenAI's plus vLLM's extras)."""

    model: str | None = None  # None or "": the served model, as vLLM allows
    n: Annotated[int, Field(ge=1)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool | None = False  # vLLM's: the stop string ends the text
    seed: Seed | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 and 0 disable (vLLM uses -1)
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = 0
    ignore_eos: bool | None = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-BIAS_LIMIT, le=BIAS_LIMIT)]] | None = None
    # vLLM's: the prompt's and each choice's token ids beside the text (RL pipelines score
    # and train on exactly the tokens the model saw and chose)
    return_token_ids: bool | None = None
    # vLLM's: only these tokens may be sampled (a multiple-choice answer, a label set)
    allowed_token_ids: Annotated[list[Annotated[int, Field(ge=0)]],
                                 Field(min_length=1, max_length=4096)] | None = None
    # vLLM's: keep only the prompt's last k tokens (-1: as many as the context holds)
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    # vLLM's: the id this request is known by (its response's id ends with it); else the
    # X-Request-Id header's, else a fresh one
    request_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    alignment: AlignmentRequest | None = None

    IGNORED = ("user",)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keep_some(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 would keep no prompt at all: give k >= 1, or -1")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # Keys are token ids written as strings (JSON keys); the vocabulary is checked later.
        for key in value or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise ValueError(f"keys are token ids; '{key[:40]}' is not one")
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

    def prompt_logprobs_k(self) -> int | None:
        """Log-probs of the prompt's own tokens (completions with echo): None for none."""
        return None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def alignment_or_default(self) -> AlignmentRequest:
        return self.alignment or AlignmentRequest()

    def bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items() if v}

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's view of this request; `max_tokens` is resolved by the caller."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            stop=self.stop_list(),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            logprobs=self.logprobs_k(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.bias(),
            allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids else None,
            prompt_logprobs=self.prompt_logprobs_k(),
        )


def _unsupported(what: str) -> Any:
    def check(cls: Any, value: Any) -> Any:
        if value:
            raise ValueError(f"{what} is not supported by this server")
        return value

    return classmethod(check)


# apply_chat_template's own arguments and the names the request fills in: never a
# chat_template_kwargs key
TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


@classmethod  # type: ignore[misc]
def _template_variables(cls: Any, value: dict[str, Any] | None) -> dict[str, Any] | None:
    taken = sorted(set(value or ()) & TEMPLATE_ARGUMENTS)
    if taken:
        raise ValueError(f"`{taken[0]}` is set by the request itself, not a template variable")
    return value


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None  # only with tools; default auto
    # the deprecated spelling of tools (`functions`, `function_call`): served as tools with one
    # call at most, answered in the legacy shape (message.function_call); see legacy_tools
    functions: Annotated[list[FunctionDefinition], Field(max_length=128)] | None = None
    function_call: Literal["none", "auto"] | ChosenFunction | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    # vLLM's extras: the prompt ends with the assistant's turn opening (None: unless the final
    # message is continued), or continues the final (assistant) message, e.g. a prefilled
    # answer the model goes on from
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = False
    # vLLM's: extra variables for the chat template (Qwen3's `enable_thinking`, ...)
    chat_template_kwargs: dict[str, Any] | None = None
    # accepted and ignored (see IGNORED): none of them changes the text that comes back
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None

    IGNORED = ("user", "store", "metadata", "service_tier", "reasoning_effort", "verbosity",
               "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
               "safety_identifier", "prediction", "web_search_options", "moderation",
               )

    _template_variables = field_validator("chat_template_kwargs")(_template_variables)

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value and "audio" in value:
            raise ValueError("audio output is not supported by this server; only ['text']")
        return value

    _no_audio = field_validator("audio")(_unsupported("Audio output (`audio`)"))

    def ignored_fields(self) -> list[str]:
        out = super().ignored_fields()
        for i, message in enumerate(self.messages):
            out += [f"messages[{i}].{f}" for f in message.ignored_fields()]
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                out += [f"messages[{i}].content[{j}].{f}" for f in part.ignored_fields()]
        return out

    def opens_turn(self) -> bool:
        """The prompt ends with the assistant's turn opening (the chat default)."""
        if self.add_generation_prompt is None:
            return not self.continue_final_message
        return self.add_generation_prompt

    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for chat in favour of max_completion_tokens.
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [m.for_template() for m in self.messages]

    @property
    def legacy_functions(self) -> bool:
        """The request calls functions the deprecated way (and is answered that way)."""
        return bool(self.functions)

    def legacy_tools(self) -> tuple[list[ToolDefinition] | None, ToolChoice | None]:
        """`functions` / `function_call` as `tools` / `tool_choice`."""
        tools = [ToolDefinition(type="function", function=f) for f in self.functions or ()]
        choice = self.function_call
        if isinstance(choice, ChosenFunction):
            choice = NamedToolChoice(type="function", function=choice)
        return tools or None, choice


MAX_PROMPTS = 64  # prompts in one completions request (each is decoded n times)
# What the schema promises (and schema-driven clients and fuzzers generate): non-empty texts,
# token ids >= 0, non-empty lists. Validation stays in code (`_prompts`, the vocabulary check
# in prepare) so each refusal keeps its own message and param.
_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]],
    WithJsonSchema({"anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_PROMPTS},
        _IDS,
        {"type": "array", "items": _IDS, "minItems": 1, "maxItems": MAX_PROMPTS},
    ]}),
]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    # 0 only with `echo`: the prompt's own log-probs, nothing generated (how eval harnesses
    # score log-likelihoods)
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    # best_of > 1: that many samples, the best n returned (best_of_n without rewards: the
    # highest cumulative log-probability); checked against n and the limits in prepare
    best_of: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None  # vLLM's extension: JSON on completions

    _no_suffix = field_validator("suffix")(_unsupported("`suffix`"))

    def alignment_or_default(self) -> AlignmentRequest:
        if self.alignment is None and self.best_of is not None and self.best_of > 1:
            return AlignmentRequest(strategy="best_of_n", candidates=self.best_of)
        return super().alignment_or_default()

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty")
        batched = isinstance(value, list) and isinstance(value[0], (str, list))
        if batched and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_k(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompt_values(self) -> list[str | list[int]]:
        """The prompts, each as text or token ids (one request may carry several)."""
        value = self.prompt
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            return list(value)
        return [value]


# ---------------------------------------------------------------------------- tokenize
# vLLM's POST /tokenize and /detokenize (outside /v1, as vLLM serves them): what a prompt costs
# before it is sent.


class TokenizeRequest(RequestModel):
    """A completions `prompt`, or chat `messages` (with `tools`), counted as that request
    would feed them to the model."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    # a prompt's special tokens (the BOS a completions request gets), as vLLM's flag
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = None  # with messages: as on chat requests
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False

    _template_variables = field_validator("chat_template_kwargs")(_template_variables)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give `prompt` or `messages`, one of them")
        if self.messages is None and (self.tools or self.add_generation_prompt is not None
                                      or self.continue_final_message
                                      or self.chat_template_kwargs):
            raise ValueError("`tools`, `add_generation_prompt`, `continue_final_message` and "
                             "`chat_template_kwargs` go with `messages`")
        return self


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---------------------------------------------------------------------------- Responses API
# POST /v1/responses: OpenAI's newer endpoint, served over the chat path (server/responses.py
# turns a request into a chat request and the chat answer back into a Response). Text in, text
# and function calls out; nothing is stored, so the stateful fields are refused by name.


def _text_or_list(value: Any) -> str | None:
    return "Text" if isinstance(value, str) else "List" if isinstance(value, list) else None


def text_or_list(items: Any) -> Any:
    """`str | list[items]`, told apart by the value's JSON type, so a wrong list item is
    reported where it is (not as "should be a valid string"). Tags are capitalized so error
    locations drop them (server/errors.py keeps only snake_case field names)."""
    return Annotated[Annotated[str, Tag("Text")] | Annotated[items, Tag("List")],
                     Discriminator(_text_or_list, custom_error_type="text_or_list",
                                   custom_error_message="must be a string or a list")]


class InputTextPart(RequestModel):
    type: Literal["input_text"]
    text: str


class OutputTextPart(RequestModel):
    """An earlier answer's text, as a client sends its history back."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class ResponsesRefusalPart(RequestModel):
    type: Literal["refusal"]
    refusal: str


def by_type(members: dict[str, Any], why: str = "", default: str | None = None) -> Any:
    """A union told apart by the `type` key (`default` when it is left out). Tags are
    capitalized so error locations drop them (server/errors.py keeps snake_case names)."""
    tags = {kind: "".join(w.title() for w in kind.split("_")) for kind in members}

    def tag(value: Any) -> str | None:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        kind = default if kind is None else kind
        return tags.get(kind) if isinstance(kind, str) else None

    union = Union[tuple(Annotated[model, Tag(tags[kind])]  # noqa: UP007  (built at run time)
                        for kind, model in members.items())]
    return Annotated[union, Discriminator(
        tag, custom_error_type="unknown_type",
        custom_error_message=f"`type` must be one of {', '.join(members)}{why}")]


RESPONSES_PART_TYPES = ("input_text", "output_text", "refusal")
ResponsesPart = by_type(dict(zip(RESPONSES_PART_TYPES, (InputTextPart, OutputTextPart,
                                                        ResponsesRefusalPart), strict=True)))


class InputMessageItem(RequestModel):
    type: Literal["message"] | None = None  # optional: `{role, content}` alone is a message
    role: Literal["user", "system", "developer", "assistant"]
    content: text_or_list(list[ResponsesPart])
    id: str | None = None  # an earlier output item's, sent back with it
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        _no_media(value, RESPONSES_PART_TYPES)
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.refusal if isinstance(p, ResponsesRefusalPart) else p.text
                         for p in self.content)


class FunctionCallItem(RequestModel):
    """A call the model made earlier, sent back before its output."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: str
    output: text_or_list(list[InputTextPart])
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "\n".join(
            p.text for p in self.output)


InputItem = by_type({"message": InputMessageItem, "function_call": FunctionCallItem,
                     "function_call_output": FunctionCallOutputItem},
                    ": this server serves text and function tools", default="message")


class ResponsesTextFormat(RequestModel):
    """`text.format`: chat's `response_format`, flattened (name and schema beside `type`)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: FunctionName | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_named(self) -> ResponsesTextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a `json_schema` format needs `name` and `schema`")
        return self


class ResponsesText(RequestModel):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None

    IGNORED = ("verbosity",)


class ResponsesFunctionTool(RequestModel):
    """A function tool, flat (no `function` wrapper as in chat)."""

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise ValueError(f"tool type `{kind}` is not supported: this server hosts no "
                             "tools; give `function` tools and run them yourself")
        return data

    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedTool(RequestModel):
    type: Literal["function"]
    name: str


class ResponsesStreamOptions(RequestModel):
    include_obfuscation: bool | None = None  # padding against side channels: nothing to pad

    IGNORED = ("include_obfuscation",)


# what the server cannot do without storing responses or hosting tools: refused by name
_STATELESS = "this server stores no responses; send the earlier turns in `input`"


class ResponsesRequest(RequestModel):
    model: str | None = None
    input: text_or_list(Annotated[list[InputItem], Field(min_length=1)])
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # "message.output_text.logprobs" asks for logprobs; the rest name outputs of hosted tools
    # and reasoning, which this server never produces
    include: list[str] | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    text: ResponsesText | None = None
    tools: Annotated[list[ResponsesFunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: bool | None = None
    seed: Seed | None = None  # an extension (as vLLM's): reproducible sampling and searches
    alignment: AlignmentRequest | None = None
    # accepted and ignored (see IGNORED): none of them changes the text that comes back
    store: bool | None = None  # nothing is stored whatever it says; the response says false
    metadata: dict[str, str] | None = None  # echoed back on the response
    user: str | None = None
    service_tier: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    moderation: dict[str, Any] | None = None
    access_programs: dict[str, Any] | None = None
    background_options: dict[str, Any] | None = None  # only for `background`, refused below
    context_management: list[dict[str, Any]] | None = None  # compaction: no stored context
    image: dict[str, Any] | None = None  # image context options: no images here
    # refused unless empty: they need stored state or a background queue
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    IGNORED = ("store", "metadata", "user", "service_tier", "reasoning", "truncation",
               "max_tool_calls", "prompt_cache_key", "prompt_cache_retention",
               "prompt_cache_options", "safety_identifier", "moderation", "access_programs",
               "background_options", "context_management", "image")

    @field_validator("background", "previous_response_id", "conversation", "prompt")
    @classmethod
    def _stateless(cls, value: Any, info: Any) -> Any:
        if value:
            raise ValueError("not supported: " + (
                "this server answers every request in the foreground" if info.field_name ==
                "background" else "this server has no stored prompts" if info.field_name ==
                "prompt" else _STATELESS))
        return value

    def ignored_fields(self) -> list[str]:
        out = super().ignored_fields()
        if self.text is not None:
            out += [f"text.{f}" for f in self.text.ignored_fields()]
        if self.stream_options is not None:
            out += [f"stream_options.{f}" for f in self.stream_options.ignored_fields()]
        return out

    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ()) or (
            self.top_logprobs is not None)


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
    tool_calls: list[ResponseToolCall] | None = None
    function_call: dict[str, str] | None = None  # a legacy `functions` request's call


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    alignment: ChoiceAlignment
    token_ids: list[int] | None = None  # with `return_token_ids`


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
    prompt_token_ids: list[int] | None = None  # with `return_token_ids`


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    alignment: ChoiceAlignment
    prompt_token_ids: list[int] | None = None  # with `return_token_ids`: its prompt's
    token_ids: list[int] | None = None


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


class DeltaFunction(ResponseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(ResponseModel):
    """One streamed piece of a tool call; `index` says which call it belongs to (the SDK
    joins the pieces of one index)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    function_call: DeltaFunction | None = None  # a legacy `functions` request's call


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None
    token_ids: list[int] | None = None  # with `return_token_ids`: this delta's tokens


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    alignment: AlignmentReport | None = None
    prompt_token_ids: list[int] | None = None  # with `return_token_ids`: the first chunk


class CompletionStreamChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None
    prompt_token_ids: list[int] | None = None  # with `return_token_ids`: a choice's first
    token_ids: list[int] | None = None


class CompletionChunk(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None
    alignment: AlignmentReport | None = None


# The Responses API's answer and stream events. Built as dicts by server/responses.py; these
# models document them in /openapi.json (and the fuzz tests hold the bodies to them).


class OutputTextContent(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ChatLogprobToken] | None = None  # the same entries as chat's


class OutputMessage(ResponseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputTextContent]


class OutputFunctionCall(ResponseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ResponsesUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponsesAlignment(AlignmentReport):
    """The answer's reward beside what the search behind it cost, in one object."""

    reward: float | None = None
    components: dict[str, float] = Field(default_factory=dict)


class ResponseObject(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    completed_at: int | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: dict[str, Any] | None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: str = "disabled"
    user: str | None = None
    usage: ResponsesUsage | None = None
    alignment: ResponsesAlignment | None = None


class ResponseStreamEvent(ResponseModel):
    """One event of a Responses stream: `type` says which (response.created, ...,
    response.output_text.delta, ..., response.completed); its fields follow OpenAI's."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int


# /tokenize and /detokenize's answers


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(ResponseModel):
    prompt: str


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
