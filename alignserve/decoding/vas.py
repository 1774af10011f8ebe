"""`vas`: value-augmented sampling (Han et al. 2024, arXiv 2405.06639).

Each step, for every sequence, the engine takes the base model's `top_k` candidate tokens
C(s), evaluates each requested value model's Q_i(s, a) on them from the final hidden state
(for value heads on the served model this costs no backbone compute), centres each Q_i over
the candidates and adds the weighted sum, scaled by `beta`, to the candidates' logits, in its
fused logit pass. The strategy only hands it the request's `ValueSteer` (engine.steering):

    score(a) = logit0(a) + beta * sum_i w_i * (Q_i(s, a) - mean_{b in C(s)} Q_i(s, b))   a in C(s)
    score(a) = -inf                     (or logit0(a) with keep_non_candidates)      otherwise

so that, at temperature 1, pi(a|s) ∝ pi0(a|s) * exp(beta * sum_i w_i Q_i(s, a)) on C(s) (the
centring is a per-state constant: it changes nothing among candidates, and with
keep_non_candidates it decides the candidates' share against the rest). `beta` is the global
strength (the inverse KL temperature of the paper's objective), `w_i` the per-request weight
of value model i (a negative weight steers away from its reward). The usual sampling fields
apply afterwards: temperature divides the whole score, then top_k / top_p / min_p (note the
request's own `top_k` is a sampling field; `alignment.top_k` is VAS's candidate count).

Value models come from the server's resources (`DecodingResources.value_models`, name ->
ValueModel, a directory, or a ValueModelRegistry) and otherwise from the shipped ones; with no
`value_models` the request uses the server's default (shipped: `sentiment-positive`, trained
on the embedded SmolLM2 for positive VADER sentiment). Rewards given with `vas` report only,
unless `candidates` asks for more sequences than `n`:

`candidates` composes VAS with best-of-N: that many VAS-guided sequences branch from one
prefill (they share the prompt's KV, so the prompt is computed once), are decoded together,
and the best `n` by the request's composed reward are returned (ties by log-likelihood; with
no rewards, the `n` most likely), as best_of_n chooses (decoding.common.best_of). They stream as best_of_n's do: each winner whole, once chosen.
Default: `n` (plain VAS, every sequence returned, streamed token by token); n > candidates is
a 400 naming alignment.candidates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from alignserve.decoding.base import (
    DecodeContext,
    DecodeEvent,
    DecodeRequest,
    Strategy,
    StrategyInputError,
    StrategyParams,
    register,
)
from alignserve.decoding.common import best_of, prefill_branches, stream_choices
from alignserve.decoding.resources import resources_of
from alignserve.engine.steering import Steering, ValueSteer
from alignserve.kernels.logits_ops import centred_value_sum, top_candidates, vas_reference

DEFAULT_BETA = 50.0
DEFAULT_TOP_K = 10
MAX_VALUE_MODELS = 8
MAX_CANDIDATES = 64


class ValueModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as StrategyParams

    name: str = Field(min_length=1, max_length=200, description="A value model this server offers "
                      "(GET /v1/alignment lists them).")
    weight: float = Field(1.0, ge=-10.0, le=10.0, allow_inf_nan=False,
                          description="Its weight w_i in beta * sum_i w_i Q_i (negative steers "
                          "away from its reward).")


class VasParams(StrategyParams):
    beta: float = Field(DEFAULT_BETA, ge=0.0, le=50.0, allow_inf_nan=False,
                        description="Strength: beta * (weighted, centred Q) is added to the "
                        "candidates' logits (Q is in reward units; 0 is plain sampling from the "
                        "top_k candidates).")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=100,
                       description="Candidates per step: the base model's top_k tokens.")
    value_models: list[ValueModelRef] | None = Field(
        None, min_length=1, max_length=MAX_VALUE_MODELS,
        description="Value models composed with weights; default: the server's default value "
        "model with weight 1.")
    keep_non_candidates: bool = Field(
        False, description="Keep the tokens outside the top_k at their base logits (as the "
        "paper's code does) instead of masking them.")
    candidates: int | None = Field(
        None, ge=1, le=MAX_CANDIDATES,
        description="VAS with best-of-N: decode this many VAS-guided sequences sharing the "
        "prompt's KV and return the best n by the request's rewards (the n most likely "
        "with no rewards); default: n (plain VAS).")


# ------------------------------------------------------------------------------ the formula


def candidates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The base model's top_k token ids per row [B, K] (int64); -1 where a row has fewer than
    K tokens with a finite logit (kernels.logits_ops.top_candidates, what the engines use)."""
    return top_candidates(logits, top_k)


def combine_values(qs: list[torch.Tensor], weights: list[float], ids: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * (Q_i - mean over the row's valid candidates of Q_i) [B, K] (0 at padding)."""
    return centred_value_sum(qs, weights, ids)


def vas_logits(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, beta: float,
               keep_non_candidates: bool) -> torch.Tensor:
    """logits + beta * values on each row's candidates `ids`; the rest -inf unless kept
    (the kernels' reference `vas_reference`, one beta for all rows)."""
    b = logits.shape[0]
    return vas_reference(
        logits, ids, values,
        torch.full((b,), float(beta), device=logits.device),
        torch.full((b,), bool(keep_non_candidates), device=logits.device, dtype=torch.bool),
    )


def steering(models: list[tuple[Any, float]], params: VasParams) -> Steering:
    """The request's VAS as the engine's Steering value."""
    return Steering(value=ValueSteer(models=tuple(models), beta=params.beta, top_k=params.top_k,
                                     keep_others=params.keep_non_candidates))


# ------------------------------------------------------------------------ the value models

_loaded_dirs: dict[str, Any] = {}


def _value_model_source(resources: Any) -> Mapping[str, Any]:
    return resources_of(resources).value_models or {}


def default_value_model(resources: Any) -> str | None:
    source = _value_model_source(resources)
    name = getattr(source, "default_name", None)
    if name:
        return name
    from alignserve.rewardmodels.value.registry import shipped_registry

    return shipped_registry().default_name


def available(resources: Any) -> list[str]:
    from alignserve.rewardmodels.value.registry import shipped_registry

    names = list(_value_model_source(resources))
    return names + [n for n in shipped_registry().names if n not in names]


def _lookup(name: str, resources: Any) -> Any:
    """The ValueModel named `name` (unbound), or None."""
    from alignserve.rewardmodels.value.model import load_value_model
    from alignserve.rewardmodels.value.registry import shipped_registry

    source = _value_model_source(resources)
    if name in source:
        entry = source[name]
        if isinstance(entry, (str, Path)):
            key = str(Path(entry).resolve())
            if key not in _loaded_dirs:
                _loaded_dirs[key] = load_value_model(entry, name)
            entry = _loaded_dirs[key]
        return entry
    shipped = shipped_registry()
    return shipped.get(name)


def resolve_value_models(params: VasParams, engine: Any, resources: Any) -> list[tuple[Any, float]]:
    """[(ValueModel bound to the engine's model, weight)]; StrategyInputError naming the field
    for an unknown name or a model trained on another base model."""
    from alignserve.rewardmodels.value.model import ValueModelError, token_matrix

    if params.value_models:
        refs = [(r.name, r.weight, f"alignment.value_models[{i}].name")
                for i, r in enumerate(params.value_models)]
    else:
        name = default_value_model(resources)
        if name is None:
            raise StrategyInputError("this server has no default value model: name one in "
                                     "alignment.value_models", "alignment.value_models")
        refs = [(name, 1.0, "alignment.value_models")]
    out = []
    try:
        tokens = token_matrix(engine)
    except ValueModelError as e:
        raise StrategyInputError(f"vas is not available on this engine: {e}",
                                 "alignment.strategy") from None
    for name, weight, param in refs:
        try:
            vm = _lookup(name, resources)
        except ValueModelError as e:
            raise StrategyInputError(f"value model {name!r} cannot be loaded: {e}", param) from None
        if vm is None:
            raise StrategyInputError(
                f"unknown value model {name!r}; this server offers: "
                f"{', '.join(available(resources)) or 'none'}", param)
        try:
            vm.bind(tokens, getattr(engine, "model_name", None))
        except ValueModelError as e:
            raise StrategyInputError(str(e), param) from None
        out.append((vm, weight))
    return out


def check(request: DecodeRequest, engine: Any, resources: Any) -> None:
    """Before the run (the server calls it so that a stream still gets a 400)."""
    resolve_value_models(request.params, engine, resources)


# ------------------------------------------------------------------------------- the run


async def run(ctx: DecodeContext) -> AsyncIterator[DecodeEvent]:
    req, engine = ctx.request, ctx.engine
    params: VasParams = req.params
    models = resolve_value_models(params, engine, ctx.resources)
    steer = steering(models, params)
    k = max(params.candidates or req.n, req.n)
    seqs = await prefill_branches(ctx, k)
    try:
        if k > req.n:
            async for event in best_of(ctx, seqs, steer):
                yield event
            return
        async for event in stream_choices(ctx, seqs, steering=steer):
            yield event
        yield ctx.summary(sum(s.num_output for s in seqs))
    finally:
        await engine.release(seqs)


STRATEGY = register(Strategy(
    name="vas",
    description="Value-augmented sampling: each step the base model's top_k candidates get "
    "beta * sum_i w_i (Q_i - mean Q_i) added to their logits, Q_i from value heads on the "
    "model's hidden state; the rest are masked unless keep_non_candidates. Rewards, if given, "
    "are reported; with `candidates` > n, that many VAS sequences share one prefill and the "
    "best n by reward are returned (streamed whole, once chosen).",
    params=VasParams,
    run=run,
    streams="tokens",
    check=check,
))

