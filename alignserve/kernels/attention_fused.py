"""Attention with log-sum-exp through torch's own fused flash-attention ops, in our shapes.

The Hydragen merge needs each part's log-sum-exp, which `F.scaled_dot_product_attention` does
not return; the flash kernels underneath it do. On a CPU `_scaled_dot_product_flash_attention_
for_cpu` beats the reference's matmul / logsumexp / exp chain 1.5-3.5x on prefix groups and
3.4-5.8x on causal prefill chunks (2 cores; bench/attention_cpu.py), and never materialises the
scores.
On CUDA (fp16/bf16) `_scaled_dot_product_flash_attention` serves prefill's causal part, which
the decode kernels do not cover; it is used only after a check against the reference on this
device passed (`cuda_ok`), since the op is private to torch.

Shapes as in `attention.py`: q [M, H, D], k/v [L, KVH, D] with H a multiple of KVH; outputs
float32 out [M, H, D] and natural-log lse [M, H].
"""

from __future__ import annotations

import logging

import torch

from .attention import attention_lse_reference

log = logging.getLogger(__name__)

_CPU_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CUDA_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_cuda_checked: dict[int, bool] = {}  # device index -> the check's verdict


def available(t: torch.Tensor) -> bool:
    """Whether the fused op serves tensors like `t`."""
    if t.device.type == "cpu":
        return _CPU_OP is not None and t.dtype in (torch.float32, torch.bfloat16)
    if t.is_cuda:
        return t.dtype in (torch.float16, torch.bfloat16) and cuda_ok(t.device)
    return False


def compute_dtype(q_dtype: torch.dtype, k_dtype: torch.dtype) -> torch.dtype:
    """What the CPU op computes in: bf16 keys (a CPU's bf16 KV pool) take the queries to bf16,
    not the pool to fp32, so the op reads half the bytes and runs on the bf16 units (a 16-row
    decode step of the embedded model 45.8 against 51.2 ms, 1 row 32.0 against 34.9:
    bench/kv_dtype.py); else the wider dtype. Masks built in it are used as they are."""
    return torch.bfloat16 if k_dtype == torch.bfloat16 else torch.promote_types(q_dtype, k_dtype)


def _call(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, scale: float, causal: bool,
          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, Lq, D] x [B, N, Lk, D] -> (out [B, N, Lq, D] fp32, lse [B, N, Lq] fp32)."""
    if q4.is_cuda:
        out, lse = _CUDA_OP(q4, k4, v4, 0.0, causal, False, scale=scale)[:2]
    else:
        dtype = compute_dtype(q4.dtype, k4.dtype)
        q4, k4, v4 = q4.to(dtype), k4.to(dtype), v4.to(dtype)
        mask = None if mask is None else mask.to(dtype)
        out, lse = _CPU_OP(q4, k4, v4, 0.0, causal, attn_mask=mask, scale=scale)
    return out.float(), lse.float()


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_lse_reference's result. `causal` (then M == L): query i sees keys j <= i."""
    m, h, d = q.shape
    _, kvh, _ = k.shape
    g = h // kvh
    if causal:
        # Positions follow the query index, so every query head gets its own row of heads:
        # K/V are widened to H heads (they are only the new tokens here).
        q4 = q.permute(1, 0, 2).unsqueeze(0)
        k4 = k.repeat_interleave(g, dim=1).permute(1, 0, 2).unsqueeze(0)
        v4 = v.repeat_interleave(g, dim=1).permute(1, 0, 2).unsqueeze(0)
        out, lse = _call(q4, k4, v4, scale, True)
        return out[0].permute(1, 0, 2), lse[0].permute(1, 0)
    # Without a mask the G query heads of a KV head share its keys: one [M*G] block per KV head.
    q4 = q.view(m, kvh, g, d).permute(1, 0, 2, 3).reshape(1, kvh, m * g, d)
    out, lse = _call(q4, k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0), scale, False)
    out = out[0].view(kvh, m, g, d).permute(1, 0, 2, 3).reshape(m, h, d)
    return out, lse[0].view(kvh, m, g).permute(1, 0, 2).reshape(m, h)


def padded_mask(lengths: torch.Tensor, lmax: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(additive mask [B, 1, 1, lmax], rows of length 0 as a bool [B] or None when there are
    none) for `padded_attention_lse`. It depends only on the lengths, so a decode step builds
    it once for all its layers."""
    empty = lengths == 0
    valid = torch.arange(lmax, device=lengths.device)[None, :] < lengths.clamp(min=1)[:, None]
    mask = torch.zeros(lengths.shape[0], 1, 1, lmax, dtype=dtype, device=lengths.device)
    mask = mask.masked_fill(~valid[:, None, None, :], float("-inf"))
    return mask, (empty if bool(empty.any()) else None)


def padded_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                         scale: float,
                         prepared: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """padded_attention_lse_reference's result (CPU): q [B, H, D] over k/v [B, Lmax, KVH, D],
    row b reading its first lengths[b] keys; a row of length 0 gets out 0 and lse -inf.
    `prepared`: `padded_mask`'s result for these lengths (else built here)."""
    b, h, d = q.shape
    _, lmax, kvh, _ = k.shape
    g = h // kvh
    mask, empty = prepared or padded_mask(lengths.to(q.device), lmax,
                                          compute_dtype(q.dtype, k.dtype))
    out, lse = _call(q.view(b, kvh, g, d), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), scale,
                     False, mask)
    out, lse = out.reshape(b, h, d), lse.reshape(b, h)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None], float("-inf"))
    return out, lse


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One sequence's decode query q [1, H, D] over a window of the pool k/v [W, KVH, D] with
    an additive mask [W] (0: its key, -inf: another's or free): out fp32 [1, H, D]. The G query
    heads of a KV head are that head's G query rows, so one op reads each key once."""
    _, h, d = q.shape
    w, kvh, _ = k.shape
    out, _ = _call(q.view(1, kvh, h // kvh, d), k.permute(1, 0, 2).unsqueeze(0),
                   v.permute(1, 0, 2).unsqueeze(0), scale, False, mask.view(1, 1, 1, w))
    return out.reshape(1, h, d)


def cuda_ok(device: torch.device) -> bool:
    """Whether the CUDA flash op gives the reference's out and lse on this device (checked once,
    on small random inputs, causal and not, with GQA)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cuda_checked:
        _cuda_checked[index] = _check_cuda(torch.device("cuda", index))
    return _cuda_checked[index]


def _check_cuda(device: torch.device) -> bool:
    if _CUDA_OP is None:
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        for causal, m, length in ((False, 5, 77), (True, 33, 33)):
            q, k, v = (torch.randn(n, h, 64, generator=gen, device=device, dtype=torch.bfloat16)
                       for n, h in ((m, 8), (length, 2), (length, 2)))
            out, lse = attention_lse(q, k, v, 0.125, causal=causal)
            ref_out, ref_lse = attention_lse_reference(q, k, v, 0.125, 0 if causal else None)
            if not (torch.allclose(out, ref_out, atol=2e-2, rtol=2e-2)
                    and torch.allclose(lse, ref_lse, atol=2e-2, rtol=1e-3)):
                log.warning("torch's CUDA flash attention disagrees with the reference here; "
                            "prefill attention uses the reference")
                return False
        return True
    except Exception as exc:  # noqa: BLE001  (a private op: any failure means "do not use it")
        log.warning("torch's CUDA flash attention is unusable here (%s); prefill attention "
                    "uses the reference", exc)
        return False
