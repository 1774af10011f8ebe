"""Kernel dispatch (placeholder until the Triton kernels land): the PyTorch references."""

from __future__ import annotations

import torch

from alignserve.kernels.attention import attention_lse_reference, padded_attention_lse_reference


def segment_attention(q, k_pool, v_pool, slots, scale):
    idx = slots.long()
    return attention_lse_reference(q, k_pool.index_select(0, idx), v_pool.index_select(0, idx), scale)


def leaf_attention(q, k_pool, v_pool, slot_table, lengths, scale):
    idx = slot_table.long()
    return padded_attention_lse_reference(q, k_pool[idx], v_pool[idx], lengths, scale)


def merge(out_a, lse_a, out_b, lse_b):
    from alignserve.kernels.attention import merge_attention

    return merge_attention(out_a, lse_a, out_b, lse_b)


__all__ = ["segment_attention", "leaf_attention", "merge", "torch"]


def sample(logits, temperature, top_k, top_p, min_p, seeds):
    from alignserve.kernels.sampling import sample_reference

    return sample_reference(logits, temperature, top_k, top_p, min_p, seeds)
