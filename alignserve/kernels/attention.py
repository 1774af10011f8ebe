"""Attention that returns its log-sum-exp, and the exact merge of partial attentions.

The Hydragen decomposition: attention over a KV split into parts (a shared prefix read once
for a group of queries, then each sequence's own suffix) equals the LSE-weighted merge of the
attention over each part. These are the PyTorch references; `dispatch` picks the Triton
kernels on CUDA.

Shapes: queries q [M, H, D]; keys/values k, v [L, KVH, D] with H a multiple of KVH (GQA).
Outputs are float32: out [M, H, D], lse [M, H] (natural log, -inf for an empty part).
"""

from __future__ import annotations

import torch


def attention_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of M queries over L keys. With `causal_offset` c, query i sees keys j <= c + i."""
    m, h, d = q.shape
    length, kvh, _ = k.shape
    g = h // kvh
    qf = q.float().view(m, kvh, g, d).permute(1, 0, 2, 3).reshape(kvh, m * g, d)
    kf = k.float().permute(1, 2, 0)  # [KVH, D, L]
    vf = v.float().permute(1, 0, 2)  # [KVH, L, D]
    scores = torch.matmul(qf, kf) * scale  # [KVH, M*G, L]
    if causal_offset is not None:
        qpos = torch.arange(m, device=q.device).repeat_interleave(g) + causal_offset
        kpos = torch.arange(length, device=q.device)
        scores = scores.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [KVH, M*G]
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e30))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.matmul(probs, vf)  # [KVH, M*G, D]
    out = out.view(kvh, m, g, d).permute(1, 0, 2, 3).reshape(m, h, d)
    lse = lse.view(kvh, m, g).permute(1, 0, 2).reshape(m, h)
    return out, lse


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [1, H, D] over k/v [W, KVH, D] with an additive mask [W] (0 or -inf): out [1, H, D]."""
    _, h, d = q.shape
    kvh = k.shape[1]
    qf = q.float().view(kvh, h // kvh, d)
    scores = torch.matmul(qf, k.float().permute(1, 2, 0)) * scale + mask.float()  # [KVH, G, W]
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float().permute(1, 0, 2))  # [KVH, G, D]
    return out.reshape(1, h, d)


def padded_attention_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over its own ragged KV: q [B, H, D], k/v [B, Lmax, KVH, D]."""
    b, h, d = q.shape
    _, lmax, kvh, _ = k.shape
    g = h // kvh
    qf = q.float().view(b, kvh, g, d)
    kf = k.float().permute(0, 2, 3, 1)  # [B, KVH, D, L]
    vf = v.float().permute(0, 2, 1, 3)  # [B, KVH, L, D]
    scores = torch.matmul(qf, kf) * scale  # [B, KVH, G, L]
    valid = torch.arange(lmax, device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, KVH, G]
    probs = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    out = torch.matmul(probs, vf).reshape(b, h, d)
    return out, lse.reshape(b, h)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets.

    Part a's weight exp(lse_a - lse) is sigmoid(lse_a - lse_b), and out = lerp(out_b, out_a,
    that weight): five ops instead of eleven (a CPU decode step merges once per layer and
    shared segment). An empty part (lse -inf) gets weight 0 exactly; two empty parts give nan,
    which becomes 0.5 of two zero outputs: out 0, lse -inf."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.sigmoid(lse_a - lse_b).nan_to_num_(0.5).unsqueeze(-1)
    return torch.lerp(out_b, out_a, wa), lse


def merge_attention_into_reference(
    out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, part_out: torch.Tensor,
    part_lse: torch.Tensor,
) -> None:
    """In place: out[rows], lse[rows] <- their merge with (part_out, part_lse) [len(rows), ...]
    (rows distinct): how a decode step folds a shared segment's attention into its group's rows."""
    mo, ml = merge_attention(out.index_select(0, rows), lse.index_select(0, rows), part_out,
                             part_lse)
    out.index_copy_(0, rows, mo)
    lse.index_copy_(0, rows, ml)
