"""Attention plans: how one forward pass stores new KV and attends, built once per step.

`DecodePlan`: one new token per sequence. Shared segments are attended once per group of
sequences that share them (all the group's queries in one matrix product per KV head), each
sequence's leaf on its own, and the parts are merged exactly by log-sum-exp (Hydragen).
`ExtendPlan`: several new tokens for each of a few sequences (prompt prefill, multi-token
extends): the queries attend to the chain so far, then causally to themselves.
"""

from __future__ import annotations

import torch

from alignserve.engine.native.kv_cache import PAGE, KVCache, Segment
from alignserve.kernels import dispatch
from alignserve.kernels.attention import merge_attention


def _segment_kv(cache: KVCache, layer: int, seg: Segment) -> tuple[torch.Tensor, torch.Tensor] | None:
    rng = seg.contiguous_range()
    if rng is not None:
        return cache.k[layer, rng[0] : rng[1]], cache.v[layer, rng[0] : rng[1]]
    return None


def attend_segment(cache: KVCache, layer: int, q: torch.Tensor, seg: Segment, scale: float):
    """(out, lse) of queries q [M, H, D] over one segment."""
    view = _segment_kv(cache, layer, seg)
    if view is not None and not q.is_cuda:
        return dispatch.attention(q, view[0], view[1], scale)
    return dispatch.segment_attention(q, cache.k[layer], cache.v[layer], seg.slot_tensor(q.device), scale)


class DecodePlan:
    def __init__(self, cache: KVCache, chains: list[list[Segment]], new_slots: list[int], scale: float):
        device = cache.device
        self.cache, self.scale = cache, scale
        # A leaf fills its own pages in order (kv_cache: slot j lives in pages[j // PAGE]), so
        # its slots follow from its page list: the host sends pages, the device expands them.
        leaves = [c[-1] for c in chains]
        lengths = [len(s) for s in leaves]
        lmax = max(lengths)
        pmax = max(1, -(-lmax // PAGE))
        groups: dict[int, tuple[Segment, list[int]]] = {}
        for row, chain in enumerate(chains):
            for seg in chain[:-1]:
                if len(seg):
                    groups.setdefault(seg.id, (seg, []))[1].append(row)
        # Everything the step indexes with goes to the device in one copy (a decode step is
        # short: on a GPU, per-tensor host-to-device copies would cost as much as the kernels).
        rows = [r for _, rs in groups.values() for r in rs]
        pages = [x for s in leaves for x in (*s.pages[:pmax], *[0] * (pmax - len(s.pages)))]
        packed = torch.tensor([*new_slots, *lengths, *rows, *pages], dtype=torch.int32)
        packed = packed.to(device)
        b = len(chains)
        self.write = packed[:b].long()
        self.leaf_lengths = packed[b : 2 * b]
        at = 2 * b
        self.groups = []
        for seg, rs in groups.values():
            self.groups.append((seg, packed[at : at + len(rs)]))
            at += len(rs)
        cols = torch.arange(lmax, dtype=torch.int32, device=device)
        self.leaf_table = packed[at:].view(b, pmax)[:, cols // PAGE] * PAGE + cols % PAGE

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        c.k[layer].index_copy_(0, self.write, k.to(c.k.dtype))
        c.v[layer].index_copy_(0, self.write, v.to(c.v.dtype))
        out, lse = dispatch.leaf_attention(
            q, c.k[layer], c.v[layer], self.leaf_table, self.leaf_lengths, self.scale
        )
        for seg, rows in self.groups:
            o, l = attend_segment(c, layer, q.index_select(0, rows), seg, self.scale)
            dispatch.merge_attention_into(out, lse, rows, o, l)
        return out


class ExtendPlan:
    """New tokens for several sequences, laid out one after another in the batch."""

    def __init__(self, cache: KVCache, contexts: list[list[Segment]], counts: list[int],
                 new_slots: list[int], scale: float):
        self.cache, self.scale = cache, scale
        self.contexts, self.counts = contexts, counts
        self.write = torch.tensor(new_slots, dtype=torch.int64, device=cache.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        outs = []
        start = 0
        for segs, n in zip(self.contexts, self.counts):
            qs, ks, vs = q[start : start + n], k[start : start + n], v[start : start + n]
            out, lse = dispatch.attention(qs, ks, vs, self.scale, causal=True)
            for seg in segs:
                if len(seg):
                    o, l = attend_segment(c, layer, qs, seg, self.scale)
                    out, lse = merge_attention(out, lse, o, l)
            outs.append(out)
            start += n
        c.k[layer].index_copy_(0, self.write, k.to(c.k.dtype))
        c.v[layer].index_copy_(0, self.write, v.to(c.v.dtype))
        return torch.cat(outs)
