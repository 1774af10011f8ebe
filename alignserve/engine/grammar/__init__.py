"""Structured outputs: grammars that constrain what a sequence may say, for every engine.

spec.py          GrammarSpec: the constraint as engine-neutral data (JSON schema, any JSON
                 object, tool calls in the tool-call format), and what vLLM is handed for it
schema_check.py  refuse invalid schemas and those with constraints the grammar cannot enforce,
                 with the JSON path of the part at fault (GrammarError.path)
compiler.py      TokenizerGrammars: compile a spec for one tokenizer (xgrammar), bounded in size
                 and time, off the event loop, through a bounded LRU cache
matcher.py       GrammarState: one matcher per sequence (fork, sync/accept, truncate, bitmask);
                 apply_bitmask (xgrammar's CPU/Triton kernels) and its PyTorch reference

How the engines and strategies consume it (the integration after the steering refactor):

- The server builds the spec (server/structured.py), checks it (`TokenizerGrammars.check`, a 400
  naming the JSON path on GrammarError), then `await grammars.compile_async(spec)` before
  decoding, so compile time and errors are the request's, never the engine loop's.
- Steering carries the compiled grammar (`Steering.grammar: CompiledSpec`). A strategy never
  touches matchers: the native engine keeps one GrammarState per sequence beside its KV chain.
  `prefill` starts it with `compiled.new_state()`; `fork` forks it with the sequence
  (best_of_n candidates, deal beams and rollouts, vas candidates all fork); `truncate` calls
  `state.truncate(new output length)`; `extend` and commits `accept` the tokens (or the
  sampler calls `state.sync(output_ids)`, which does both and rolls back when needed).
- The native sampler's fused pass: after penalties, logit bias and contrastive/value steering,
  `mask_logits(states, logits, bitmask)` (one bitmask buffer reused per step; rows without a
  grammar are None and untouched), then top-k/top-p/sampling. The grammar mask comes last, so
  no steering term can revive a disallowed token. Once a sequence's matcher accepts the stop
  token it is finished (finish_reason stop). min_tokens must not mask the stop token when the
  grammar allows nothing else (the grammar wins: the server rejects min_tokens beyond what the
  grammar permits, or the sampler skips the min_tokens mask on completed rows); ignore_eos
  with a grammar is refused at the server.
- DeAL scores lookahead rollouts on forked states and truncates back; VAS and contrastive only
  add to logits before the mask; best_of_n samples masked candidates. Every answer of every
  strategy is therefore valid against the schema when it finishes by the stop token.
- vLLM: `vllm_structured_outputs(spec)` maps the spec to `SamplingParams.structured_outputs`
  (vllm.sampling_params.StructuredOutputsParams in 0.32: json=schema with
  disable_any_whitespace, json_object=True, or structural_tag=the same JSON the native engine
  compiles); vLLM compiles with its own xgrammar backend. Order there (0.32,
  v1/worker/gpu_model_runner.py): the model runner applies the grammar bitmask to the logits,
  then the sampler runs the V1 logits processors, then samples. So our steering processor sees
  already-masked logits and composes with the grammar only while it keeps -inf entries -inf
  (additive steering, contrastive on log-probs and the plausibility cut all do; a processor
  that rebuilt logits from a side model alone would revive masked tokens: test that seam).
  Its grammar compile errors come back as 400s from
  vLLM's validation; our `check` runs first so the 400 names the JSON path in both engines.
"""

from alignserve.engine.grammar.compiler import (
    CompiledSpec,
    GrammarCache,
    GrammarLimits,
    TokenizerGrammars,
)
from alignserve.engine.grammar.errors import (
    GrammarError,
    GrammarLimitError,
    GrammarViolation,
    render_path,
)
from alignserve.engine.grammar.matcher import (
    GrammarState,
    apply_bitmask,
    apply_bitmask_reference,
    fill_bitmasks,
    mask_logits,
    new_bitmask,
)
from alignserve.engine.grammar.schema_check import check_schema
from alignserve.engine.grammar.spec import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    GrammarSpec,
    ToolDef,
    canonical_json,
    vllm_structured_outputs,
)

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "CompiledSpec",
    "GrammarCache",
    "GrammarError",
    "GrammarLimitError",
    "GrammarLimits",
    "GrammarSpec",
    "GrammarState",
    "GrammarViolation",
    "TokenizerGrammars",
    "ToolDef",
    "apply_bitmask",
    "apply_bitmask_reference",
    "canonical_json",
    "check_schema",
    "fill_bitmasks",
    "mask_logits",
    "new_bitmask",
    "render_path",
    "vllm_structured_outputs",
]
