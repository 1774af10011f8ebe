"""The grammar on the real embedded model: `SamplingParams.grammar` on forked sequences (as a
strategy's branches are); the engine keeps one GrammarState per sequence and masks the logits
in its fused pass. Every sampled answer must then parse, validate against the schema and end by
the stop token (a matcher replayed on each answer afterwards accepts it and terminates)."""

from __future__ import annotations

import asyncio
import json

import jsonschema

from alignserve.engine.grammar import GrammarSpec, TokenizerGrammars, ToolDef, canonical_json
from alignserve.engine.protocol import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
}


def sample_constrained(engine, messages, spec, n=4, max_tokens=96, seed=7):
    grammars = TokenizerGrammars(engine.tokenizer, engine.vocab_size)
    compiled = grammars.compile(spec)
    prompt = engine.encode_chat(messages)[1]

    async def go():
        root = await engine.prefill(prompt)
        seqs = await engine.fork(root, n)
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed,
                                grammar=compiled)
        try:
            async for _ in engine.generate(seqs, params):
                pass
            states = {s.key: compiled.new_state() for s in seqs}
            for s in seqs:  # replayed: every token was allowed, the last one ends the grammar
                states[s.key].sync(s.output_ids)
            return [(s.output_ids, s.text, s.finish_reason) for s in seqs], states
        finally:
            await engine.release(seqs + [root])

    try:
        return asyncio.run_coroutine_threadsafe(go(), engine.loop).result(600)
    finally:
        grammars.close()


def test_every_sampled_answer_is_valid_json_for_the_schema(live_server):
    engine = live_server.engine
    spec = GrammarSpec(response="json_schema", schema=canonical_json(SCHEMA))
    messages = [{"role": "user", "content": "Describe a person as JSON with name, age and "
                                            "favourite color."}]
    results, states = sample_constrained(engine, messages, spec)
    eos = engine.tokenizer.eos_token_id
    texts = set()
    for ids, text, reason in results:
        assert reason == "stop" and ids[-1] == eos, (reason, text)
        jsonschema.validate(json.loads(text), SCHEMA)
        texts.add(text)
    assert all(st.terminated for st in states.values())
    assert len(texts) > 1  # sampled, not one answer four times


def test_required_tool_call_comes_out_parseable(live_server):
    engine = live_server.engine
    weather = ToolDef("get_weather", canonical_json({
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"]}))
    spec = GrammarSpec(tools=(weather,), tool_mode="required", parallel=False)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    results, _ = sample_constrained(engine, messages, spec, n=2, max_tokens=64)
    for ids, text, reason in results:
        assert reason == "stop", text
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
        assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
