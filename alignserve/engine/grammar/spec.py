"""What a request constrains its output to, as engine-neutral data, and the tool-call format.

The server maps OpenAI's `response_format`, `tools` and `tool_choice` into one `GrammarSpec`;
an engine compiles it (native: `compiler.TokenizerGrammars`; vLLM: its own structured outputs,
see `vllm_structured_outputs`). The spec is frozen and hashable, and its `key` is the cache key
of the compiled grammar.

Tool calls are written in one format whatever the model, because SmolLM2's chat template (plain
ChatML) has no tool format of its own: each call is a JSON object between tags,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one per call, separated by a newline. It is the Hermes/Qwen2.5 convention, so models trained on
it need no translation; the server's prompt (server/structured.py) tells other models about it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
TOOL_CALL_TRIGGER = "<tool_call>"  # where free text (tool_choice auto) turns into a call
TOOL_CALL_SEPARATOR = "\n"  # between parallel calls
# A tool call's JSON lets at most this many whitespace characters stand between two tokens of
# JSON: enough for `", "` and `": "` (or a newline), not for a small model to loop on blanks.
TOOL_JSON_MAX_WHITESPACE = 1

NO_PARAMETERS = {"type": "object", "properties": {}}

ResponseKind = Literal["text", "json_object", "json_schema"]
ToolMode = Literal["none", "auto", "required"]


def canonical_json(value: Any) -> str:
    """Compact JSON with the key order kept (a schema's property order is the order the grammar
    generates them in, so two orders are two grammars)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class ToolDef:
    """A function the model may call: its name and its parameters' JSON schema (canonical)."""

    name: str
    parameters: str = canonical_json(NO_PARAMETERS)

    @property
    def parameters_schema(self) -> Any:
        return json.loads(self.parameters)

    def call_prefix(self) -> str:
        """The text that opens a call of this tool, up to its arguments object."""
        return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(self.name, ensure_ascii=False)}, "arguments": '

    @staticmethod
    def call_suffix() -> str:
        return "}" + TOOL_CALL_CLOSE


@dataclass(frozen=True)
class GrammarSpec:
    """The constraint on one request's output.

    response: the final answer's format (OpenAI `response_format.type`); `schema` is the
    canonical JSON schema when it is `json_schema`. `strict` (OpenAI's `json_schema.strict`,
    None when unset) decides whether objects may carry properties the schema does not name: only
    `strict=False` lets them (outputs are valid either way; the tight default suits small
    models). tools / tool_mode: the functions a call may name and whether a call is optional
    (`auto`: free text or calls) or required (`required`, and a named `tool_choice`, which
    the server turns into `required` with that one tool); `parallel` allows several calls.
    """

    response: ResponseKind = "text"
    schema: str | None = None
    strict: bool | None = None
    tools: tuple[ToolDef, ...] = ()
    tool_mode: ToolMode = "none"
    parallel: bool = True
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.response == "json_schema") != (self.schema is not None):
            raise ValueError("a json_schema response needs `schema`, and only it")
        if self.tool_mode != "none" and not self.tools:
            raise ValueError(f"tool_mode {self.tool_mode!r} needs tools")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        if self.is_free_text:
            raise ValueError("a spec that constrains nothing is None, not a GrammarSpec")
        object.__setattr__(self, "key", canonical_json({
            "response": self.response, "schema": self.schema, "strict": self.strict,
            "tools": [[t.name, t.parameters] for t in self.tools],
            "tool_mode": self.tool_mode, "parallel": self.parallel}))

    @property
    def is_free_text(self) -> bool:
        return self.response == "text" and self.tool_mode == "none"

    @property
    def kind(self) -> str:
        """What the compiler builds: `tools` (a structural tag), else the response format."""
        return "tools" if self.tool_mode != "none" else self.response

    @property
    def schema_bytes(self) -> int:
        """The size the server's schema limit is held against: every schema in the spec."""
        sizes = [len(self.schema.encode())] if self.schema else []
        sizes += [len(t.parameters.encode()) for t in self.tools]
        return sum(sizes)

    def structural_tag(self) -> dict[str, Any]:
        """The tools grammar as an xgrammar structural tag (vLLM's `structural_tag` takes the
        same JSON): each tool is a tag whose begin names it, so the arguments follow that
        tool's schema; `auto` lets free text run until the trigger, `required` allows calls
        only. With `auto` and a JSON response format the answer is that JSON or calls."""
        tags = [{"type": "tag", "begin": t.call_prefix(),
                 "content": {"type": "json_schema", "json_schema": t.parameters_schema,
                             "max_whitespace_cnt": TOOL_JSON_MAX_WHITESPACE},
                 "end": t.call_suffix()} for t in self.tools]
        calls = {"type": "tags_with_separator", "tags": tags, "separator": TOOL_CALL_SEPARATOR,
                 "at_least_one": True, "stop_after_first": not self.parallel}
        if self.tool_mode == "required":
            fmt = calls
        elif self.response == "text":
            fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_TRIGGER], "tags": tags,
                   "at_least_one": False, "stop_after_first": not self.parallel}
        else:
            answer = {"type": "json_schema", "json_schema": self.response_schema(),
                      "max_whitespace_cnt": TOOL_JSON_MAX_WHITESPACE}
            fmt = {"type": "or", "elements": [answer, calls]}
        return {"type": "structural_tag", "format": fmt}

    def response_schema(self) -> Any:
        """The JSON schema of a JSON response (json_object: any object)."""
        if self.response == "json_schema":
            return json.loads(self.schema)
        if self.response == "json_object":
            return {"type": "object"}
        raise ValueError("a text response has no schema")


def vllm_structured_outputs(spec: GrammarSpec) -> dict[str, Any]:
    """The keyword arguments of vLLM's `StructuredOutputsParams` (0.25-0.32) for this spec; the
    adapter builds `SamplingParams(structured_outputs=StructuredOutputsParams(**these))`.

    Whitespace is an engine-wide setting there: the adapter starts vLLM with
    `StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)`
    (engine/vllm/engine.py `structured_outputs_config`) so a JSON answer has a fixed layout
    (xgrammar 0.2.8 there: `{"a":1, "b":2}`; the native engine's `{"a": 1, "b": 2}`). vLLM's xgrammar backend compiles schemas in
    xgrammar's strict mode whatever `strict` says (no properties beyond the schema's)."""
    if spec.kind == "tools":
        return {"structural_tag": json.dumps(spec.structural_tag())}
    if spec.response == "json_object":
        return {"json_object": True}
    return {"json": json.loads(spec.schema)}
