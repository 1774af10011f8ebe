"""`contrastive`: contrastive decoding, expert minus amateur (O'Brien & Lewis 2023).

Each step, with s = log-softmax of the next-token logits, a token scores

    (1 + beta) * s_expert - beta * s_amateur   on the plausible set {s_expert >= log(alpha) + max s_expert}
    -inf                                       elsewhere,

and the request's sampling fields (temperature, top_p, top_k, min_p, seed) apply to these
scores: temperature 0 takes their argmax. Log-probs reported for a token are the expert's.
(Penalties, if asked for, apply to the contrasted scores on the engine paths and to the expert's
logits before the combination in the lockstep loop, kernels.logits_ops' order.)

The amateur is one of
- `self:L`: the expert truncated to its first L layers. The engine computes those logits in the
  same forward pass (`prefill(early_layer=L)`, read as `StepInputs.early_logits`): no extra KV.
- `lame_prompt`: the expert on a "lame" prompt (USCD): for a chat request the last user message
  alone (no system prompt, no earlier turns or few-shot examples), or the `lame_prompt` text the
  request supplies; for a completions request without `lame_prompt`, the empty context (the
  tokenizer's BOS token), i.e. the model without the prompt. It runs as a follower sequence, so it
  is fed every token sampled for the expert.
- the NAME of a served amateur (`--amateur NAME=PATH`, `DecodingResources.amateurs`): another
  engine with the same vocabulary, driven in lockstep with the expert (logits from both, combine,
  sample, extend both).
With no `amateur`, the server's default (`DecodingResources.default_amateur`) or `self:L` with L
about a quarter of the expert's layers (8 of SmolLM2-135M's 30) is used.

On the vLLM engine the combination runs in vLLM's engine core, where a Python processor cannot
be called: each processor here also carries its declarative form, `alignserve_spec`
(alignserve.engine.vllm.spec), and the engine fills in the amateur it knows (`self:L` from
prefill's early_layer, the lame prompt from the followers). A served amateur there is a
description (`in_engine_core`) whose model runs beside vLLM's, not a second engine.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator

from alignserve.decoding.base import (
    ChoiceDelta,
    ChoiceFinal,
    DecodeContext,
    DecodeEvent,
    DecodeRequest,
    Strategy,
    StrategyInputError,
    StrategyParams,
    register,
)
from alignserve.decoding.common import format_logprobs, score_texts, stream_choices, take_root
from alignserve.decoding.resources import resources_of
from alignserve.engine.grammar import allowed_argmax, mask_logits, new_bitmask
from alignserve.engine.protocol import Engine, EngineError, SeqHandle
from alignserve.engine.text import IncrementalText
from alignserve.kernels import dispatch
from alignserve.kernels.logits_ops import Contrastive, Penalties, contrastive_reference
from alignserve.kernels.sampling import row_seed

LAME = "lame_prompt"
_SELF = re.compile(r"self:(\d{1,6})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
MAX_LAME_CHARS = 100_000


def default_self_layer(num_layers: int) -> int:
    """The default `self:L`: about the first quarter of the layers (8 of 30)."""
    return max(1, min(num_layers - 1, round(num_layers * 4 / 15)))


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
        "(`self:8` for the embedded SmolLM2-135M).",
        examples=["self:8", "lame_prompt"],
    )
    alpha: float = Field(0.1, gt=0.0, le=1.0,
                         description="Plausibility cut: only tokens whose expert probability is "
                         "at least alpha times the best token's are candidates.")
    # 1.0 (was 0.5) from bench/contrastive_sweep.py on continuation items the evaluation does
    # not report on: greedy 4-gram repetition 0.120 -> 0.041 (0.34x) at an expert perplexity of
    # 6.1 (greedy's text 2.7); 0.5 left it at 0.130, 2.0 gave 0.27x at 7.3
    beta: float = Field(1.0, ge=0.0, le=10.0,
                        description="Contrast strength: (1+beta)*expert - beta*amateur "
                        "(log-probs).")
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
        return list(engine.encode_chat([{"role": "user", "content": text}])[1])
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


def make_processor(source: str, alpha: float, beta: float):
    """A logits processor combining each row with its amateur from StepInputs (`early_logits`
    or `follower_logits`)."""

    def processor(seqs: list[SeqHandle], logits: torch.Tensor, inputs) -> torch.Tensor:
        amateur = getattr(inputs, source)
        if amateur is None:
            raise RuntimeError(f"contrastive: the engine gave no {source}")
        return contrast_scores(logits, amateur, alpha, beta)

    # vLLM's form: the engine supplies the amateur (early_layer or the followers)
    processor.alignserve_spec = {"contrastive": {"alpha": alpha, "beta": beta}}
    return processor


class CoreAmateurProcessor:
    """A served amateur that runs inside the engine (vLLM's core): only the declarative form."""

    def __init__(self, name: str, alpha: float, beta: float) -> None:
        self.alignserve_spec = {"contrastive": {"alpha": alpha, "beta": beta, "amateur": name}}

    def __call__(self, seqs: list[SeqHandle], logits: torch.Tensor, inputs) -> torch.Tensor:
        raise EngineError("this amateur runs inside the engine; the engine must read "
                          "alignserve_spec")


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


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    req, engine = ctx.request, ctx.engine
    amateur = resolve_amateur(req, engine, ctx.resources)
    in_core = getattr(amateur.engine, "in_engine_core", False)
    if amateur.kind == "model" and not in_core:
        async for event in _lockstep(ctx, amateur.engine):
            yield event
        return
    p: ContrastiveParams = req.params
    seqs: list[SeqHandle] = []
    followers: list[SeqHandle] = []
    try:
        if amateur.kind == "model":
            seqs = await _prefill(engine, req.prompt_ids, ctx, req.n)
            processor = CoreAmateurProcessor(amateur.spec, p.alpha, p.beta)
        elif amateur.kind == "self":
            seqs = await _prefill(engine, req.prompt_ids, ctx, req.n, early_layer=amateur.layer)
            processor = make_processor("early_logits", p.alpha, p.beta)
        else:
            seqs = await _prefill(engine, req.prompt_ids, ctx, req.n)
            followers = await _prefill(engine, amateur.lame_ids, ctx, req.n)
            processor = make_processor("follower_logits", p.alpha, p.beta)
        async for event in _stream(ctx, seqs, processor, followers or None):
            yield event
    finally:
        await engine.release(seqs + followers)


async def _stream(ctx: DecodeContext, seqs: list[SeqHandle], processor, followers):
    async for event in stream_choices(ctx, seqs, processor=processor, followers=followers):
        yield event
    yield ctx.summary(sum(s.num_output for s in seqs))


@dataclass
class _Row:
    """One choice of the lockstep loop (the strategy keeps what the engine's generate would)."""

    text: IncrementalText
    out: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    entries: list[dict] = field(default_factory=list)
    finished: bool = False
    reason: str | None = None


def _penalties(rows: list[_Row], sp, device) -> Penalties | None:
    if not (sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0):
        return None
    uniq = [torch.unique(torch.tensor(r.out or [-1], dtype=torch.int64), return_counts=True)
            for r in rows]
    width = max(len(u[0]) for u in uniq)
    ids = torch.full((len(rows), width), -1, dtype=torch.int64)
    counts = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, (u, c) in enumerate(uniq):
        ids[i, : len(u)], counts[i, : len(c)] = u, c
    counts[ids < 0] = 0
    b = len(rows)
    return Penalties(ids.to(device), counts.to(device),
                     torch.full((b,), sp.repetition_penalty, device=device),
                     torch.full((b,), sp.frequency_penalty, device=device),
                     torch.full((b,), sp.presence_penalty, device=device))


async def _lockstep(ctx: DecodeContext, amateur: Engine) -> AsyncIterator[DecodeEvent]:
    """Expert and a served amateur fed the same tokens: logits of both, combine, sample, extend."""
    req, engine = ctx.request, ctx.engine
    p: ContrastiveParams = req.params
    sp = req.sampling
    n, plen = req.n, len(req.prompt_ids)
    max_tokens = min(sp.max_tokens, engine.max_model_len - plen, amateur.max_model_len - plen)
    stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(engine.eos_token_ids))
    base = sp.seed if sp.seed is not None else random.getrandbits(62)
    seqs: list[SeqHandle] = []
    aseqs: list[SeqHandle] = []
    rows = [_Row(IncrementalText(engine.tokenizer, req.prompt_ids, sp.stop)) for _ in range(n)]
    # structured outputs: this loop is the sampler, so it keeps each row's grammar matcher
    grammars = [sp.grammar.new_state() if sp.grammar is not None else None for _ in range(n)]
    bitmask = new_bitmask(n, engine.vocab_size) if sp.grammar is not None else None
    try:
        seqs = await _prefill(engine, req.prompt_ids, ctx, n)
        aseqs = await _prefill(amateur, req.prompt_ids, ctx, n)
        while True:
            live = [i for i in range(n) if not rows[i].finished]
            if not live:
                break
            e, a = await asyncio.gather(engine.logits([seqs[i] for i in live]),
                                        amateur.logits([aseqs[i] for i in live]))
            b = len(live)
            logprobs = torch.log_softmax(e.float(), dim=-1)
            scores = e.float().clone()
            if bitmask is not None:  # the expert's disallowed tokens leave the plausible set
                scores = mask_logits([grammars[i] for i in live], scores, bitmask)
            early = [j for j, i in enumerate(live) if len(rows[i].out) < sp.min_tokens
                     and not (grammars[i] is not None and grammars[i].completed)]
            if early and stop_ids:
                scores[torch.tensor(early).unsqueeze(1),
                       torch.tensor(sorted(stop_ids)).unsqueeze(0)] = float("-inf")
            tokens = dispatch.sample(
                scores, torch.full((b,), sp.temperature), torch.full((b,), sp.top_k),
                torch.full((b,), sp.top_p), torch.full((b,), sp.min_p),
                [row_seed(row_seed(base, i), len(rows[i].out)) for i in live],
                penalties=_penalties([rows[i] for i in live], sp, scores.device),
                contrastive=Contrastive(a.float(), torch.arange(b), torch.full((b,), p.alpha),
                                        torch.full((b,), p.beta)),
            ).tolist()
            finals: list[int] = []
            feed: list[tuple[int, int]] = []
            for j, (i, tok) in enumerate(zip(live, tokens)):
                row = rows[i]
                broken = False
                if grammars[i] is not None and not grammars[i].try_accept(tok):
                    # no finite contrasted score on an allowed token: the expert's best
                    # allowed one, or the row ends ("abort"); never an exception
                    tok = allowed_argmax(e[j], bitmask[j])
                    broken = tok is None or not grammars[i].try_accept(tok)
                    tok = 0 if tok is None else tok
                lp = float(logprobs[j, tok])
                row.out.append(tok)
                row.cumulative_logprob += lp
                entry = None
                if sp.logprobs is not None:
                    top = []
                    if sp.logprobs:
                        vals, idx = torch.topk(logprobs[j], min(sp.logprobs, logprobs.shape[1]))
                        top = list(zip(idx.tolist(), vals.tolist()))
                    entry = {"token_id": tok, "logprob": lp, "top": top}
                    row.entries.append(entry)
                stop_id = tok in stop_ids and len(row.out) >= sp.min_tokens
                if broken:
                    row.reason = "abort"
                elif stop_id or row.text.push(tok) is not None:
                    row.reason = "stop"
                elif len(row.out) >= max_tokens:
                    row.reason = "length"
                row.finished = row.reason is not None
                delta = row.text.delta(final=row.finished)
                lps = format_logprobs(engine, [entry]) if entry is not None else []
                if delta or lps:
                    yield ChoiceDelta(i, delta, [tok], lps)
                if row.finished:
                    finals.append(i)
                else:
                    feed.append((i, tok))
            if finals:
                scores_ = await score_texts(ctx, [rows[i].text.text for i in finals])
                for i, score in zip(finals, scores_):
                    row = rows[i]
                    yield ChoiceFinal(
                        index=i, text=row.text.text, token_ids=list(row.out),
                        finish_reason=row.reason or "stop",
                        reward=None if score is None else score.total,
                        components={} if score is None else dict(score.components),
                        cumulative_logprob=row.cumulative_logprob,
                        logprobs=format_logprobs(engine, row.entries) if row.entries else [],
                        streamed=True)
            if feed:
                await asyncio.gather(
                    engine.extend([seqs[i] for i, _ in feed], [[t] for _, t in feed], ctx.tally),
                    amateur.extend([aseqs[i] for i, _ in feed], [[t] for _, t in feed],
                                   ctx.tally))
        yield ctx.summary(sum(len(r.out) for r in rows))
    finally:
        await asyncio.gather(engine.release(seqs), amateur.release(aseqs))


STRATEGY = register(Strategy(
    name="contrastive",
    description="Contrastive decoding: (1+beta)*expert - beta*amateur log-probs on the expert's "
    "plausible set (alpha); the amateur is the expert's first L layers (`self:L`), the expert on "
    "a lame prompt, or a served amateur model. Sampling fields apply to the contrasted scores.",
    params=ContrastiveParams,
    run=run,
    streams="tokens",
    check=check,
))
