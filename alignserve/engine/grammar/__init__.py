"""Structured outputs: grammars that constrain what a sequence may say, for every engine.

spec.py          GrammarSpec: the constraint as engine-neutral data (JSON schema, any JSON
                 object, tool calls in the tool-call format), and what vLLM is handed for it
schema_check.py  refuse invalid schemas and those with constraints the grammar cannot enforce,
                 with the JSON path of the part at fault (GrammarError.path)
compiler.py      TokenizerGrammars: compile a spec for one tokenizer (xgrammar), bounded in size
                 and time, off the event loop, through a bounded LRU cache
matcher.py       GrammarState: one matcher per sequence (fork, sync/accept, truncate, bitmask);
                 apply_bitmask (xgrammar's CPU/Triton kernels) and its PyTorch reference

How the engines and strategies consume it, as built:

- The server builds the spec (server/structured.py), refuses what a grammar cannot be combined
  with (server/prepare.py: ignore_eos, stop strings, strategies vLLM cannot hold), checks it
  (`TokenizerGrammars.check`, a 400 naming the JSON path on GrammarError), then
  `await grammars.compile_async(spec)` (server/grammars.py) before decoding, so compile time
  and errors are the request's, never the engine loop's. The CompiledSpec rides in
  `SamplingParams.grammar` (data, no callables); strategies pass it on to every generate.
- Native engine: one GrammarState per sequence (`SeqState.grammar`), started by the sampler on
  a sequence's first constrained step; `fork` forks it with the sequence (best_of_n
  candidates, DeAL rollouts, VAS candidates, particles), `truncate` rolls it back, and the
  sampler's `sync` before each step accepts what `extend` fed. The sampler fills the bitmask
  once per step and applies it twice: before steering (a processor chooses among allowed
  tokens: VAS's top-k, contrastive's plausible set, DeAL's captured distributions) and last,
  after penalties, bias and min_tokens, so nothing revives a disallowed token. A token the
  grammar rejects never raises there: a sampled one falls back to the model's best allowed
  token (`allowed_argmax`), a fed one ends the sequence with finish_reason "abort".
- Strategies that choose tokens themselves keep their own matchers: DeAL's beams (actions are
  the top_k of the masked log-probs, committed tokens advance a forked matcher), and the
  contrastive lockstep loop with a served amateur (one per row, as a sampler).
- vLLM: `vllm_structured_outputs(spec)` maps the spec to `SamplingParams.structured_outputs`
  (json=schema, json_object=True, or structural_tag=the same JSON the native engine
  compiles); vLLM compiles with its own xgrammar backend, started with
  disable_any_whitespace. Order there (0.32, v1/worker/gpu_model_runner.py): the model
  runner applies the grammar bitmask to the logits, then the sampler runs the V1 logits
  processors, then samples; our processor keeps every -inf (additive VAS on the masked top-k,
  contrastive on log-probs with the plausibility cut), so it composes. vLLM's grammar starts
  at a request's first generated token, so only strategies that generate each answer whole in
  one request (sample, best_of_n, vas, contrastive) are served with it there.
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
    allowed_argmax,
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
    "allowed_argmax",
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
