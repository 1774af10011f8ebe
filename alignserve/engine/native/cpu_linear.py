"""Few-row linears in bfloat16 on a CPU: decoding one or a few sequences reads every weight
once per token, so it is bound by memory bandwidth, and bf16 weights halve the bytes.

Measured on the 2-core CI-like machine (bench/cpu_decode.py; SmolLM2-135M's 121 linears of a
step, weights out of cache): 1 row takes 19 ms in bf16 against 47 ms in fp32, 4 rows 60 against
89 ms, but 8 rows 115 against 85 ms (CPUs without bf16 units compute it slowly), and prefill
chunks of hundreds of rows are several times slower in bf16. So each linear keeps its fp32 weight and a
bf16 copy, and picks by the call's row count: at most `max_rows` rows use the copy (input and
output rounded to bf16, accumulation in fp32), more use fp32 as before. The cost is the copy's
memory (half the fp32 model) and logits that differ from fp32 by bf16 rounding in few-row steps;
`--no-cpu-bf16-decode` turns it off for bit-for-bit fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MAX_ROWS = 4


class FewRowBf16Linear(nn.Module):
    """nn.Linear's computation with a bf16 weight copy for calls of at most `max_rows` rows."""

    def __init__(self, linear: nn.Linear, max_rows: int = DEFAULT_MAX_ROWS):
        super().__init__()
        self.weight = linear.weight  # the same Parameter: tied embeddings stay tied
        self.bias = linear.bias
        self.max_rows = max_rows
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16), persistent=False)
        self.register_buffer("bias_bf16", None if linear.bias is None
                             else linear.bias.detach().to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows > self.max_rows or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.to(torch.bfloat16), self.weight_bf16, self.bias_bf16).float()


def use_bf16_for_few_rows(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Swap every nn.Linear of an fp32 CPU model for a FewRowBf16Linear; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    done = 0
    for parent, name, child in swaps:
        if child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
            setattr(parent, name, FewRowBf16Linear(child, max_rows))
            done += 1
    return done


def set_few_rows(model: nn.Module, max_rows: int) -> int:
    """Set every FewRowBf16Linear's `max_rows` (0: always fp32); returns the previous value."""
    previous = DEFAULT_MAX_ROWS
    for m in model.modules():
        if isinstance(m, FewRowBf16Linear):
            previous, m.max_rows = m.max_rows, max_rows
    return previous
