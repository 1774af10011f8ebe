"""Kernel entry points the engine calls: Triton on CUDA tensors, the PyTorch references elsewhere.

Selection, per call: `force="triton"` or `force="reference"` if given, else the module setting
`FORCE` (initialised from the environment variable `ALIGNSERVE_KERNELS` = triton | reference |
auto), else automatic: Triton when the tensors are on CUDA and triton is installed. Forcing
Triton on CPU tensors needs `TRITON_INTERPRET=1` in the environment before the first Triton kernel
module is imported (the tests do this); the Triton modules are imported lazily, on first use.

Attention (the Hydragen decomposition, see `attention.py`; off the Triton path, torch's fused
flash attention serves where it can, `attention_fused.py`, and the plain reference elsewhere):
    attention(q [M,H,D], k, v [L,KVH,D], scale, causal=False) -> (out [M,H,D], lse [M,H])
    causal_attention(q [M,H,D], k, v [M,KVH,D], scale, dtype=None) -> out [M,H,D]
    segment_attention(q [M,H,D], k_pool, v_pool, slots [L], scale) -> (out [M,H,D], lse [M,H])
    leaf_attention(q [B,H,D], k_pool, v_pool, slot_table [B,Lmax], lengths [B], scale)
        -> (out [B,H,D], lse [B,H])
    merge_attention(out_a, lse_a, out_b, lse_b) -> (out, lse)
    window_attention(q [1,H,D], k, v [W,KVH,D], mask [W], scale) -> out [1,H,D]
    merge_attention_into(out, lse, rows, part_out, part_lse) -> None (in place on out[rows])
    cpu_step_attention(q [B,H,D], k_pool, v_pool, jobs, scale) -> (out [B,H,D], lse [B,H])
        a whole CPU decode step's or extend's attention (shared segments, leaves, causal
        blocks, merges) in one call of the C++ kernel (`attention_cpu.py`), where
        `cpu_step_attention_available`
with k_pool / v_pool [num_slots, KVH, D]; outputs fp32, lse natural-log, -inf for an empty part.

Sampling (see `logits_ops.py` for the order of operations):
    sample(logits [B,V], temperature, top_k, top_p, min_p, seeds, *, penalties, bias,
           contrastive, vas, allowed) -> token ids [B] int64
Each sampling call leaves a `SampleCall` summary in `LAST_SAMPLE` (which path ran, which
inputs were given) and counts itself in `SAMPLE_CALLS`: the tests read them to show that the
engine's steering reaches this fused pass.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import attention as _attn
from . import attention_cpu as _cpu_attn
from . import attention_fused as _fused_attn
from . import sampling_cpu as _cpu_sampling
from .logits_ops import (
    Contrastive,
    LogitBias,
    Penalties,
    ValueGuidance,
    process_logits_reference,
    sample_processed_reference,
)
from .sampling import filter_logits_reference

__all__ = [
    "FORCE",
    "LAST_SAMPLE",
    "SAMPLE_CALLS",
    "Contrastive",
    "LeafGather",
    "LogitBias",
    "Penalties",
    "SampleCall",
    "ValueGuidance",
    "attention",
    "attention_dtype",
    "causal_attention",
    "cpu_step_attention",
    "cpu_step_attention_available",
    "leaf_attention",
    "leaf_gather",
    "merge",
    "merge_attention",
    "merge_attention_into",
    "prepare_cpu_kernels",
    "sample",
    "segment_attention",
    "triton_available",
    "uses_triton",
    "window_attention",
]

_MODES = ("triton", "reference", "auto")


def _env_mode() -> str | None:
    mode = os.environ.get("ALIGNSERVE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"ALIGNSERVE_KERNELS must be one of {_MODES}, got {mode!r}")
    return None if mode == "auto" else mode


FORCE: str | None = _env_mode()


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def uses_triton(t: torch.Tensor, force: str | None = None) -> bool:
    """Whether a call on tensor `t` with this `force` runs the Triton kernel."""
    mode = force or FORCE
    if mode not in (None, *_MODES):
        raise ValueError(f"force must be one of {_MODES}, got {mode!r}")
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("force='triton' but triton is not installed")
        return True
    return t.is_cuda and triton_available()


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

def _fused(t: torch.Tensor, force: str | None) -> bool:
    """Whether torch's fused flash attention (attention_fused.py) serves a non-Triton call."""
    return (force or FORCE) != "reference" and _fused_attn.available(t)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, causal: bool = False,
    force: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [M, H, D] over contiguous k, v [L, KVH, D] (causal: M == L, query i sees
    keys j <= i): (out fp32 [M, H, D], lse fp32 [M, H]). torch's fused flash attention where it
    serves these tensors, the reference otherwise (or when forced)."""
    if _fused(q, force):
        return _fused_attn.attention_lse(q, k, v, scale, causal=causal)
    return _attn.attention_lse_reference(q, k, v, scale, 0 if causal else None)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
    dtype: torch.dtype | None = None, force: str | None = None,
) -> torch.Tensor:
    """Causal self-attention of new tokens with nothing before them (a prompt's first chunk):
    q [M, H, D], k, v [M, KVH, D] -> out fp32 [M, H, D], no log-sum-exp (nothing to merge).
    Off Triton on a CPU this is torch's SDPA with its own GQA (no widened K/V), computed in
    `dtype` (bf16 on CPUs with bf16 units: ~2.4x faster than fp32 for a 1,447-token prompt,
    bench/results/native_cpu-*); elsewhere `attention`'s output."""
    if not q.is_cuda and not uses_triton(q, force) and _fused(q, force):
        dt = dtype or q.dtype
        q4, k4, v4 = (t.to(dt).transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1).float()
    return attention(q, k, v, scale, causal=True, force=force)[0]


def segment_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
    scale: float, *, force: str | None = None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a group's M queries q [M, H, D] over one shared segment, the slots `slots`
    [L] (int) of the pools [num_slots, KVH, D]: (out fp32 [M, H, D], lse fp32 [M, H])."""
    if uses_triton(q, force):
        from .attention_triton import segment_attention_triton

        return segment_attention_triton(q, k_pool, v_pool, slots, scale, chunk_size=chunk_size)
    idx = slots.to(device=k_pool.device, dtype=torch.long)
    return attention(q, k_pool[idx], v_pool[idx], scale, force=force)


@dataclass
class LeafGather:
    """What a non-Triton `leaf_attention` derives from the slot table and lengths alone (the
    gather index, the lengths clamped to it, the fused op's mask): a decode step builds it once
    (`leaf_gather`) and hands it to each layer's call instead of rebuilding it 30 times."""

    index: torch.Tensor  # [B, W] int64, clamped into the pool
    lengths: torch.Tensor  # [B], clamped to W
    fused_mask: tuple[torch.Tensor, torch.Tensor | None] | None  # attention_fused.padded_mask


def leaf_gather(q: torch.Tensor, k_pool: torch.Tensor, slot_table: torch.Tensor,
                lengths: torch.Tensor, *, force: str | None = None,
                max_length: int | None = None) -> LeafGather | None:
    """The LeafGather for `leaf_attention` calls like (q, k_pool, ..., slot_table, lengths);
    None where Triton serves them (it reads the table itself)."""
    if uses_triton(q, force):
        return None
    width = slot_table.shape[1] if max_length is None else min(max_length, slot_table.shape[1])
    idx = slot_table[:, :width].to(device=k_pool.device, dtype=torch.long)
    idx = idx.clamp(0, k_pool.shape[0] - 1)  # padding may hold anything; it is masked
    lengths = lengths.to(device=q.device).clamp(max=width)
    mask = None
    if not q.is_cuda and _fused(q, force):
        mask = _fused_attn.padded_mask(lengths, width, attention_dtype(q, k_pool))
    return LeafGather(idx, lengths, mask)


def leaf_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor,
    lengths: torch.Tensor, scale: float, *, force: str | None = None,
    max_length: int | None = None, chunk_size: int | None = None,
    gather: LeafGather | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence, q [B, H, D], over its own slots slot_table[b, :lengths[b]]
    (entries past a row's length are never read; lengths may be 0: out 0, lse -inf).
    `max_length`, an upper bound of `lengths`, lets the Triton path size its grid without a
    device-to-host read. `gather`: `leaf_gather`'s result for these arguments (non-Triton)."""
    if uses_triton(q, force):
        from .attention_triton import leaf_attention_triton

        return leaf_attention_triton(q, k_pool, v_pool, slot_table, lengths, scale,
                                     chunk_size=chunk_size, max_length=max_length)
    if gather is None:
        gather = leaf_gather(q, k_pool, slot_table, lengths, force=force, max_length=max_length)
    # index_select of the flat index, not k_pool[idx]: for 16 rows of 80 slots 90 against 234 us
    # on a CPU (1 thread), and 30 layers a step pay it twice.
    flat, shape = gather.index.reshape(-1), (*gather.index.shape, *k_pool.shape[1:])
    k = k_pool.index_select(0, flat).view(shape)
    v = v_pool.index_select(0, flat).view(shape)
    if gather.fused_mask is not None and _fused(q, force):
        return _fused_attn.padded_attention_lse(q, k, v, gather.lengths, scale,
                                                prepared=gather.fused_mask)
    return _attn.padded_attention_lse_reference(q, k, v, gather.lengths, scale)


def attention_dtype(q: torch.Tensor, k: torch.Tensor) -> torch.dtype:
    """The dtype torch's fused CPU op computes q over k in: build its masks in it, so that no
    layer converts them."""
    return _fused_attn.compute_dtype(q.dtype, k.dtype)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float, *, force: str | None = None) -> torch.Tensor:
    """One sequence's query q [1, H, D] over a run of pool slots k/v [W, KVH, D], masked by an
    additive mask [W] (0 for its own keys, -inf between them): out fp32 [1, H, D]. torch's
    fused CPU op where it serves (its CUDA twin takes no mask), the reference's matmuls
    otherwise (never Triton: a CPU step's shortcut, `attention.DecodePlan`)."""
    if not q.is_cuda and _fused(q, force):
        return _fused_attn.window_attention(q, k, v, mask, scale)
    return _attn.window_attention_reference(q, k, v, mask, scale)


def prepare_cpu_kernels() -> None:
    """Build (or find in the cache) the C++ CPU kernels now: an engine's load calls it, so that
    the first request does not pay their compile (~2 s each)."""
    _cpu_attn.library()
    _cpu_sampling.library()


def cpu_step_attention_available(q: torch.Tensor, k_pool: torch.Tensor, *,
                                 force: str | None = None) -> bool:
    """Whether `cpu_step_attention` serves queries like q over this pool: CPU tensors, fp32
    queries, a bf16 pool, the kernel built here, and neither path forced."""
    return (force or FORCE) is None and _cpu_attn.available(q, k_pool)


def cpu_step_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       jobs: _cpu_attn.DecodeJobs, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's or an extend's attention on the CPU: row b of q [B, H, D] over the keys
    of every job that holds it (causally in a causal job), merged exactly; (out fp32 [B, H, D],
    lse fp32 [B, H])."""
    return _cpu_attn.decode_attention(q, k_pool, v_pool, jobs, scale)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
    force: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets: (out, lse) fp32. One Triton
    launch on CUDA instead of the reference's eight elementwise kernels."""
    if uses_triton(out_a, force):
        from .attention_triton import merge_attention_triton

        return merge_attention_triton(out_a, lse_a, out_b, lse_b)
    return _attn.merge_attention(out_a, lse_a, out_b, lse_b)


def merge_attention_into(
    out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, part_out: torch.Tensor,
    part_lse: torch.Tensor, *, force: str | None = None,
) -> None:
    """In place: rows `rows` (distinct, int) of out [B, H, D] / lse [B, H] (fp32, contiguous)
    merged with a segment's (part_out [M, H, D], part_lse [M, H]): a group's shared-segment
    attention folded into its sequences in one launch (the reference: index_select, merge,
    index_copy_)."""
    if uses_triton(out, force):
        from .attention_triton import merge_attention_into_triton

        merge_attention_into_triton(out, lse, rows, part_out, part_lse)
        return
    _attn.merge_attention_into_reference(out, lse, rows.to(device=out.device, dtype=torch.long),
                                         part_out, part_lse)


merge = merge_attention  # the name the placeholder dispatch exported


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------

def _seed_list(seeds: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(seeds, torch.Tensor):
        return [int(s) for s in seeds.tolist()]
    return [int(s) for s in seeds]


def _seed_tensor(seeds: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(seeds, torch.Tensor):
        return seeds.to(device=device, dtype=torch.int64)
    return torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=device)


def _unsupported_by_triton(contrastive: Contrastive | None, vas: ValueGuidance | None) -> bool:
    """Rows that have an amateur and VAS keep_others (the kernel adds kept-row VAS values to the
    logits before the contrastive combination, which is only right without an amateur)."""
    if contrastive is None or vas is None or vas.ids.numel() == 0:
        return False
    keep = (vas.ids >= 0).any(dim=1) & vas.keep_others.bool()
    with_am = contrastive.amateur_index.to(keep.device) >= 0
    return bool((keep & with_am).any())


@dataclass(frozen=True)
class SampleCall:
    """What one `sample` call was given (what the tests read to see production steering)."""

    path: str  # "triton" | "cpu" (the C++ kernel, sampling_cpu.py) | "reference"
    rows: int
    penalties: bool
    bias: bool
    contrastive: bool
    vas: bool
    allowed: bool


LAST_SAMPLE: SampleCall | None = None
SAMPLE_CALLS = 0


def _record(path: str, rows: int, penalties, bias, contrastive, vas, allowed) -> None:
    global LAST_SAMPLE, SAMPLE_CALLS
    LAST_SAMPLE = SampleCall(path, rows, penalties is not None, bias is not None,
                             contrastive is not None, vas is not None, allowed is not None)
    SAMPLE_CALLS += 1


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, seeds: Sequence[int] | torch.Tensor, *,
    penalties: Penalties | None = None, contrastive: Contrastive | None = None,
    vas: ValueGuidance | None = None, bias: LogitBias | None = None,
    allowed: torch.Tensor | None = None, force: str | None = None,
) -> torch.Tensor:
    """Token ids [B] (int64) for logits [B, V], every parameter per row.

    temperature [B] (<= 1e-5: greedy, the argmax of the processed scores), top_k [B] (int, 0 =
    off), top_p [B] (1 = off), min_p [B] (0 = off), seeds [B] (ints; one draw stream per row:
    derive them with `sampling.row_seed(request_seed, row, step)`). penalties, bias,
    contrastive, vas: `logits_ops`' per-row inputs; allowed: a packed int32 bitmask [B,
    ceil(V / 32)] of the tokens a row may take (grammar, min_tokens), or None. `logits` is
    scratch: the Triton path writes the penalties, the bias (and VAS values of rows that keep
    the non-candidates) into it. Both paths are reproducible for given seeds and sample the
    same distribution; their noise differs (torch.Generator per row vs a counter-based hash in
    the kernel; on a CPU the C++ kernel of `sampling_cpu.py` draws with the Triton kernel's
    noise, after the reference's top-k / top-p / min-p filter where a row has one)."""
    if uses_triton(logits, force) and not _unsupported_by_triton(contrastive, vas):
        from .sampling_triton import sample_triton

        _record("triton", logits.shape[0], penalties, bias, contrastive, vas, allowed)
        return sample_triton(logits, temperature, top_k, top_p, min_p,
                             _seed_tensor(seeds, logits.device), penalties=penalties,
                             contrastive=contrastive, vas=vas, bias=bias, allowed=allowed)
    if (force or FORCE) is None and _cpu_sampling.available(logits):
        _record("cpu", logits.shape[0], penalties, bias, contrastive, vas, allowed)
        scores = process_logits_reference(logits, penalties, contrastive, vas, bias, allowed)
        filtered = (top_k > 0) | (top_p < 1.0) | (min_p > 0.0)
        if bool(filtered.any()):
            # the reference's kept sets (scores / T, -inf outside), then the kernel's draw at T 1
            kept = filter_logits_reference(scores, temperature, top_k, top_p, min_p)
            scores = torch.where(filtered.unsqueeze(1), kept, scores)
            temperature = torch.where(filtered & (temperature > 1e-5),
                                      torch.ones_like(temperature), temperature)
        return _cpu_sampling.sample(scores, temperature, _seed_list(seeds))
    _record("reference", logits.shape[0], penalties, bias, contrastive, vas, allowed)
    return sample_processed_reference(logits, temperature, top_k, top_p, min_p,
                                      _seed_list(seeds), penalties=penalties,
                                      contrastive=contrastive, vas=vas, bias=bias,
                                      allowed=allowed)
