"""Tolerances for two computations of the same values that differ only in floating-point order.

A split or padded batch, a fused kernel, the Triton interpreter or another CPU's SIMD width each
sum the same products in another order, so their results differ by rounding alone. The bound:

- One reduction of n products, accumulated with unit roundoff u_acc (eps/2 of the accumulation
  dtype) and written out in a dtype with unit roundoff u_out, errs relative to the size of its
  terms by about u_out + lambda * sqrt(n) * u_acc (Higham and Mary, "A new approach to
  probabilistic rounding error analysis", 2019: rounding errors as independent zero-mean
  variables). LAMBDA = 6 makes one element exceed it with probability below 2 exp(-18) ~ 3e-8,
  so even the ~6M elements of the embedded model's KV cache all pass.
- Two orderings each carry such an error: twice that.
- A value computed through `depth` reductions in sequence (the layers of a model: residual
  stream plus normalization keep each layer's gain near 1) gathers the errors of each: times
  depth, not compounded.
The bound is relative to the size of the terms, not of the result, so the absolute part is the
bound times `scale`, the typical size of the compared values (1 for normalized activations).
"""

from __future__ import annotations

import math

import torch

LAMBDA = 6.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def reorder_tol(dtype: torch.dtype, length: int, *, depth: int = 1, scale: float = 1.0,
                accumulate: torch.dtype = torch.float32) -> dict[str, float]:
    """assert_close tolerances for values of `dtype` made by `depth` reductions of `length` terms,
    accumulated in `accumulate` (fp32 for torch's CPU kernels and Triton's dots), in two orders."""
    acc = unit_roundoff(torch.promote_types(dtype, accumulate))
    per_reduction = unit_roundoff(dtype) + LAMBDA * math.sqrt(length) * acc
    bound = 2 * per_reduction * depth
    return {"rtol": bound, "atol": bound * scale}


def model_tol(cfg, dtype: torch.dtype = torch.float32, *, context: int = 1,
              scale: float = 1.0) -> dict[str, float]:
    """Tolerances for a whole forward of a model (hidden states, logits, KV written): its longest
    reduction (hidden, MLP or attention over `context` positions) through every layer and the
    head."""
    length = max(cfg.hidden_size, cfg.intermediate_size, context)
    return reorder_tol(dtype, length, depth=cfg.num_layers + 1, scale=scale)


def attention_tol(head_dim: int, length: int, dtype: torch.dtype = torch.float32,
                  scale: float = 1.0) -> dict[str, float]:
    """Attention of queries over `length` keys, in two orders: three reductions in sequence
    (scores over head_dim, the softmax normalizer and the weighted sum of values over length)."""
    return reorder_tol(dtype, max(head_dim, length), depth=3, scale=scale)
