"""The `json_schema` reward: is the text (or the first JSON value in it) valid against a
client-supplied JSON Schema (Draft 2020-12)?

Schemas come from clients, so validation must not fetch anything or hang: only local
`$ref`s are accepted (nothing is ever retrieved), `pattern` is matched with the
time-bounded `regex` engine, and `patternProperties` (whose regexes jsonschema matches
with the unbounded stdlib engine in several places) is rejected.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Iterator
from typing import Any

import regex
from jsonschema import Draft202012Validator, SchemaError, ValidationError, validators
from pydantic import Field

from alignserve.rewardmodels.kind import RewardArgs, RewardKind
from alignserve.rewardmodels.protocol import RewardSpecError

MAX_SCHEMA_BYTES = 64 * 1024
PATTERN_TIMEOUT_S = 0.05
# the running validation's pattern time bound (the reward's timeout_s: --regex-timeout)
_PATTERN_TIMEOUT = contextvars.ContextVar("json_schema_pattern_timeout",
                                          default=PATTERN_TIMEOUT_S)
MAX_SCAN_STARTS = 64  # '{' / '[' positions tried when looking for JSON inside prose

SCORE_VALID, SCORE_INVALID, SCORE_NO_JSON = 1.0, 0.5, 0.0


def _safe_pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[Any]:
    """`pattern` with a time bound; a timeout or an uncompilable pattern fails validation."""
    if not validator.is_type(instance, "string"):
        return
    try:
        ok = regex.search(patrn, instance, timeout=_PATTERN_TIMEOUT.get()) is not None
    except (TimeoutError, regex.error):
        ok = False
    if not ok:
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


SafeValidator = validators.extend(Draft202012Validator, {"pattern": _safe_pattern})

# Keywords whose value maps names to subschemas: their keys are names, not keywords.
_NAME_MAPS = {"properties", "$defs", "definitions", "dependentSchemas"}
# Keywords whose value is instance data, not schema.
_DATA_KEYWORDS = {"enum", "const", "default", "examples"}


def _check_safe(node: Any, param: str, names_map: bool = False) -> None:
    if isinstance(node, list):
        for item in node:
            _check_safe(item, param)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if names_map:
            _check_safe(value, param)
            continue
        if key in _DATA_KEYWORDS:
            continue
        if key == "patternProperties":
            raise RewardSpecError(
                "patternProperties is not supported (its regexes cannot be time-bounded)", param
            )
        if key in ("$ref", "$dynamicRef") and isinstance(value, str) and not value.startswith("#"):
            raise RewardSpecError(
                f"only local references ('#...') are supported, got "
                f"{key} {value!r}: nothing is fetched",
                param,
            )
        if key == "pattern" and isinstance(value, str):
            try:
                regex.compile(value)
            except (regex.error, ValueError, OverflowError, RecursionError) as e:
                raise RewardSpecError(f"invalid pattern {value!r}: {e}", param) from e
        _check_safe(value, param, names_map=key in _NAME_MAPS)


def compile_schema(schema: dict[str, Any], param: str) -> Any:
    """Validate the schema itself and return a validator for it."""
    try:
        size = len(json.dumps(schema, separators=(",", ":")).encode())
    except (TypeError, ValueError, RecursionError) as e:
        raise RewardSpecError(f"schema is not serialisable JSON: {e}", param) from e
    if size > MAX_SCHEMA_BYTES:
        raise RewardSpecError(f"schema is {size} bytes; at most {MAX_SCHEMA_BYTES}", param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise RewardSpecError(f"invalid JSON schema: {e.message}", param) from e
    except RecursionError as e:
        raise RewardSpecError("schema is nested too deeply", param) from e
    _check_safe(schema, param)
    return SafeValidator(schema)


_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_MISSING = object()
_FENCE_OPEN = re.compile(r"^\s*```[ \t]*(?:json)?[ \t]*\r?\n", re.IGNORECASE)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _MISSING


def extract_json(text: str) -> Any:
    """The text as JSON; else the first fenced block that parses; else the first object or
    array embedded in prose. Returns `_MISSING` when none is found."""
    value = _loads(text.strip())
    if value is not _MISSING:
        return value
    for m in _FENCE.finditer(text):
        value = _loads(m.group(1).strip())
        if value is not _MISSING:
            return value
    decoder = json.JSONDecoder()
    for tries, m in enumerate(re.finditer(r"[\[{]", text)):
        if tries >= MAX_SCAN_STARTS:
            break
        try:
            return decoder.raw_decode(text, m.start())[0]
        except (ValueError, RecursionError):
            continue
    return _MISSING


class JsonSchemaArgs(RewardArgs):
    schema_: dict[str, Any] = Field(
        alias="schema",
        description="A JSON Schema (Draft 2020-12, at most 64 KiB; local $refs only; "
        "patternProperties unsupported).",
    )


class JsonSchemaReward:
    """1.0 valid JSON matching the schema, 0.5 JSON that does not match, 0.0 no JSON."""

    name = "json_schema"
    score_range = (SCORE_NO_JSON, SCORE_VALID)

    def __init__(self, validator: Any, timeout_s: float = PATTERN_TIMEOUT_S) -> None:
        self.validator = validator
        self.timeout_s = timeout_s  # per `pattern` match (the server sets --regex-timeout)

    def _score_one(self, text: str) -> float:
        value = extract_json(text)
        if value is _MISSING:
            return SCORE_NO_JSON
        bound = _PATTERN_TIMEOUT.set(self.timeout_s)
        try:
            return SCORE_VALID if self.validator.is_valid(value) else SCORE_INVALID
        except Exception:  # noqa: BLE001 - an unresolvable local $ref, deep recursion...
            return SCORE_INVALID  # it parsed; it could not be shown valid
        finally:
            _PATTERN_TIMEOUT.reset(bound)

    def score(self, texts: list[str], prompt: str = "") -> list[float]:
        return [self._score_one(t) for t in texts]

    def score_partial(self, texts: list[str], prompt: str, tokens_left: list[int],
                      optimistic: bool = True) -> list[float]:
        """Unfinished text: 1.0 while the JSON begun at its first '{' or '[' (or the whole
        text, inside a ```json fence or not) can still be completed; text that has not begun
        any JSON, or whose JSON is broken, gets its ordinary score. Syntax only: a prefix is
        not checked against the schema."""
        from alignserve.rewardmodels.partial import json_prefix_ok

        out = []
        for t in texts:
            body = _FENCE_OPEN.sub("", t, count=1).lstrip()
            start = min((body.find(c) for c in "{[" if c in body), default=-1)
            viable = not body or (start >= 0 and json_prefix_ok(body[start:]))
            out.append(SCORE_VALID if viable else self._score_one(t))
        return out


def _build_json_schema(args: JsonSchemaArgs, param: str) -> JsonSchemaReward:
    return JsonSchemaReward(compile_schema(args.schema_, f"{param}.schema"))


JSON_SCHEMA = RewardKind(
    name="json_schema",
    description="1.0 if the text (or the first JSON value in it, e.g. in a ```json fence) "
    "validates against `schema`; 0.5 if it is JSON that does not validate; 0.0 if no "
    "JSON is found.",
    args=JsonSchemaArgs,
    factory=_build_json_schema,
)
