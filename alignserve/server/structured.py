"""Structured outputs and tool calling at the HTTP boundary: pure functions, no engine.

- The wire fields (pydantic, OpenAI's shapes): `response_format` text / json_object /
  json_schema {name, description, schema, strict}; `tools` [{type: function, function: {name,
  description, parameters, strict}}]; `tool_choice` none / auto / required / {type: function,
  function: {name}}; messages that carry `tool_calls` (assistant) and `role: tool` replies.
  (They move into server/protocol.py when the request models take them.)
- `grammar_spec_for` maps them to the engine-neutral GrammarSpec (engine/grammar/spec.py), with
  every check that needs no engine; a bad schema is a 400 naming its JSON path.
- `render_messages` writes tools and tool-call history into plain chat messages. SmolLM2's chat
  template is bare ChatML: `<|im_start|>{role}\\n{content}<|im_end|>` for every message as it
  comes (any role name passes through verbatim, `content` must be a string), a default system
  prompt only when the first message is not a system one, and it ignores the `tools` argument of
  `apply_chat_template`. So the tools go into the system message, in the Hermes/Qwen2.5
  convention the grammar enforces (`<tools>` listing, `<tool_call>` JSON calls), an assistant's
  earlier calls are written back in that form, and a tool's reply becomes a user turn wrapped in
  `<tool_response>` (a `tool` role the model never saw would be noise to it).
- `parse_tool_calls` reads a finished text back into `message.tool_calls` (finish_reason
  `tool_calls`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignserve.engine.grammar import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    GrammarError,
    GrammarLimitError,
    GrammarSpec,
    ToolDef,
    canonical_json,
    check_schema,
)
from alignserve.engine.grammar.errors import render_path
from alignserve.engine.grammar.spec import NO_PARAMETERS, TOOL_CALL_SEPARATOR
from alignserve.server.errors import APIError

# ---------------------------------------------------------------------------- wire models


class _Request(BaseModel):
    # as server/protocol.py's RequestModel: unknown fields are 400s, no coercion
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class JSONSchemaFormat(_Request):
    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is required with type 'json_schema', and only there")
        return self


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ToolChatMessage(_Request):
    """A chat message as server/protocol.py's ChatMessage must take it: `tool` replies, and
    assistant messages whose content may be null when they carry `tool_calls`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ToolChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("`tool_call_id` is required on tool messages, and only there")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("`content` is required unless an assistant message has tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


# Response side: what message.tool_calls and a streamed delta's tool_calls look like.
class ResponseToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name", "arguments"}


# ---------------------------------------------------------------------------- the grammar spec

LIMIT_FLAGS = {"max_grammar_bytes": "--max-grammar-bytes",
               "grammar_compile_timeout": "--grammar-compile-timeout"}


@dataclass(frozen=True)
class ToolFields:
    """How the request spelled its tools, for the errors that name them: `tools` and
    `tool_choice`, or (legacy) the deprecated `functions` and `function_call`, where each
    function is `functions[i]` itself rather than `tools[i].function`."""

    legacy: bool = False

    @property
    def tools(self) -> str:
        return "functions" if self.legacy else "tools"

    @property
    def choice(self) -> str:
        return "function_call" if self.legacy else "tool_choice"

    @property
    def choice_name(self) -> str:
        return "function_call.name" if self.legacy else "tool_choice.function.name"

    def function(self, i: int) -> tuple[str | int, ...]:
        return ("functions", i) if self.legacy else ("tools", i, "function")


WIRE, LEGACY = ToolFields(), ToolFields(legacy=True)


def api_error(err: GrammarError, fields: ToolFields = WIRE) -> APIError:
    """A 400 naming the JSON path on the wire (a spec-relative path from the engine's checks is
    placed there too); limits name their flag."""
    param = render_path(wire_path(err.path, fields)) or None
    message = f"{param}: {err.message}" if param else err.message
    if isinstance(err, GrammarLimitError):
        message += f" ({LIMIT_FLAGS.get(err.limit, err.limit)})"
    return APIError(message, param=param)


def wire_path(path: Sequence[str | int], fields: ToolFields = WIRE) -> tuple[str | int, ...]:
    """A GrammarSpec path ("schema", ...) / ("tools", i, "parameters", ...) on the wire, as
    the request spelled its tools; wire paths pass unchanged."""
    path = tuple(path)
    if path[:1] == ("schema",):
        return ("response_format", "json_schema", "schema") + path[1:]
    if path[:1] == ("tools",) and len(path) >= 3 and path[2] == "parameters":
        return fields.function(path[1]) + path[2:]
    return path


def grammar_spec_for(response_format: ResponseFormat | None,
                     tools: Sequence[ToolDefinition] | None,
                     tool_choice: ToolChoice | None,
                     parallel_tool_calls: bool | None,
                     fields: ToolFields = WIRE) -> GrammarSpec | None:
    """The request's constraint, or None for free text. Raises APIError naming the field as
    the request spelled it (`fields`)."""
    if tool_choice is not None and not tools:
        raise APIError(f"`{fields.choice}` is only allowed when `{fields.tools}` are given.",
                       param=fields.choice)
    fmt = response_format.type if response_format is not None else "text"
    schema, strict = None, None
    if fmt == "json_schema":
        js = response_format.json_schema
        # no schema (or `true`): any JSON value, which the empty schema says
        raw = {} if js.schema_ is None or js.schema_ is True else js.schema_
        _check(raw, ("response_format", "json_schema", "schema"))
        schema, strict = canonical_json(raw), js.strict
    defs = _tool_defs(tools or (), fields)
    mode = "auto" if tools and tool_choice is None else tool_choice or "none"
    parallel = parallel_tool_calls is not False
    if isinstance(mode, NamedToolChoice):
        wanted = mode.function.name
        named = [d for d in defs if d.name == wanted]
        if not named:
            raise APIError(f"{fields.choice} names `{wanted}`, which is not among the "
                           f"{fields.tools} ({', '.join(d.name for d in defs)}).",
                           param=fields.choice_name)
        defs, mode, parallel = tuple(named), "required", False
    if mode == "none":
        defs = ()
    if fmt == "text" and mode == "none":
        return None
    return GrammarSpec(response=fmt, schema=schema, strict=strict, tools=defs, tool_mode=mode,
                       parallel=parallel)


def _check(schema: Any, base: tuple) -> None:
    try:
        check_schema(schema, base)
    except GrammarError as err:
        raise api_error(err) from None


def _tool_defs(tools: Sequence[ToolDefinition], fields: ToolFields) -> tuple[ToolDef, ...]:
    seen: set[str] = set()
    defs = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if fn.name in seen:
            raise APIError(f"Two {fields.tools} are named `{fn.name}`.",
                           param=render_path(fields.function(i) + ("name",)))
        seen.add(fn.name)
        params = fn.parameters if fn.parameters is not None else NO_PARAMETERS
        _check(params, fields.function(i) + ("parameters",))
        defs.append(ToolDef(fn.name, canonical_json(params)))
    return tuple(defs)


# ---------------------------------------------------------------------------- the prompt


def tools_system_prompt(tools: Sequence[ToolDefinition], spec: GrammarSpec | None) -> str:
    """The system text that tells a model without a tool format about the tools."""
    listing = "\n".join(json.dumps(t.model_dump(exclude_none=True, by_alias=True),
                                   ensure_ascii=False) for t in tools)
    lines = [
        "You can call functions to help answer. The functions, as JSON schemas:",
        f"<tools>\n{listing}\n</tools>",
        "To call a function, write one JSON object per call between <tool_call> tags:",
        (f'{TOOL_CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
         f"{TOOL_CALL_CLOSE}"),
    ]
    if spec is not None and spec.tool_mode == "required":
        names = [d.name for d in spec.tools]
        lines.append(f"You must call {names[0]} now." if len(names) == 1 and not spec.parallel
                     else "You must call at least one function now.")
    return "\n".join(lines)


def render_tool_calls(calls: Sequence[ToolCall], where: str, legacy: bool = False) -> str:
    """An assistant's earlier calls in the tool-call format (arguments must be JSON);
    `legacy`: the one call is the message's deprecated `function_call`, and errors say so."""
    out = []
    for j, call in enumerate(calls):
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            field = "function_call" if legacy else f"tool_calls[{j}].function"
            raise APIError("The tool call's arguments are not valid JSON.",
                           param=f"{where}.{field}.arguments") from None
        body = json.dumps({"name": call.function.name, "arguments": arguments},
                          ensure_ascii=False)
        out.append(f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}")
    return TOOL_CALL_SEPARATOR.join(out)


def tool_response(name: str, content: str) -> dict[str, str]:
    """A tool's reply as the user turn the model reads it in."""
    reply = json.dumps({"name": name, "content": content}, ensure_ascii=False)
    return {"role": "user", "content": f"<tool_response>\n{reply}\n</tool_response>"}


def render_messages(messages: Sequence[ToolChatMessage], tools: Sequence[ToolDefinition] | None,
                    spec: GrammarSpec | None) -> list[dict[str, str]]:
    """Messages for a chat template with no tool format (see the module docstring): every
    `content` a string, roles system / user / assistant. Tools are listed unless tool_choice is
    none (spec without tools), so a model told not to call never sees them."""
    out: list[dict[str, str]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant calls
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        # protocol.ChatMessage's legacy `function_call` is one call written the same way
        legacy = getattr(m, "function_call", None)
        if m.role == "assistant" and (m.tool_calls or legacy is not None):
            for call in m.tool_calls or ():
                names[call.id] = call.function.name
            calls = (render_tool_calls(m.tool_calls, where) if m.tool_calls else
                     render_tool_calls([ToolCall(id="function_call", function=legacy)], where,
                                       legacy=True))
            text = m.text()
            out.append({"role": "assistant",
                        "content": f"{text}{TOOL_CALL_SEPARATOR}{calls}" if text else calls})
        elif m.role == "tool":
            if m.tool_call_id not in names:
                raise APIError(f"tool_call_id `{m.tool_call_id}` answers no earlier assistant "
                               "tool call.", param=f"{where}.tool_call_id")
            out.append(tool_response(names[m.tool_call_id], m.text()))
        elif m.role == "function":  # the deprecated reply to a `function_call`, by name
            out.append(tool_response(m.name, m.text()))
        else:
            out.append({"role": role, "content": m.text()})
    if tools and spec is not None and spec.tools:
        prompt = tools_system_prompt(tools, spec)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ---------------------------------------------------------------------------- the answer


@dataclass
class ParsedAnswer:
    content: str | None
    tool_calls: list[ResponseToolCall] = field(default_factory=list)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """OpenAI says `tool_calls` when the model stopped after calling."""
        return "tool_calls" if self.tool_calls and engine_reason == "stop" else engine_reason


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_tool_calls(text: str, allowed: Sequence[str] | None = None,
                     make_id: Callable[[], str] = new_call_id) -> ParsedAnswer:
    """Split a finished text into tool calls and the remaining content. A block that is not a
    call of an allowed function with an object of arguments stays in the content as it was
    written (with a grammar it cannot happen; without one it is the model's text)."""
    decoder = json.JSONDecoder()
    open_tag, close_tag = TOOL_CALL_OPEN.strip(), TOOL_CALL_CLOSE.strip()
    calls, content, pos = [], [], 0
    while (start := text.find(open_tag, pos)) != -1:
        call, end = _one_call(text, start + len(open_tag), close_tag, decoder, allowed)
        if call is None:
            content.append(text[pos:start + len(open_tag)])
            pos = start + len(open_tag)
            continue
        content.append(text[pos:start])
        calls.append(ResponseToolCall(id=make_id(), function={
            "name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}))
        pos = end
    content.append(text[pos:])
    rest = "".join(content).strip()
    return ParsedAnswer(content=rest or None, tool_calls=calls)


def _one_call(text: str, at: int, close_tag: str, decoder: json.JSONDecoder,
              allowed: Sequence[str] | None) -> tuple[dict | None, int]:
    while at < len(text) and text[at].isspace():
        at += 1
    try:
        value, end = decoder.raw_decode(text, at)
    except ValueError:
        return None, at
    tail = end
    while tail < len(text) and text[tail].isspace():
        tail += 1
    if not text.startswith(close_tag, tail):
        return None, at
    ok = (isinstance(value, dict) and set(value) == {"name", "arguments"}
          and isinstance(value["name"], str) and isinstance(value["arguments"], dict)
          and (allowed is None or value["name"] in allowed))
    return (value if ok else None), tail + len(close_tag)
