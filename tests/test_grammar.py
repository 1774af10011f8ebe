"""Structured-output grammars (alignserve/engine/grammar) with the real xgrammar and the embedded
model's real tokenizer: what a compiled grammar lets through, matcher forks and rollbacks, the
mask kernels against their PyTorch reference, the cache and the size/time bounds, and the errors
that name the JSON path at fault."""

from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import pytest
import torch

from alignserve.engine.grammar import (
    GrammarCache,
    GrammarError,
    GrammarLimitError,
    GrammarLimits,
    GrammarSpec,
    GrammarViolation,
    TokenizerGrammars,
    ToolDef,
    apply_bitmask,
    apply_bitmask_reference,
    canonical_json,
    check_schema,
    mask_logits,
    new_bitmask,
    vllm_structured_outputs,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}]},
    },
    "required": ["name", "age", "color"],
}
WEATHER = ToolDef("get_weather", canonical_json({
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["C", "F"]}},
    "required": ["city"]}))
TIME = ToolDef("get_time")


@pytest.fixture(scope="module")
def tokenizer(native_engine):
    return native_engine.tokenizer


@pytest.fixture(scope="module")
def grammars(tokenizer, native_engine):
    g = TokenizerGrammars(tokenizer, native_engine.vocab_size)
    yield g
    g.close()


def schema_spec(schema, strict=None) -> GrammarSpec:
    return GrammarSpec(response="json_schema", schema=canonical_json(schema), strict=strict)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def allowed(state, vocab: int) -> torch.Tensor:
    """The state's next-token mask as a bool vector (through the reference unpacking)."""
    mask = new_bitmask(1, vocab)
    state.fill(mask, 0)
    return apply_bitmask_reference(torch.zeros(1, vocab), mask)[0] == 0


def drive(state, tokens, vocab: int, eos: int, stops_inside: bool = False) -> None:
    """Feed a valid encoding token by token: the mask must allow each token before it comes,
    and (unless `stops_inside`: several calls, each a whole answer) must not allow the stop
    token until the document is whole."""
    for i, token in enumerate(tokens):
        ok = allowed(state, vocab)
        assert ok[token], f"token {i} ({token}) masked"
        assert stops_inside or not ok[eos], f"stop allowed after {i} of {len(tokens)} tokens"
        state.accept(token)
    assert allowed(state, vocab)[eos] and state.completed
    state.accept(eos)
    assert state.terminated


# ---------------------------------------------------------------------------- what passes


VALID_PEOPLE = [
    {"name": "Ada", "age": 36, "color": "blue"},
    {"name": "Bob Lee", "age": 0, "color": "red", "tags": ["x", "why"], "pet": None},
    {"name": "", "age": 120, "color": "green", "tags": [], "pet": {"kind": "cat"}},
]


@pytest.mark.parametrize("doc", VALID_PEOPLE)
def test_valid_documents_are_never_masked(grammars, tokenizer, native_engine, doc):
    state = grammars.compile(schema_spec(PERSON)).new_state()
    drive(state, ids(tokenizer, json.dumps(doc)), native_engine.vocab_size,
          tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def pieces(tokenizer, native_engine) -> list[str]:
    """Each token id's text."""
    return [tokenizer.decode([i]) for i in range(native_engine.vocab_size)]


@pytest.mark.parametrize("prefix, bad, why", [
    ('{"name": "Ada", "age": ', '"', "a string where the integer goes"),
    ('{"name": "Ada", "age": 36, "color": "', "pur", "a value outside the enum"),
    ('{"name": "Ada", "age": 36', "}", "closing before the required color"),
    ('{"name": "Ada", "age": 3', "", "a stop token inside the document"),
    ("", "[", "an array where an object goes"),
    ('{"name": "Ada", "age": 36, "color": "red", "', "extra", "a property the schema lacks"),
    ('{"name": "Ada", "age": 12', "1", "an integer above the maximum (121)"),
])
def test_invalid_continuations_are_masked(grammars, tokenizer, native_engine, pieces, prefix,
                                          bad, why):
    state = grammars.compile(schema_spec(PERSON)).new_state()
    for token in ids(tokenizer, prefix):
        state.accept(token)
    ok = allowed(state, native_engine.vocab_size)
    assert ok.any()
    if bad == "":
        assert not ok[tokenizer.eos_token_id], why
        return
    # every token that would begin writing `bad` is masked
    starts = [i for i, piece in enumerate(pieces) if piece and bad.startswith(piece)]
    assert starts and not ok[starts].any(), why


def test_sampled_documents_all_validate(grammars, native_engine, tokenizer):
    """Random logits through the mask: every document the grammar lets out of 8 validates."""
    vocab, eos = native_engine.vocab_size, tokenizer.eos_token_id
    compiled = grammars.compile(schema_spec(PERSON))
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        state, out = compiled.new_state(), []
        while not state.terminated:
            assert len(out) < 400, "the grammar never let the document end"
            logits = mask_logits([state], torch.randn(1, vocab, generator=gen) * 4)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            state.accept(token)
            out.append(token)
        assert out[-1] == eos
        jsonschema.validate(json.loads(tokenizer.decode(out[:-1])), PERSON)


def test_json_object_is_any_object(grammars, tokenizer, native_engine):
    spec = GrammarSpec(response="json_object")
    for doc in ({}, {"a": [1, 2.5, None]}, {"x": {"y": "z", "t": True}}):
        drive(grammars.compile(spec).new_state(), ids(tokenizer, json.dumps(doc)),
              native_engine.vocab_size, tokenizer.eos_token_id)
    state = grammars.compile(spec).new_state()
    ok = allowed(state, native_engine.vocab_size)
    assert not ok[ids(tokenizer, "[")[0]] and not ok[ids(tokenizer, '"')[0]]


def test_strict_false_lets_unnamed_properties_through(grammars, tokenizer, native_engine):
    doc = ids(tokenizer, json.dumps({"name": "A", "age": 1, "color": "red", "mood": 2}))
    loose = grammars.compile(schema_spec(PERSON, strict=False)).new_state()
    drive(loose, doc, native_engine.vocab_size, tokenizer.eos_token_id)
    tight = grammars.compile(schema_spec(PERSON)).new_state()
    with pytest.raises(GrammarViolation):
        for token in doc:
            tight.accept(token)


# ---------------------------------------------------------------------------- tool calls


def call_text(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def test_required_tools_allow_only_calls(grammars, tokenizer, native_engine):
    vocab, eos = native_engine.vocab_size, tokenizer.eos_token_id
    spec = GrammarSpec(tools=(WEATHER, TIME), tool_mode="required")
    one = call_text("get_weather", {"city": "Paris", "unit": "C"})
    two = one + "\n" + call_text("get_time", {})
    drive(grammars.compile(spec).new_state(), ids(tokenizer, one), vocab, eos)
    drive(grammars.compile(spec).new_state(), ids(tokenizer, two), vocab, eos, stops_inside=True)
    start = allowed(grammars.compile(spec).new_state(), vocab)
    assert not start[ids(tokenizer, "Hello")[0]] and not start[eos]
    state = grammars.compile(spec).new_state()
    with pytest.raises(GrammarViolation):  # arguments without the required city
        for token in ids(tokenizer, call_text("get_weather", {"unit": "C"})):
            state.accept(token)


def test_named_tool_and_no_parallel_calls(grammars, tokenizer, native_engine):
    vocab, eos = native_engine.vocab_size, tokenizer.eos_token_id
    spec = GrammarSpec(tools=(TIME,), tool_mode="required", parallel=False)
    state = grammars.compile(spec).new_state()
    for token in ids(tokenizer, call_text("get_time", {})):
        state.accept(token)
    assert allowed(state, vocab).nonzero().flatten().tolist() == [eos]  # one call, then stop
    state = grammars.compile(spec).new_state()
    with pytest.raises(GrammarViolation):
        for token in ids(tokenizer, call_text("get_weather", {"city": "Rome"})):
            state.accept(token)


def test_auto_tools_allow_text_and_calls(grammars, tokenizer, native_engine):
    vocab, eos = native_engine.vocab_size, tokenizer.eos_token_id
    spec = GrammarSpec(tools=(WEATHER,), tool_mode="auto")
    for text in ("It is sunny today.", call_text("get_weather", {"city": "Oslo"}),
                 "Let me check. " + call_text("get_weather", {"city": "Oslo"})):
        state = grammars.compile(spec).new_state()
        for token in ids(tokenizer, text):
            assert allowed(state, vocab)[token]
            state.accept(token)
        state.accept(eos)
        assert state.terminated
    state = grammars.compile(spec).new_state()  # once a call opens, it must be a valid call
    for token in ids(tokenizer, "<tool_call>\n"):
        state.accept(token)
    assert not allowed(state, vocab)[eos]


def test_auto_tools_with_a_json_answer(grammars, tokenizer, native_engine):
    vocab, eos = native_engine.vocab_size, tokenizer.eos_token_id
    spec = GrammarSpec(response="json_schema", schema=canonical_json(PERSON),
                       tools=(WEATHER,), tool_mode="auto")
    for text in (json.dumps(VALID_PEOPLE[0]), call_text("get_weather", {"city": "Oslo"})):
        drive(grammars.compile(spec).new_state(), ids(tokenizer, text), vocab, eos)
    assert not allowed(grammars.compile(spec).new_state(), vocab)[ids(tokenizer, "Sure")[0]]


# ---------------------------------------------------------------------------- matchers


def test_fork_gives_independent_states(grammars, tokenizer, native_engine):
    vocab, eos = native_engine.vocab_size, tokenizer.eos_token_id
    root = grammars.compile(schema_spec(PERSON)).new_state()
    prefix = ids(tokenizer, '{"name": "Ada", "age": ')
    for token in prefix:
        root.accept(token)
    a, b = root.fork(2)
    rest_a = ids(tokenizer, '7, "color": "red"}')
    rest_b = ids(tokenizer, '99, "color": "blue", "tags": ["q"]}')
    drive(a, rest_a, vocab, eos)
    drive(b, rest_b, vocab, eos)
    assert a.tokens == prefix + rest_a + [eos] and b.tokens == prefix + rest_b + [eos]
    assert root.tokens == prefix and not root.terminated  # the parent did not move
    drive(root, rest_b, vocab, eos)


def test_truncate_and_sync_roll_back(grammars, tokenizer, native_engine):
    vocab, eos = native_engine.vocab_size, tokenizer.eos_token_id
    state = grammars.compile(schema_spec(PERSON)).new_state()
    first = ids(tokenizer, '{"name": "Ada", "age": 36, "color": "red"}')
    second = ids(tokenizer, '{"name": "Ada", "age": 5, "color": "green"}')
    common = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
    state.sync(first)
    assert state.completed
    state.truncate(common)  # back into the middle (DeAL's rollback)
    assert state.tokens == first[:common] and not state.completed
    drive(state, second[common:], vocab, eos)
    state.sync(second[:3])  # a shorter, different history: roll back, nothing to accept
    assert state.tokens == second[:3] and not state.terminated
    state.sync(first)  # diverging again: roll back to the common part, accept the rest
    assert state.tokens == first and state.completed
    with pytest.raises(ValueError):
        state.rollback(len(first) + 1)


# ---------------------------------------------------------------------------- the mask kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bitmask_matches_the_reference(grammars, tokenizer, native_engine, dtype):
    vocab = native_engine.vocab_size
    compiled = grammars.compile(schema_spec(PERSON))
    states = [compiled.new_state() for _ in range(4)]
    for state, text in zip(states, ['{"name": "A', '{"name": "Ada", "age": 3', "",
                                    '{"name": "x", "age": 1, "color": "red"}']):
        for token in ids(tokenizer, text):
            state.accept(token)
    mask = new_bitmask(4, vocab)
    for i, state in enumerate(states):
        state.fill(mask, i)
    logits = torch.randn(4, vocab).to(dtype)
    for rows in (None, [0, 2], [3]):
        want = apply_bitmask_reference(logits, mask, rows)
        got = apply_bitmask(logits.clone(), mask, rows)
        assert torch.equal(got, want)
        touched = range(4) if rows is None else rows
        for r in range(4):
            assert torch.isinf(got[r]).any() == (r in touched)
    # rows the grammar leaves free are skipped; None rows (unconstrained requests) too
    free = compiled.new_state().fork(1)[0]
    out = mask_logits([None, free], logits.float().clone())
    assert torch.equal(out[0], logits.float()[0]) and torch.isinf(out[1]).any()


# ---------------------------------------------------------------------------- cache and limits


def test_cache_hits_misses_and_eviction(tokenizer, native_engine):
    cache = GrammarCache(max_entries=2)
    g = TokenizerGrammars(tokenizer, native_engine.vocab_size, cache=cache)
    try:
        a = schema_spec(PERSON)
        reordered = dict(reversed(list(PERSON.items())))  # same schema, keys in another order
        first = g.compile(a)
        assert g.compile(schema_spec(PERSON)) is first and (cache.hits, cache.misses) == (1, 1)
        assert g.compile(schema_spec(reordered)) is not first and cache.misses == 2
        g.compile(GrammarSpec(response="json_object"))  # a third entry evicts the oldest
        assert len(cache) == 2
        assert g.compile(a) is not first and cache.misses == 4
        other = TokenizerGrammars(tokenizer, native_engine.vocab_size, cache=cache)
        assert other.fingerprint == g.fingerprint  # the same tokenizer shares entries
        assert other.compile(a) is g.compile(a)
        other.close()
        bad = schema_spec({"type": "string", "pattern": "(("})
        for attempt in (1, 2):  # failed compiles are not kept: the retry compiles again
            misses = cache.misses
            with pytest.raises(GrammarError):
                g.compile(bad)
            assert cache.misses == misses + 1
    finally:
        g.close()


def test_schema_size_is_bounded(tokenizer, native_engine):
    g = TokenizerGrammars(tokenizer, native_engine.vocab_size,
                          limits=GrammarLimits(max_grammar_bytes=200))
    try:
        small = schema_spec({"type": "object", "properties": {"a": {"type": "integer"}}})
        g.compile(small)
        big = GrammarSpec(tools=tuple(ToolDef(f"f{i}", canonical_json(PERSON)) for i in range(2)),
                          tool_mode="auto")
        with pytest.raises(GrammarLimitError) as err:
            g.compile(big)
        assert err.value.limit == "max_grammar_bytes" and str(big.schema_bytes) in str(err.value)
    finally:
        g.close()


def big_schema(n: int) -> dict:
    props = {f"field_{i}": {"type": "string", "enum": [f"v{i}_{j}" for j in range(20)]}
             for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props)}


def test_compile_time_is_bounded_and_off_the_event_loop(tokenizer, native_engine):
    """A compile past the timeout is a GrammarLimitError; the compile goes on in its thread,
    and a retry waits on that same compile (a cache hit) rather than starting another."""
    g = TokenizerGrammars(tokenizer, native_engine.vocab_size,
                          limits=GrammarLimits(grammar_compile_timeout=0.001,
                                               max_grammar_bytes=10**6))
    spec = schema_spec(big_schema(300))  # ~77 kB: hundreds of ms to compile here

    async def run():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        ticker = asyncio.create_task(tick())
        with pytest.raises(GrammarLimitError) as err:
            await g.compile_async(spec)
        assert err.value.limit == "grammar_compile_timeout"
        before = ticks
        g.limits = GrammarLimits(grammar_compile_timeout=120, max_grammar_bytes=10**6)
        compiled = await g.compile_async(spec)
        ticker.cancel()
        return compiled, ticks - before

    try:
        compiled, ticks = asyncio.run(run())
        assert ticks > 0  # the loop ran other tasks while the compile was in flight
        assert (g.cache.hits, g.cache.misses) == (1, 1)
        assert compiled.new_state().tokens == []
    finally:
        g.close()


# ---------------------------------------------------------------------------- errors with paths


@pytest.mark.parametrize("schema, path, words", [
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}},
     ("properties", "n", "multipleOf"), "multipleOf"),
    ({"type": "array", "items": {"not": {"type": "string"}}}, ("items", "not"), "not"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, ("oneOf",), "anyOf"),
    ({"type": "object", "properties": {"e": {"type": "string", "format": "hostname-ish"}}},
     ("properties", "e", "format"), "hostname-ish"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}, ("required", 1),
     "'b'"),
    ({"$ref": "https://example.com/schema.json"}, ("$ref",), "local"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
     ("properties", "x", "$ref"), "points at nothing"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, ("minimum",), "greater"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, ("properties", "a", "type"),
     "not a valid JSON schema"),
    ({"type": "array", "items": {"type": "string", "pattern": "^a+$", "maxLength": 3}},
     ("items", "maxLength"), "pattern"),
    ({"allOf": [{"type": "string"}, {"enum": ["a"]}]}, ("allOf",), "merge"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ("uniqueItems",),
     "uniqueItems"),
    (False, (), "matches nothing"),
    ([1, 2], (), "must be an object"),
])
def test_unsupported_or_invalid_schemas_name_their_path(schema, path, words):
    with pytest.raises(GrammarError) as err:
        check_schema(schema, ("response_format", "json_schema", "schema"))
    assert err.value.path == ("response_format", "json_schema", "schema") + path
    assert words in err.value.message


def test_data_inside_enum_and_const_is_not_read_as_schema():
    check_schema({"enum": [{"multipleOf": 3}], "const": {"not": 1},
                  "default": {"oneOf": []}, "examples": [{"if": 1}]})


def test_too_deep_schemas_are_refused():
    schema: dict = {"type": "integer"}
    for _ in range(100):
        schema = {"type": "array", "items": schema}
    with pytest.raises(GrammarError) as err:
        check_schema(schema)
    assert "deeper" in err.value.message and err.value.path[:2] == ("items", "items")


def test_compile_errors_point_at_the_spec_part(grammars):
    bad_pattern = {"type": "object", "properties": {"z": {"type": "string", "pattern": "(("}}}
    with pytest.raises(GrammarError) as err:
        grammars.compile(schema_spec(bad_pattern))
    assert err.value.path == ("schema", "properties", "z", "pattern")
    assert err.value.param == "schema.properties.z.pattern"
    spec = GrammarSpec(tools=(WEATHER, ToolDef("bad", canonical_json(
        {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}))),
        tool_mode="required")
    with pytest.raises(GrammarError) as err:
        grammars.compile(spec)
    assert err.value.param == "tools[1].parameters.properties.n.multipleOf"


# ---------------------------------------------------------------------------- the spec


def test_spec_keys_and_vllm_mapping():
    a = schema_spec(PERSON)
    assert a == schema_spec(json.loads(json.dumps(PERSON))) and a.key == schema_spec(PERSON).key
    assert a.key != schema_spec(PERSON, strict=False).key
    assert vllm_structured_outputs(a) == {"json": PERSON}
    assert vllm_structured_outputs(GrammarSpec(response="json_object")) == {"json_object": True}
    tools = GrammarSpec(tools=(WEATHER,), tool_mode="required", parallel=False)
    tag = json.loads(vllm_structured_outputs(tools)["structural_tag"])
    assert tag == tools.structural_tag() and tag["format"]["stop_after_first"] is True
    with pytest.raises(ValueError):
        GrammarSpec()  # constrains nothing: no spec at all
    with pytest.raises(ValueError):
        GrammarSpec(tools=(WEATHER, WEATHER), tool_mode="auto")
    with pytest.raises(ValueError):
        GrammarSpec(response="json_schema")


def test_random_ordering_of_the_state_api_stays_consistent(grammars, tokenizer):
    """Interleaved forks, accepts and truncates: each state's mask is the mask of a fresh state
    fed the same tokens."""
    compiled = grammars.compile(schema_spec(PERSON))
    doc = ids(tokenizer, json.dumps(VALID_PEOPLE[1]))
    rng = random.Random(0)
    states = [compiled.new_state()]
    vocab = grammars.vocab_size
    for _ in range(40):
        s = rng.choice(states)
        op = rng.random()
        if op < 0.5 and len(s.tokens) < len(doc):
            s.accept(doc[len(s.tokens)])
        elif op < 0.7:
            states.extend(s.fork(1))
        else:
            s.truncate(rng.randrange(len(s.tokens) + 1))
    for s in states:
        fresh = compiled.new_state()
        fresh.sync(s.tokens)
        assert torch.equal(allowed(s, vocab), allowed(fresh, vocab))
