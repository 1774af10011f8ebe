"""The native engine's own grammar path (SamplingParams.grammar): one matcher per sequence,
forked with `fork` mid-answer and rolled back with `truncate`, its mask applied last in the
sampler. Branches that continue a half-written answer from a fork or a truncation must finish
it validly, which fails if a branch's matcher is shared with another or out of step with its
tokens."""

from __future__ import annotations

import asyncio
import json

import jsonschema

from alignserve.engine.grammar import GrammarSpec, TokenizerGrammars, canonical_json
from alignserve.engine.protocol import SamplingParams

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "color": {"enum": ["red", "green", "blue"]}},
          "required": ["name", "color"], "additionalProperties": False}


def test_fork_and_truncate_keep_each_branch_valid(live_server):
    engine = live_server.engine
    compiled = TokenizerGrammars(engine.tokenizer, engine.vocab_size,
                                 stop_token_ids=sorted(engine.eos_token_ids)).compile(
        GrammarSpec(response="json_schema", schema=canonical_json(SCHEMA)))
    prompt = engine.encode_chat([{"role": "user", "content": "A person as JSON."}])[1]

    async def finish(seqs, seed):
        params = SamplingParams(temperature=1.0, max_tokens=64, seed=seed, grammar=compiled)
        async for _ in engine.generate(seqs, params):
            pass

    async def go():
        root = await engine.prefill(prompt)
        head = SamplingParams(temperature=1.0, max_tokens=4, seed=1, grammar=compiled)
        async for _ in engine.generate([root], head):  # a half-written answer
            pass
        assert root.finish_reason == "length"
        # the last sampled token was never fed: step back one and feed it (DeAL's pattern)
        last = root.output_ids[-1]
        await engine.truncate(root, len(root.token_ids) - 1)
        await engine.extend([root], [[last]])
        branches = await engine.fork(root, 3)
        matchers = [engine._states[s.key].grammar for s in [root] + branches]
        assert len({id(m) for m in matchers}) == 4  # forked with the KV, one each
        # rolled back with the truncate (the fed token is accepted at the next step's sync)
        assert all(m.tokens == root.output_ids[:-1] for m in matchers)
        await finish(branches, seed=11)
        # roll one branch back to the fork point plus one token and finish it again
        back = branches[0]
        fifth = back.output_ids[4]
        await engine.truncate(back, root.prompt_len + 4)
        await engine.extend([back], [[fifth]])
        await finish([back], seed=23)
        out = [(s.text, s.finish_reason, s.output_ids[:4]) for s in branches]
        await engine.release(branches + [root])
        return root.output_ids, out

    head_ids, out = asyncio.run_coroutine_threadsafe(go(), engine.loop).result(600)
    for text, reason, prefix in out:
        assert prefix == head_ids  # every branch continued the shared half answer
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
