"""Triton kernels for decode attention over the engine's slot pool (the Hydragen decomposition).

Beside `attention.py` (the PyTorch references); `dispatch` picks these on CUDA tensors. This
module imports triton at import time, so import it only where triton is installed; on CPU it
runs under `TRITON_INTERPRET=1` (set before this module is first imported).

KV layout: `k_pool`, `v_pool` [num_slots, KVH, D], last dim contiguous; a segment is a list of
slot indices (int32), not necessarily contiguous.

- `segment_attention_triton`: the M queries of a group over one shared segment. For each KV
  head the group's M*G query rows (G = H / KVH) form one matrix, so the segment is read once
  per group and attention is a matrix product. The segment is split into chunks (split-K) so
  the GPU fills; each program writes a partial (out, lse) and `_combine_kernel` merges them
  exactly by log-sum-exp.
- `leaf_attention_triton`: one query per sequence over its own ragged list of slots
  (lengths may be 0: lse -inf, out 0), optionally split over the length the same way.

Everything accumulates in fp32; the matrix products take the pool's dtype (bf16/fp16 on GPU,
fp32 under the interpreter). Outputs: out fp32 [M, H, D], lse fp32 [M, H] (natural log).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _attend_tile(
    q, k_base, v_base, slot_row_ptr, n_start, n_end, qk_scale,
    stride_ks, stride_vs,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
):
    """Online-softmax attention of the rows of `q` over slots[n_start:n_end] (scores in log2)."""
    d = tl.arange(0, D)
    m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)  # finite: avoids inf - inf
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < n_end
        sl = tl.load(slot_row_ptr + offs, mask=ok, other=0).to(tl.int64)
        k = tl.load(k_base + sl[:, None] * stride_ks + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + sl[:, None] * stride_vs + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    return out, lse


@triton.jit
def _segment_partial_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, out_ptr, lse_ptr,
    M, L, chunk_len, qk_scale,
    stride_qm, stride_qh,
    stride_ks, stride_kh, stride_vs, stride_vh,
    stride_oc, stride_om, stride_oh,
    stride_lc, stride_lm,
    G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_q = tl.program_id(0)  # fastest: the query tiles of one chunk run side by side (L2 reuse)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # rows of the [M*G, D] query matrix
    row_ok = rows < M * G
    mi = rows // G
    head = kvh * G + rows % G
    d = tl.arange(0, D)
    q = tl.load(q_ptr + mi[:, None] * stride_qm + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    n_start = chunk * chunk_len
    n_end = tl.minimum(n_start + chunk_len, L)
    out, lse = _attend_tile(
        q, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, slots_ptr, n_start, n_end, qk_scale,
        stride_ks, stride_vs, BLOCK_Q, BLOCK_N, D,
    )
    o_ptrs = (out_ptr + chunk * stride_oc + mi[:, None] * stride_om + head[:, None] * stride_oh
              + d[None, :])
    tl.store(o_ptrs, out, mask=row_ok[:, None])
    tl.store(lse_ptr + chunk * stride_lc + mi * stride_lm + head, lse, mask=row_ok)


@triton.jit
def _leaf_partial_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr, lse_ptr,
    chunk_len, width, qk_scale,
    stride_qb, stride_qh, stride_tb,
    stride_ks, stride_kh, stride_vs, stride_vh,
    stride_oc, stride_ob, stride_oh,
    stride_lc, stride_lb,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    head = kvh * G + g
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    length = tl.minimum(tl.load(len_ptr + b), width)  # never past the table's row
    n_start = chunk * chunk_len
    n_end = tl.minimum(n_start + chunk_len, length)
    out, lse = _attend_tile(
        q, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, table_ptr + b * stride_tb,
        n_start, n_end, qk_scale, stride_ks, stride_vs, BLOCK_G, BLOCK_N, D,
    )
    o_ptrs = out_ptr + chunk * stride_oc + b * stride_ob + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out, mask=g_ok[:, None])
    tl.store(lse_ptr + chunk * stride_lc + b * stride_lb + head, lse, mask=g_ok)


@triton.jit
def _combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, C, R,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Exact LSE merge of C partials: part_out [C, R, D], part_lse [C, R] -> out [R, D], lse [R]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    d = tl.arange(0, D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        lse_c = tl.load(part_lse_ptr + cs[:, None] * R + rows[None, :],
                        mask=(cs[:, None] < C) & r_ok[None, :], other=float("-inf"))
        m = tl.maximum(m, tl.max(lse_c, axis=0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wsum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for c in range(C):
        lse_c = tl.load(part_lse_ptr + c * R + rows, mask=r_ok, other=float("-inf"))
        w = tl.exp(lse_c - m_safe)
        o = tl.load(part_out_ptr + (c * R + rows[:, None]) * D + d[None, :], mask=r_ok[:, None],
                    other=0.0)
        wsum += w
        acc += w[:, None] * o
    has = wsum > 0.0
    out = acc / tl.where(has, wsum, 1.0)[:, None]
    lse = tl.where(has, m_safe + tl.log(tl.where(has, wsum, 1.0)), float("-inf"))
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out, mask=r_ok[:, None])
    tl.store(lse_ptr + rows, lse, mask=r_ok)


@triton.jit
def _merge_kernel(
    a_out_ptr, a_lse_ptr, rows_ptr, b_out_ptr, b_lse_ptr, out_ptr, lse_ptr, H,
    D: tl.constexpr, BLOCK_H: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    """One query: its H heads of (a) and (b) merged by LSE. With rows, (a) is row rows[i] of the
    full tensors and the result is written back there (in place); else out/lse[i]."""
    i = tl.program_id(0).to(tl.int64)
    r = i
    if HAS_ROWS:
        r = tl.load(rows_ptr + i).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    h_ok = hh < H
    d = tl.arange(0, D)
    la = tl.load(a_lse_ptr + r * H + hh, mask=h_ok, other=float("-inf"))
    lb = tl.load(b_lse_ptr + i * H + hh, mask=h_ok, other=float("-inf"))
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    tot = wa + wb
    has = tot > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, tot, 1.0), 0.0)
    offs = hh[:, None] * D + d[None, :]
    oa = tl.load(a_out_ptr + r * H * D + offs, mask=h_ok[:, None], other=0.0)
    ob = tl.load(b_out_ptr + i * H * D + offs, mask=h_ok[:, None], other=0.0)
    o = oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None]
    lse = tl.where(has, m_safe + tl.log(tl.where(has, tot, 1.0)), float("-inf"))
    tl.store(out_ptr + r * H * D + offs, o, mask=h_ok[:, None])
    tl.store(lse_ptr + r * H + hh, lse, mask=h_ok)


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------

def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a few chunks are enough to exercise the split


def _check_pool(k_pool: torch.Tensor, v_pool: torch.Tensor, h: int, d: int) -> int:
    if k_pool.dim() != 3 or k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool/v_pool must be [slots, KVH, D] alike, got {tuple(k_pool.shape)}"
                         f" and {tuple(v_pool.shape)}")
    kvh = k_pool.shape[1]
    if k_pool.shape[2] != d or h % kvh:
        raise ValueError(f"query heads {h} x dim {d} do not fit KV pool {tuple(k_pool.shape)}")
    if k_pool.stride(2) != 1 or v_pool.stride(2) != 1:
        raise ValueError("k_pool/v_pool need a contiguous last dimension")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    return kvh


def segment_config(rows: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_N, num_warps) for `rows` = M * G query rows of head_dim d: the
    configurations that ptxas compiles for sm_90 without register spills."""
    block_q = min(128 if d <= 64 else 64, max(16, _next_pow2(rows)))
    return block_q, 64, 8


def leaf_config(g: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_N, num_warps) for G query heads per KV head (spill-free on sm_90)."""
    return max(16, _next_pow2(g)), 64, (4 if d <= 64 else 8)


def choose_chunk(length: int, programs_per_chunk: int, device: torch.device, block_n: int,
                 lo: int = 128, hi: int = 1024) -> int:
    """Keys per split-K chunk: enough chunks that the grid covers ~2 waves of the SMs, each chunk
    between `lo` and `hi` keys (a multiple of the key tile)."""
    if length <= 0:
        return block_n
    want = max(1, math.ceil(2 * _num_sms(device) / max(1, programs_per_chunk)))
    chunk = math.ceil(length / want)
    chunk = max(lo, min(hi, chunk))
    return max(block_n, math.ceil(chunk / block_n) * block_n)


def _combine(part_out: torch.Tensor, part_lse: torch.Tensor, shape: tuple[int, ...]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    c = part_out.shape[0]
    d = part_out.shape[-1]
    r = part_lse[0].numel()
    out = torch.empty((r, d), dtype=torch.float32, device=part_out.device)
    lse = torch.empty((r,), dtype=torch.float32, device=part_out.device)
    block_r = 16 if d <= 64 else 8
    block_c = min(32, _next_pow2(c))
    _combine_kernel[(triton.cdiv(r, block_r),)](
        part_out, part_lse, out, lse, c, r, D=d, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out.view(*shape, d), lse.view(*shape)


def segment_attention_triton(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
    scale: float, *, chunk_size: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, block_q: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the M queries q [M, H, D] over k_pool/v_pool[slots]: (out, lse) fp32."""
    m, h, d = q.shape
    kvh = _check_pool(k_pool, v_pool, h, d)
    g = h // kvh
    length = int(slots.numel())
    dev = q.device
    if m == 0 or length == 0:
        return (torch.zeros((m, h, d), dtype=torch.float32, device=dev),
                torch.full((m, h), float("-inf"), dtype=torch.float32, device=dev))
    q = q if q.stride(2) == 1 else q.contiguous()
    slots = slots.to(device=dev, dtype=torch.int32).contiguous()
    rows = m * g
    bq, bn, nw = segment_config(rows, d)
    block_q, block_n, num_warps = block_q or bq, block_n or bn, num_warps or nw
    q_tiles = triton.cdiv(rows, block_q)
    chunk = chunk_size or choose_chunk(length, q_tiles * kvh, dev, block_n)
    n_chunks = triton.cdiv(length, chunk)
    part_out = torch.empty((n_chunks, m, h, d), dtype=torch.float32, device=dev)
    part_lse = torch.empty((n_chunks, m, h), dtype=torch.float32, device=dev)
    _segment_partial_kernel[(q_tiles, kvh, n_chunks)](
        q, k_pool, v_pool, slots, part_out, part_lse,
        m, length, chunk, float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        G=g, D=d, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=num_warps,
    )
    if n_chunks == 1:
        return part_out[0], part_lse[0]
    return _combine(part_out, part_lse, (m, h))


def leaf_attention_triton(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor,
    lengths: torch.Tensor, scale: float, *, chunk_size: int | None = None,
    block_n: int | None = None, max_length: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence, q [B, H, D], over its slots slot_table[b, :lengths[b]].

    `max_length` (an upper bound on lengths, default slot_table's width) sizes the split-K grid
    without reading `lengths` back from the device; lengths above it (or above the table's
    width) are clamped to it."""
    b, h, d = q.shape
    kvh = _check_pool(k_pool, v_pool, h, d)
    g = h // kvh
    dev = q.device
    lmax = slot_table.shape[1] if max_length is None else min(max_length, slot_table.shape[1])
    if b == 0 or lmax == 0:
        return (torch.zeros((b, h, d), dtype=torch.float32, device=dev),
                torch.full((b, h), float("-inf"), dtype=torch.float32, device=dev))
    q = q if q.stride(2) == 1 else q.contiguous()
    slot_table = slot_table.to(device=dev, dtype=torch.int32)
    if slot_table.stride(1) != 1:
        slot_table = slot_table.contiguous()
    lengths = lengths.to(device=dev, dtype=torch.int32).contiguous()
    block_g, bn, nw = leaf_config(g, d)
    block_n, num_warps = block_n or bn, num_warps or nw
    chunk = chunk_size or choose_chunk(lmax, b * kvh, dev, block_n, lo=256, hi=4096)
    n_chunks = triton.cdiv(lmax, chunk)
    part_out = torch.empty((n_chunks, b, h, d), dtype=torch.float32, device=dev)
    part_lse = torch.empty((n_chunks, b, h), dtype=torch.float32, device=dev)
    _leaf_partial_kernel[(b, kvh, n_chunks)](
        q, k_pool, v_pool, slot_table, lengths, part_out, part_lse,
        chunk, lmax, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), slot_table.stride(0),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        G=g, D=d, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=num_warps,
    )
    if n_chunks == 1:
        return part_out[0], part_lse[0]
    return _combine(part_out, part_lse, (b, h))


def _check_merge(out: torch.Tensor, lse: torch.Tensor) -> None:
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError("merge takes fp32 (out, lse)")
    if not (out.is_contiguous() and lse.is_contiguous()) or out.shape[:2] != lse.shape:
        raise ValueError("merge takes contiguous out [N, H, D] and lse [N, H]")


def merge_attention_triton(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE merge of two partial attentions (fp32 [N, H, D], [N, H]) in one launch."""
    out_a, lse_a = out_a.contiguous(), lse_a.contiguous()
    out_b, lse_b = out_b.contiguous(), lse_b.contiguous()
    _check_merge(out_a, lse_a)
    _check_merge(out_b, lse_b)
    n, h, d = out_a.shape
    out = torch.empty_like(out_a)
    lse = torch.empty_like(lse_a)
    if n:
        _merge_kernel[(n,)](out_a, lse_a, lse_a, out_b, lse_b, out, lse, h, D=d,
                            BLOCK_H=_next_pow2(h), HAS_ROWS=False, num_warps=4)
    return out, lse


def merge_attention_into_triton(
    out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, part_out: torch.Tensor,
    part_lse: torch.Tensor,
) -> None:
    """In place: out[rows], lse[rows] <- merge with (part_out, part_lse); rows distinct."""
    _check_merge(out, lse)
    part_out, part_lse = part_out.contiguous(), part_lse.contiguous()
    _check_merge(part_out, part_lse)
    m = part_out.shape[0]
    if m == 0:
        return
    h, d = out.shape[1], out.shape[2]
    if rows.dtype not in (torch.int32, torch.int64):  # the kernel widens int32 itself
        rows = rows.long()
    rows = rows.to(out.device).contiguous()
    _merge_kernel[(m,)](out, lse, rows, part_out, part_lse, out, lse, h, D=d,
                        BLOCK_H=_next_pow2(h), HAS_ROWS=True, num_warps=4)
