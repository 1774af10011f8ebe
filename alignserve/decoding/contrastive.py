"""`contrastive`: contrastive decoding, expert minus amateur (O'Brien & Lewis 2023).

Each step, with s = log-softmax of the next-token logits, a token scores

    (1 + beta) * s_expert - beta * s_amateur   on the plausible set {s_expert >= log(alpha) + max s_expert}
    -inf                                       elsewhere,

and the request's sampling fields (temperature, top_p, top_k, min_p, seed) apply to these
scores: temperature 0 takes their argmax. Log-probs reported for a token are the expert's.
The strategy hands the engine a `ContrastiveSteer` (engine.steering) and the engine does the
rest in its own step code: it runs the amateur and combines in its logit pass. (Penalties and
logit bias, if asked for, apply to the expert's logits before the combination on the native
engine, kernels.logits_ops' order; vLLM applies logit_bias before its logits processors
too, but its penalties after them, to the contrasted scores.)

The amateur is one of
- `self:L`: the expert truncated to its first L layers. The engine computes those logits in the
  same forward pass (`prefill(early_layer=L)`, steering `EarlyLayers(L)`): no extra KV.
- `lame_prompt`: the expert on a "lame" prompt (USCD): for a chat request the last user message
  alone (no system prompt, no earlier turns or few-shot examples), or the `lame_prompt` text the
  request supplies; for a completions request without `lame_prompt`, the empty context (the
  tokenizer's BOS token), i.e. the model without the prompt (steering `AmateurPrompt`): the
  engine runs that context beside the expert's and feeds it every token sampled.
- the NAME of a served amateur (`--amateur NAME=PATH`, `DecodingResources.amateurs`): another
  model with the same vocabulary (steering `ServedAmateur`): the native engine drives the
  amateur engine in lockstep with the expert (logits from both, combine, sample, extend both),
  vLLM runs it in its engine core beside the served model.
With no `amateur`, the server's default (`DecodingResources.default_amateur`) or `self:L` with L
about 2/15 of the expert's layers (4 of SmolLM2-135M's 30) is used.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator

from alignserve.decoding import kv
from alignserve.decoding.base import (
    DecodeContext,
    DecodeEvent,
    DecodeRequest,
    Strategy,
    StrategyInputError,
    StrategyParams,
    register,
)
from alignserve.decoding.common import stream_choices, take_root
from alignserve.decoding.resources import resources_of
from alignserve.engine.protocol import Engine, SeqHandle
from alignserve.engine.steering import (
    AmateurPrompt,
    ContrastiveSteer,
    EarlyLayers,
    ServedAmateur,
    Steering,
)
from alignserve.kernels.logits_ops import contrastive_reference

LAME = "lame_prompt"
_SELF = re.compile(r"self:(\d{1,6})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
MAX_LAME_CHARS = 100_000
# bench/contrastive_sweep.py on continuation items 13-24 (not in the evaluation's report),
# contrastive-sweep-20261206-214720 and -214925: with self:4, beta 2, 4-gram repetition 0.047
# (greedy 0.267) at an expert perplexity of 6.44 without a penalty, 0.002 at 6.80 with 1.05,
# 0.000 at 8.21 / 11.65 with 1.1 / 1.2. The held-out items had loops the contrast did not break
# (eval-cpu-20261206-080539: "a laptop containing a laptop containing ...").
DEFAULT_REPETITION_PENALTY = 1.05


def default_self_layer(num_layers: int) -> int:
    """The default `self:L`: the first 2/15 of the layers (4 of 30; bench/contrastive_sweep.py,
    issue 17: on continuation items 12-23 self:4 with beta 2 cut greedy's 4-gram repetition to
    0.33x at an expert perplexity of 6.5, self:8 with beta 1 to 0.64x at 5.7, self:12 raised
    it to 1.5x)."""
    return max(1, min(num_layers - 1, round(num_layers * 2 / 15)))


def num_layers(engine: Engine) -> int | None:
    n = getattr(engine, "num_layers", None)
    if n is None:
        n = getattr(getattr(engine, "cfg", None), "num_layers", None)
    return n


class ContrastiveParams(StrategyParams):
    amateur: str | None = Field(
        None,
        description="The amateur: `self:L` (the expert's first L layers), `lame_prompt` (the "
        "expert on the request without its system prompt and examples, or on `lame_prompt`), "
        "or the name of a served amateur model (same vocabulary). Default: the server's "
        "(`self:4` for the embedded SmolLM2-135M).",
        examples=["self:8", "lame_prompt"],
    )
    alpha: float = Field(0.1, gt=0.0, le=1.0,
                         description="Plausibility cut: only tokens whose expert probability is "
                         "at least alpha times the best token's are candidates.")
    # 2.0 with the self:4 amateur (issue 17; was 1.0 with self:8) from bench/contrastive_sweep.py
    # on continuation items 12-23, which the evaluation does not report on: greedy's 4-gram
    # repetition 0.177 -> 0.058 (0.33x) at an expert perplexity of 6.5 (greedy's text 2.5)
    beta: float = Field(2.0, ge=0.0, le=10.0,
                        description="Contrast strength: (1+beta)*expert - beta*amateur "
                        "(log-probs).")
    repetition_penalty: float = Field(
        DEFAULT_REPETITION_PENALTY, gt=0.0, le=10.0, allow_inf_nan=False,
        description="Repetition penalty on the expert's logits of tokens already generated, "
        "before the contrast (1: none). An early-layer amateur barely models copying, so the "
        "contrast does not damp loops the expert falls into (DoLa applies 1.2 for the same "
        "reason). The request's own repetition_penalty, when it is not 1, takes its place.")
    lame_prompt: str | None = Field(
        None, min_length=1, max_length=MAX_LAME_CHARS,
        description="The lame prompt's text (amateur `lame_prompt`; implied when `amateur` is "
        "not given). Chat requests wrap it as the only user message.",
    )

    @field_validator("amateur")
    @classmethod
    def _amateur_syntax(cls, value: str | None) -> str | None:
        if value is None or value == LAME or _NAME.fullmatch(value):
            return value
        m = _SELF.fullmatch(value)
        if m and int(m.group(1)) >= 1:
            return value
        raise ValueError("amateur must be `self:L` (L >= 1), `lame_prompt` or the name of a "
                         "served amateur model")

    @field_validator("lame_prompt")
    @classmethod
    def _lame_needs_lame_amateur(cls, value: str | None, info: ValidationInfo) -> str | None:
        amateur = info.data.get("amateur")
        if value is not None and amateur not in (None, LAME):
            raise ValueError("lame_prompt is only used with amateur `lame_prompt`")
        return value


@dataclass
class Amateur:
    kind: str  # "self" | "lame_prompt" | "model"
    spec: str
    layer: int | None = None
    engine: Engine | None = None
    lame_ids: list[int] = field(default_factory=list)


def _spec_of(req: DecodeRequest, engine: Engine, resources: Any) -> str:
    params: ContrastiveParams = req.params
    if params.amateur is not None:
        return params.amateur
    if params.lame_prompt is not None:
        return LAME
    default = resources_of(resources).default_amateur
    if default is not None:
        return default
    layers = num_layers(engine)
    if layers is None or layers < 2:
        raise StrategyInputError("this server has no default amateur: name one",
                                 "alignment.amateur")
    return f"self:{default_self_layer(layers)}"


def lame_prompt_ids(req: DecodeRequest, engine: Engine) -> list[int]:
    """The lame prompt's tokens (see the module docstring)."""
    text = req.params.lame_prompt
    if req.messages is not None:
        if text is None:
            users = [m for m in req.messages if m.get("role") == "user"]
            last = users[-1] if users else req.messages[-1]
            text = last.get("content", "")
        lame = [{"role": "user", "content": text}]
        if req.continue_final:  # the amateur goes on from the same begun answer
            lame.append(req.messages[-1])
            return list(engine.encode_chat(lame, add_generation_prompt=False,
                                           continue_final_message=True)[1])
        return list(engine.encode_chat(lame)[1])
    if text is not None:
        return list(engine.encode(text))
    tok = engine.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return [bos if bos is not None else 0]


def resolve_amateur(req: DecodeRequest, engine: Engine, resources: Any) -> Amateur:
    """The request's amateur, or StrategyInputError naming the field at fault."""
    spec = _spec_of(req, engine, resources)
    m = _SELF.fullmatch(spec)
    if m:
        layer, layers = int(m.group(1)), num_layers(engine)
        if layers is None:
            raise StrategyInputError("this engine cannot truncate the model (`self:L`)",
                                     "alignment.amateur")
        if not 1 <= layer < layers:
            raise StrategyInputError(f"self:{layer}: L must be in [1, {layers - 1}] (the model "
                                     f"has {layers} layers)", "alignment.amateur")
        return Amateur("self", spec, layer=layer)
    if spec == LAME:
        ids = lame_prompt_ids(req, engine)
        if not ids:
            raise StrategyInputError("the lame prompt is empty", "alignment.lame_prompt")
        if len(ids) + req.sampling.max_tokens > engine.max_model_len:
            raise StrategyInputError("the lame prompt does not leave room for max_tokens in the "
                                     "model's context", "alignment.lame_prompt")
        return Amateur(LAME, spec, lame_ids=ids)
    amateurs = resources_of(resources).amateurs
    other = amateurs.get(spec)
    if other is None:
        offered = ", ".join(sorted(amateurs)) or "none"
        raise StrategyInputError(f"unknown amateur {spec!r}; served amateurs: {offered} (or "
                                 "`self:L`, `lame_prompt`)", "alignment.amateur")
    if other.vocab_size != engine.vocab_size:
        raise StrategyInputError(f"amateur {spec!r} has a vocabulary of {other.vocab_size} "
                                 f"tokens, the expert {engine.vocab_size}: they must match",
                                 "alignment.amateur")
    if len(req.prompt_ids) + req.sampling.max_tokens > other.max_model_len:
        raise StrategyInputError(f"the prompt and max_tokens exceed amateur {spec!r}'s context "
                                 f"of {other.max_model_len} tokens", "alignment.amateur")
    return Amateur("model", spec, engine=other)


def check(req: DecodeRequest, engine: Engine, resources: Any) -> None:
    resolve_amateur(req, engine, resources)


# ---- the combination (pure) ---------------------------------------------------------------

def contrast_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float,
                    beta: float) -> torch.Tensor:
    """[B, V] scores: (1+beta)*s_e - beta*s_a on {s_e >= log(alpha) + max s_e}, -inf elsewhere,
    with s the log-softmax of each side's logits (kernels.logits_ops.contrastive_reference)."""
    e = torch.log_softmax(expert_logits.float(), dim=-1)
    a = torch.log_softmax(amateur_logits.float().to(e.device), dim=-1)
    b = e.shape[0]
    return contrastive_reference(e, a, torch.full((b,), alpha, device=e.device),
                                 torch.full((b,), beta, device=e.device))


def steering(amateur: Amateur, params: ContrastiveParams) -> Steering:
    """The request's contrastive decoding as the engine's Steering value."""
    if amateur.kind == "self":
        source = EarlyLayers(amateur.layer)
    elif amateur.kind == LAME:
        source = AmateurPrompt(tuple(amateur.lame_ids))
    else:
        source = ServedAmateur(amateur.spec, model=amateur.engine)
    return Steering(contrastive=ContrastiveSteer(source, alpha=params.alpha, beta=params.beta))


# ---- running --------------------------------------------------------------------------------

async def _prefill(engine: Engine, ids: Sequence[int], ctx: DecodeContext, n: int,
                   early_layer: int | None = None) -> list[SeqHandle]:
    if engine is ctx.engine and ids is ctx.request.prompt_ids and early_layer is None:
        root = await take_root(ctx)  # the server may have computed this prompt already
    else:
        root = await engine.prefill(ids, ctx.tally, early_layer=early_layer)
    if n == 1:
        return [root]
    try:
        return await engine.fork(root, n)
    finally:
        await engine.release([root])


def with_repetition_penalty(req: DecodeRequest) -> DecodeRequest:
    """The request with the strategy's repetition penalty, unless the client set its own."""
    penalty = req.params.repetition_penalty
    if req.sampling.repetition_penalty != 1.0 or penalty == 1.0:
        return req
    return dataclasses.replace(req, sampling=dataclasses.replace(req.sampling,
                                                                 repetition_penalty=penalty))


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    ctx.request = with_repetition_penalty(ctx.request)
    req, engine = ctx.request, ctx.engine
    amateur = resolve_amateur(req, engine, ctx.resources)
    seqs: list[SeqHandle] = []
    try:
        seqs = await _prefill(engine, req.prompt_ids, ctx, req.n,
                              early_layer=amateur.layer if amateur.kind == "self" else None)
        async for event in stream_choices(ctx, seqs, steering(amateur, req.params)):
            yield event
        yield ctx.summary(sum(s.num_output for s in seqs))
    finally:
        await engine.release(seqs)


def kv_slots(decode: DecodeRequest, prompt: int, tokens: int, page: int) -> int:
    """Peak KV (decoding.kv): a lame-prompt amateur adds a second prompt (a token is at least
    one character of `lame_prompt`) and a follower per choice."""
    lame = getattr(decode.params, "lame_prompt", None)
    extra = len(lame) if isinstance(lame, str) else 0
    return (2 * kv.branch(prompt, page) + kv.branch(extra + 64, page)
            + 2 * decode.n * kv.branch(tokens, page))


STRATEGY = register(Strategy(
    name="contrastive",
    description="Contrastive decoding: (1+beta)*expert - beta*amateur log-probs on the expert's "
    "plausible set (alpha); the amateur is the expert's first L layers (`self:L`), the expert on "
    "a lame prompt, or a served amateur model. Sampling fields apply to the contrasted scores.",
    params=ContrastiveParams,
    run=run,
    streams="tokens",
    check=check,
    kv_slots=kv_slots,
))
