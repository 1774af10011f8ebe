"""Structured outputs inside every strategy on the native engine: the live server, the real
embedded model, the official openai client. Each strategy's answers (a JSON schema, a named
tool call) must parse and validate, finishing by the stop token: that fails if a branch's
matcher is not forked with its KV (best_of_n candidates, DeAL beams and rollouts, particles),
not rolled back with `truncate` (DeAL's lookahead, the segment searches' pending token), or if
steering picks outside the mask (VAS's candidates, contrastive's plausible set, DeAL's actions).

The served-amateur kind of contrastive (a lockstep loop in the strategy, which keeps its own
matchers) runs at the decoding level with the live engine as its own amateur, as
tests/test_strategy_contrastive.py does; the live server serves no second model.

Also here: what happens when the grammar rejects a token inside the engine step (never an
exception: a fallback to the best allowed token, or finish_reason "abort")."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from structured_cases import ASK, KEYWORDS, SMALL, SMALL_FORMAT, WEATHER, WEATHER_ASK

from alignserve.engine.grammar import GrammarSpec, TokenizerGrammars, canonical_json
from alignserve.engine.protocol import SamplingParams

# every strategy the native engine serves, small enough for two busy cores
STRATEGIES = {
    "deal": {"strategy": "deal", "rewards": [KEYWORDS], "top_k": 2, "lookahead": 4,
             "commit": 4},
    "deal_commit_1": {"strategy": "deal", "top_k": 2, "lookahead": 2, "commit": 1},
    "vas": {"strategy": "vas", "top_k": 5},
    "vas_candidates": {"strategy": "vas", "candidates": 2, "rewards": [KEYWORDS]},
    "contrastive_self": {"strategy": "contrastive", "amateur": "self:8"},
    "contrastive_lame_prompt": {"strategy": "contrastive", "amateur": "lame_prompt"},
    "speculative_rejection": {"strategy": "speculative_rejection", "candidates": 4,
                              "rewards": [KEYWORDS]},
    "particle_filter": {"strategy": "particle_filter", "candidates": 4, "segment": "entropy",
                        "rewards": [KEYWORDS]},
}
MAX = 40  # the schemas bound every string: enough for each answer to end by the stop token


@pytest.mark.parametrize("config", list(STRATEGIES))
def test_json_schema_in_every_strategy(client, model_name, config):
    r = client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=MAX, temperature=0.8, seed=3,
        response_format=SMALL_FORMAT, extra_body={"alignment": STRATEGIES[config]})
    (choice,) = r.choices
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), SMALL)
    assert r.model_extra["alignment"]["strategy"] == STRATEGIES[config]["strategy"]


@pytest.mark.parametrize("config", ["deal", "vas", "contrastive_self",
                                    "speculative_rejection", "particle_filter"])
def test_tool_call_in_every_strategy(client, model_name, config):
    stream = config in ("deal", "particle_filter")  # the agreed-prefix streams, reassembled
    kw = {"model": model_name, "messages": WEATHER_ASK, "tools": [WEATHER],
          "max_tokens": MAX + 16, "parallel_tool_calls": False, "temperature": 0.8, "seed": 5,
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
          "extra_body": {"alignment": STRATEGIES[config]}}
    if stream:
        with client.beta.chat.completions.stream(**kw) as s:
            for _ in s:
                pass
            r = s.get_final_completion()
    else:
        r = client.chat.completions.create(**kw)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments),
                        WEATHER["function"]["parameters"])


def _compiled(engine, schema=SMALL):
    grammars = TokenizerGrammars(engine.tokenizer, engine.vocab_size,
                                 stop_token_ids=sorted(engine.eos_token_ids))
    return grammars.compile(GrammarSpec(response="json_schema", schema=canonical_json(schema)))


def test_served_amateur_lockstep_keeps_the_grammar(live_server):
    """contrastive with a served amateur (the strategy samples itself): every row valid."""
    from alignserve.decoding import STRATEGIES as REGISTRY
    from alignserve.decoding.base import ChoiceFinal, DecodeContext, DecodeRequest
    from alignserve.decoding.resources import DecodingResources
    from alignserve.rewardmodels.compose import RewardRegistry

    engine = live_server.engine
    text, ids = engine.encode_chat(ASK)
    sampling = SamplingParams(temperature=0.9, max_tokens=MAX, seed=11,
                              grammar=_compiled(engine))
    request = DecodeRequest("r", ids, text, sampling, 2, "contrastive",
                            REGISTRY["contrastive"].params.model_validate({"amateur": "twin",
                                                                           "beta": 0.5}),
                            RewardRegistry.default().build(None), messages=ASK)

    async def go():
        ctx = DecodeContext(engine, request,
                            resources=DecodingResources(amateurs={"twin": engine}))
        return [e async for e in REGISTRY["contrastive"].run(ctx)]

    events = asyncio.run_coroutine_threadsafe(go(), engine.loop).result(600)
    finals = [e for e in events if isinstance(e, ChoiceFinal)]
    assert len(finals) == 2
    for final in finals:
        assert final.finish_reason == "stop", final.text
        jsonschema.validate(json.loads(final.text), SMALL)


def test_rejected_tokens_never_raise_in_the_engine(live_server):
    """A sequence fed a token its grammar rejects ends with finish_reason "abort", and its
    neighbours in the same step are unaffected. (A sampled token cannot leave the grammar: the
    fused pass applies the mask last and takes the plausible set and VAS's candidates among
    allowed tokens; the sampler's fallback covers only non-finite logits.)"""
    engine = live_server.engine
    compiled = _compiled(engine)
    prompt = engine.encode_chat(ASK)[1]
    brace = engine.encode("{")[-1]
    letter = engine.encode("x")[-1]  # never allowed where a JSON key starts

    async def go():
        root = await engine.prefill(prompt)
        b, c = await engine.fork(root, 2)
        await engine.release([root])
        params = SamplingParams(temperature=0.0, max_tokens=MAX, grammar=compiled)
        # b is fed a rejected token mid-answer; c generates beside it in the same group
        await engine.extend([b], [[brace, letter]])
        async for _ in engine.generate([b, c], params):
            pass
        out = [(s.text, s.finish_reason) for s in (b, c)]
        await engine.release([b, c])
        return out

    (_, b_reason), (c_text, c_reason) = (
        asyncio.run_coroutine_threadsafe(go(), engine.loop).result(600))
    assert b_reason == "abort"
    assert c_reason == "stop", c_text
    jsonschema.validate(json.loads(c_text), SMALL)
    assert engine.healthy()


def _error(http, body: dict) -> tuple[int, dict]:
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
    return r.status_code, r.json().get("error", {})


def test_stop_strings_with_a_grammar_are_refused(http, native_engine):
    status, err = _error(http, {"response_format": {"type": "json_object"}, "stop": ["}"]})
    assert (status, err["param"]) == (400, "stop"), err
    status, err = _error(http, {"tools": [WEATHER], "stop_token_ids": [5]})
    assert (status, err["param"]) == (400, "stop_token_ids"), err
    # the end token itself ends nothing early: accepted
    eos = min(native_engine.eos_token_ids)
    status, err = _error(http, {"response_format": {"type": "json_object"},
                                "stop_token_ids": [eos]})
    assert status == 200, err
