"""Steering: what a strategy asks an engine to do to the logits, as plain data.

A token-level strategy (vas, contrastive) does not hand the engine a callable: it hands it a
`Steering` value, and each engine applies it its own way, in one place:

- native: the engine computes what the steering needs in its own step code (the early-layer
  logits, an amateur-prompt follower, a served amateur's logits, the value models' Q on the
  final hidden state) and `engine/native/sampler.py` turns it, with the request's penalties,
  logit bias, min_tokens and grammar, into one fused pass over the logits
  (`kernels.dispatch.sample`: Triton on CUDA, the PyTorch reference elsewhere);
- vllm: the adapter writes it into `SamplingParams.extra_args` (`engine/vllm/spec.py`, the one
  wire format) and `AlignLogitsProcessor` applies it in vLLM's engine core.

The request's own sampling fields (penalties, logit_bias, min_tokens, grammar) stay in
`SamplingParams`: every strategy passes them on unchanged, and both engines already read them
from there. The math and its order are `kernels/logits_ops.py`'s: penalties and bias on the
model's logits, then the contrastive combination, then the value guidance, then the grammar
mask; the reported log-probs stay the model's own.

A strategy never learns which engine runs it: the same value works on both (an engine that
cannot honour a part raises EngineError rather than ignore it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EarlyLayers:
    """The expert truncated to its first `layers` layers (`self:L`). The sequence must have been
    prefilled with `early_layer=layers` so that its pending logits come with the early ones."""

    layers: int


@dataclass(frozen=True)
class AmateurPrompt:
    """The expert itself on another context (the lame prompt): it reads `prompt_ids`, then
    every token the sequence has produced and produces. The engine runs that context."""

    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class ServedAmateur:
    """Another model with the same vocabulary, served beside the expert (`--amateur NAME=PATH`),
    fed the sequence's context. `model` is the resolved resource (a native engine, or vLLM's
    CoreAmateur description); engines look up what they need from it or from `name`."""

    name: str
    model: Any = None


Amateur = EarlyLayers | AmateurPrompt | ServedAmateur


@dataclass(frozen=True)
class ContrastiveSteer:
    """(1 + beta) * expert - beta * amateur on {expert >= log(alpha) + max expert}, -inf
    elsewhere (on log-probs; the same on logits, since each side's shift is per row)."""

    amateur: Amateur
    alpha: float = 0.1
    beta: float = 1.0


@dataclass(frozen=True)
class ValueSteer:
    """VAS: the base model's `top_k` candidates get beta * sum_i w_i (Q_i - mean Q_i) added;
    the others are masked unless `keep_others`. `models`: (value model, weight) pairs, each
    model bound to the served model (`q_values(hidden, ids)`; `path` where it was loaded from,
    which the vLLM engine core loads it from)."""

    models: tuple[tuple[Any, float], ...]
    beta: float = 1.0
    top_k: int = 10
    keep_others: bool = False


@dataclass(frozen=True)
class Steering:
    contrastive: ContrastiveSteer | None = None
    value: ValueSteer | None = None

    def __bool__(self) -> bool:
        return self.contrastive is not None or self.value is not None
