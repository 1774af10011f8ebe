"""bf16 linears on a CPU: the weights are read in bfloat16 (half the bytes of fp32) and, where
the CPU has bf16 units, multiplied by them.

Which row counts use bf16 depends on the CPU, so it is decided at run time from its flags:
- with bf16 units (`avx512_bf16` or `amx_bf16` in /proc/cpuinfo) bf16 is faster at every row
  count: one [rows x 576] x [576 x 49152] product took 6.0 / 6.4 / 86 ms in bf16 against
  9.9 / 18.7 / 224 ms in fp32 at 1 / 16 / 512 rows on an AMD EPYC with avx512_bf16, and on
  an Intel Xeon with AMX the model's 512-row linears were 6-10x faster in bf16 (1 thread;
  bench/results/native_cpu-20261206.md). So every call uses the bf16 copy, and the engine
  runs a prompt's attention in bf16 as well (`bf16_rows`).
- without them (the run committed on 2026-11-25) only few-row calls gained (1 row: 19 against
  47 ms for a step's 121 linears), 8 rows lost (115 against 85 ms) and prefill chunks were
  several times slower, so only calls of at most `FEW_ROWS` rows use the copy.
Each linear keeps its fp32 weight beside the copy, so a test (the `exact_engine` fixture) or a
flag (`--no-cpu-bf16-decode`) can switch the same model back to bit-for-bit fp32 at run time:
`set_few_rows(model, 0)`. Inputs are rounded to bf16, products accumulate in fp32 and outputs
return as fp32, so the residual stream, norms and attention stay fp32 either way; the one
exception is a `bf16_out` linear (the MLP's gate/up), whose output stays bf16 through SiLU and
the product into the down projection (a 1,447-token prefill 0.93-0.99 s against 1.13-1.15 s,
bench/native_cpu_profile.py).
"""

from __future__ import annotations

import functools
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 4
DEFAULT_MAX_ROWS = FEW_ROWS  # the name older benches import
ALL_ROWS = sys.maxsize
_first_linear: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> a swapped linear


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def default_max_rows() -> int:
    """The row limit for bf16 on this CPU (see the module docstring)."""
    return ALL_ROWS if cpu_has_bf16_units() else FEW_ROWS


_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
_PACKED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The bf16 weight in oneDNN's blocked layout, or None where torch lacks it. F.linear on a
    plain bf16 weight reorders it on every call; packed once, a step's 121 linears took 39
    against 56 ms at 16 rows and 38 against 59 ms at 1 row (1 thread, this loaded 2-core
    machine, results bit-identical). The ops are those inductor's CPU backend emits."""
    if _REORDER is None or _PACKED_LINEAR is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = _REORDER(weight, 16)
        probe = torch.zeros(1, weight.shape[1], dtype=torch.bfloat16)
        _PACKED_LINEAR(probe, packed, None, "none", [], "")
        return packed
    except (RuntimeError, TypeError):
        return None


class FewRowBf16Linear(nn.Module):
    """nn.Linear's computation with a bf16 weight copy for calls of at most `max_rows` rows."""

    def __init__(self, linear: nn.Linear, max_rows: int | None = None):
        super().__init__()
        self.weight = linear.weight  # the same Parameter: tied embeddings stay tied
        self.bias = linear.bias
        self.max_rows = default_max_rows() if max_rows is None else max_rows
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16), persistent=False)
        self.register_buffer("bias_bf16", None if linear.bias is None
                             else linear.bias.detach().to(torch.bfloat16), persistent=False)
        # A plain attribute, not a buffer: module-wide moves and casts must not touch it.
        self.weight_packed = _pack(self.weight_bf16)
        # Return bf16 where it ran in bf16: for a linear whose output only feeds elementwise
        # ops and then another linear (which rounds its input to bf16 anyway), the two
        # conversions are pure cost (`use_bf16_for_few_rows` sets it from the parent module).
        self.bf16_out = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows > self.max_rows or x.dtype not in (torch.float32, torch.bfloat16):
            return F.linear(x.float() if x.dtype == torch.bfloat16 else x, self.weight, self.bias)
        xb = x.to(torch.bfloat16)  # a bf16 input (a `bf16_out` linear's output) as it is
        if self.weight_packed is not None:
            y = _PACKED_LINEAR(xb, self.weight_packed, self.bias_bf16, "none", [], "")
        elif rows == 1:
            # One row: torch.mv's bf16 GEMV reads the weight ~1.7x faster than F.linear's
            # GEMM, which pads the row to a tile on AMX CPUs (bench/results/native_cpu-*).
            row = xb.reshape(-1)
            y = (torch.mv(self.weight_bf16, row) if self.bias_bf16 is None
                 else torch.addmv(self.bias_bf16, self.weight_bf16, row))
            y = y.view(*x.shape[:-1], y.shape[0])
        else:
            y = F.linear(xb, self.weight_bf16, self.bias_bf16)
        return y if self.bf16_out else y.float()


def use_bf16_for_few_rows(model: nn.Module, max_rows: int | None = None) -> int:
    """Swap every nn.Linear of an fp32 CPU model for a FewRowBf16Linear (`max_rows` None: this
    CPU's default); returns how many."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    done = 0
    for parent, name, child in swaps:
        if child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
            swapped = FewRowBf16Linear(child, max_rows)
            swapped.bf16_out = name in getattr(parent, "bf16_outputs", ())
            setattr(parent, name, swapped)
            done += 1
    _first_linear.pop(model, None)
    return done


def bf16_rows(model: nn.Module) -> int:
    """The most rows a call of this model's linears runs in bf16 (0: none, or not swapped).
    The engine lets prefill attention follow it, so `set_few_rows(model, 0)` is exact fp32."""
    first = _first_linear.get(model)
    if first is None:  # the modules are walked once, not every step
        first = _first_linear[model] = next(
            (m for m in model.modules() if isinstance(m, FewRowBf16Linear)), False)
    return first.max_rows if first else 0


def set_few_rows(model: nn.Module, max_rows: int | None) -> int:
    """Set every FewRowBf16Linear's `max_rows` (0: always fp32; None: this CPU's default);
    returns the previous value."""
    previous = default_max_rows()
    value = default_max_rows() if max_rows is None else max_rows
    for m in model.modules():
        if isinstance(m, FewRowBf16Linear):
            previous, m.max_rows = m.max_rows, value
    return previous
