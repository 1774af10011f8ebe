"""Check a JSON schema before it is compiled: valid JSON Schema, and nothing in it that the
grammar engine would silently ignore.

xgrammar compiles most of JSON Schema, but some keywords it drops with a log line at most
(multipleOf, uniqueItems, not, if/then/else, oneOf taken as anyOf, unknown formats, `required`
names that `properties` does not declare, ...): outputs would then be valid JSON yet invalid
for the schema. Those are refused here with the path to the keyword, so a client learns which
part to change instead of getting answers that fail its own validation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from alignserve.engine.grammar.errors import GrammarError, Path

MAX_DEPTH = 64  # nesting of subschemas; deeper is refused before anything recurses on it

# Keywords whose constraint the grammar cannot enforce: the message says what to do instead.
UNSUPPORTED = {
    "multipleOf": "multipleOf is not supported in structured outputs",
    "contains": "contains is not supported in structured outputs",
    "minContains": "minContains is not supported in structured outputs",
    "maxContains": "maxContains is not supported in structured outputs",
    "not": "not is not supported in structured outputs",
    "if": "if/then/else is not supported in structured outputs",
    "then": "if/then/else is not supported in structured outputs",
    "else": "if/then/else is not supported in structured outputs",
    "dependentRequired": "dependentRequired is not supported in structured outputs",
    "dependentSchemas": "dependentSchemas is not supported in structured outputs",
    "dependencies": "dependencies is not supported in structured outputs",
    "propertyNames": "propertyNames is not supported in structured outputs",
    "unevaluatedProperties": "unevaluatedProperties is not supported; use additionalProperties",
    "unevaluatedItems": "unevaluatedItems is not supported; use items",
    "$dynamicRef": "$dynamicRef is not supported; use $ref to a local definition",
    "$recursiveRef": "$recursiveRef is not supported; use $ref to a local definition",
    "oneOf": "oneOf is not supported (the grammar cannot enforce exactly one); use anyOf",
}

# String formats the grammar enforces (others would be ignored).
FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
    "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})

# Keywords whose value is one subschema, a map of them, or a list of them.
ONE_SCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedProperties", "unevaluatedItems")
SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")

BOUNDS = (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
          ("minProperties", "maxProperties"))


def check_schema(schema: Any, base: Path = ()) -> None:
    """Raise GrammarError (with `base` + the path inside the schema) unless `schema` is a valid
    JSON schema whose every constraint the grammar enforces."""
    if isinstance(schema, bool):
        if not schema:
            raise GrammarError("the schema `false` matches nothing", base)
        return
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object (or a boolean)", base)
    for sub, path in _subschemas(schema, (), 0, base):  # depth first: the depth bound first
        if isinstance(sub, dict):
            _check_keywords(sub, schema, path, base)
    _check_meta(schema, base)


def _subschemas(schema: Any, path: Path, depth: int, base: Path) -> Iterator[tuple[Any, Path]]:
    """Every subschema with its path, the schema itself first. Values of enum, const, default
    and examples are data, not schemas, and are not entered."""
    if depth > MAX_DEPTH:
        raise GrammarError(f"the schema nests deeper than {MAX_DEPTH} levels", base + path)
    yield schema, path
    if not isinstance(schema, dict):
        return
    for key in ONE_SCHEMA:
        if isinstance(schema.get(key), (dict, bool)):
            yield from _subschemas(schema[key], path + (key,), depth + 1, base)
    for key in SCHEMA_MAP:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from _subschemas(sub, path + (key, name), depth + 1, base)
    for key in SCHEMA_LIST:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield from _subschemas(sub, path + (key, i), depth + 1, base)


def _check_keywords(sub: dict, root: dict, path: Path, base: Path) -> None:
    at = base + path
    for key, message in UNSUPPORTED.items():
        if key not in sub or key == "oneOf" and isinstance(sub[key], list) and len(sub[key]) <= 1:
            continue  # a oneOf of one schema is that schema
        raise GrammarError(message, at + (key,))
    if sub.get("uniqueItems") is True:
        raise GrammarError("uniqueItems is not supported in structured outputs",
                           at + ("uniqueItems",))
    if isinstance(sub.get("allOf"), list) and len(sub["allOf"]) > 1:
        raise GrammarError("allOf with more than one schema is not supported; merge them into one",
                           at + ("allOf",))
    fmt = sub.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise GrammarError(f"format {fmt!r} is not supported; supported: "
                           f"{', '.join(sorted(FORMATS))}", at + ("format",))
    if ("pattern" in sub or "format" in sub) and ("minLength" in sub or "maxLength" in sub):
        length = "minLength" if "minLength" in sub else "maxLength"
        raise GrammarError("minLength/maxLength together with pattern or format is not "
                           "supported; put the length into the pattern", at + (length,))
    patterns = sub.get("patternProperties")
    if isinstance(patterns, dict) and (len(patterns) > 1 or "properties" in sub):
        raise GrammarError("patternProperties is supported alone, with one pattern",
                           at + ("patternProperties",))
    required = sub.get("required")
    if isinstance(required, list):
        declared = sub.get("properties") if isinstance(sub.get("properties"), dict) else {}
        for i, name in enumerate(required):
            if name not in declared:
                raise GrammarError(f"required property {name!r} is not declared in `properties`",
                                   at + ("required", i))
    ref = sub.get("$ref")
    if isinstance(ref, str):
        _check_ref(ref, root, at + ("$ref",))
    for low, high in BOUNDS:
        lo, hi = sub.get(low), sub.get(high)
        if _number(lo) and _number(hi) and lo > hi:
            raise GrammarError(f"{low} ({lo}) is greater than {high} ({hi})", at + (low,))
    if isinstance(sub.get("enum"), list) and not sub["enum"]:
        raise GrammarError("enum must not be empty", at + ("enum",))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ref(ref: str, root: dict, at: Path) -> None:
    """Only references inside the schema resolve (no fetching); they must point somewhere."""
    if ref == "#":
        return
    if not ref.startswith("#/"):
        raise GrammarError("only local references (`#/...`) are supported", at)
    node: Any = root
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise GrammarError(f"the reference {ref!r} points at nothing in this schema", at)


def _check_meta(schema: dict, base: Path) -> None:
    """Validate against the JSON Schema meta-schema of its `$schema` (2020-12 by default)."""
    from jsonschema import Draft202012Validator, exceptions, validators

    cls = validators.validator_for(schema, default=Draft202012Validator)
    meta = cls(cls.META_SCHEMA)
    error = exceptions.best_match(meta.iter_errors(schema))
    if error is not None:
        raise GrammarError(f"not a valid JSON schema: {error.message}",
                           base + tuple(error.absolute_path))
