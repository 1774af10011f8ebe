"""The grammar on the real embedded model, without touching engine code: a logits processor
keeps one GrammarState per sequence (forked from the prompt's, as a strategy's branches are),
syncs it with the sequence's output before each step and masks the logits. Every sampled
answer must then parse, validate against the schema and end by the stop token."""

from __future__ import annotations

import asyncio
import json

import jsonschema

from alignserve.engine.grammar import (
    GrammarSpec,
    TokenizerGrammars,
    ToolDef,
    canonical_json,
    mask_logits,
    new_bitmask,
)
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


def grammar_processor(states: dict, vocab: int):
    """A processor for `engine.generate`: rows follow `states[handle.key]`."""
    buffer = new_bitmask(16, vocab)

    def processor(seqs, logits, inputs):
        rows = [states[s.key] for s in seqs]
        for s, state in zip(seqs, rows):
            state.sync(s.output_ids)
        return mask_logits(rows, logits, buffer)

    return processor


def sample_constrained(engine, messages, spec, n=4, max_tokens=96, seed=7):
    grammars = TokenizerGrammars(engine.tokenizer, engine.vocab_size)
    compiled = grammars.compile(spec)
    prompt = engine.encode_chat(messages)[1]

    async def go():
        root = await engine.prefill(prompt)
        seqs = await engine.fork(root, n)
        root_state = compiled.new_state()
        states = {s.key: st for s, st in zip(seqs, root_state.fork(n))}
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed)
        try:
            async for _ in engine.generate(seqs, params,
                                           processor=grammar_processor(states, engine.vocab_size)):
                pass
            for s in seqs:  # the last token (the stop) comes after the last processor call
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
