"""Attention plans: how one forward pass stores new KV and attends, built once per step.

`DecodePlan`: one new token per sequence. Shared segments are attended once per group of
sequences that share them (all the group's queries in one matrix product per KV head), each
sequence's leaf on its own, and the parts are merged exactly by log-sum-exp (Hydragen).
`ExtendPlan`: several new tokens for each of a few sequences (prompt prefill, multi-token
extends): the queries attend to the chain so far, then causally to themselves.

On a CPU with a bf16 pool both plans hand the C++ kernel (`kernels/attention_cpu.py`) the
step's jobs once (`step_jobs`, `extend_jobs`: the same decomposition, as slot ranges) and make
one call per layer, which also merges; torch's ops and the Triton kernels serve elsewhere.
"""

from __future__ import annotations

from array import array
from itertools import pairwise

import torch

from alignserve.engine.native.kv_cache import PAGE, KVCache, Segment, slot_runs
from alignserve.kernels import dispatch
from alignserve.kernels.attention import merge_attention
from alignserve.kernels.attention_cpu import DecodeJobs

# The narrowest leaf table a graph-laid step uses: a best-of-N's candidates keep one layout for
# their first 256 tokens, then for each doubling.
MIN_GRAPH_LEAF_WIDTH = 256
# Query lanes (rows x query heads per KV head) in one of the CPU kernel's work items
# (cpu_attention.cpp's MAX_TILES x 16): an extend's rows are blocked to fill them.
CPU_LANES_PER_JOB = 64
_UNSET = object()


def _segment_kv(cache: KVCache, layer: int, seg: Segment) -> tuple[torch.Tensor, torch.Tensor] | None:
    rng = seg.contiguous_range()
    if rng is not None:
        return cache.k[layer, rng[0] : rng[1]], cache.v[layer, rng[0] : rng[1]]
    return None


def attend_segment(cache: KVCache, layer: int, q: torch.Tensor, seg: Segment, scale: float):
    """(out, lse) of queries q [M, H, D] over one segment."""
    view = _segment_kv(cache, layer, seg)
    if view is not None and not dispatch.uses_triton(q):  # a view serves torch's kernels
        return dispatch.attention(q, view[0], view[1], scale)
    return dispatch.segment_attention(q, cache.k[layer], cache.v[layer], seg.slot_tensor(q.device), scale)


def _leaf_runs(leaf: Segment) -> list[tuple[int, int]]:
    """A leaf's slots as runs, from its pages (it fills them in order: slot j lives in
    pages[j // PAGE]), without walking every slot."""
    runs: list[tuple[int, int]] = []
    left = len(leaf)
    for page in leaf.pages:
        if left <= 0:
            break
        a = page * PAGE
        b = a + min(PAGE, left)
        left -= b - a
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


def step_jobs(chains: list[list[Segment]]) -> DecodeJobs:
    """The CPU kernel's jobs for a decode step over these chains: each shared segment once,
    with every row whose chain holds it, then each row's own leaf."""
    groups: dict[int, tuple[Segment, list[int]]] = {}
    for row, chain in enumerate(chains):
        for seg in chain[:-1]:
            if len(seg):
                groups.setdefault(seg.id, (seg, []))[1].append(row)
    jobs = [(rows, seg.runs()) for seg, rows in groups.values()]
    jobs += [([row], _leaf_runs(chain[-1])) for row, chain in enumerate(chains) if len(chain[-1])]
    return DecodeJobs.build(len(chains), jobs)


def _prefix_runs(runs: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """The runs that hold the first `count` slots of `runs`."""
    out = []
    for a, b in runs:
        if count <= 0:
            break
        out.append((a, min(b, a + count)))
        count -= b - a
    return out


def extend_jobs(contexts: list[list[Segment]], counts: list[int], new_slots: list[int],
                lanes_per_job: int, group: int) -> DecodeJobs:
    """The CPU kernel's jobs for an extend (a prompt's chunk, new tokens after a context):
    each sequence's rows in blocks that fill a work item's lanes (`lanes_per_job` over `group`
    query heads per KV head), each block over the context and the new tokens up to its last,
    causally."""
    jobs, start = [], 0
    rows_per_job = max(1, lanes_per_job // group)
    for segs, n in zip(contexts, counts):
        context = [r for seg in segs if len(seg) for r in seg.runs()]
        new_runs = slot_runs(new_slots[start : start + n])
        for b0 in range(0, n, rows_per_job):
            b1 = min(n, b0 + rows_per_job)
            jobs.append((list(range(start + b0, start + b1)), context + _prefix_runs(new_runs, b1)))
        start += n
    return DecodeJobs.build(start, jobs, [True] * len(jobs))


def _window(chain: list[Segment]) -> tuple[int, int, list[tuple[int, int]]] | None:
    """(lo, hi, runs): the slots of a chain as runs inside [lo, hi), when each segment is one
    run and the gaps between them are at most a page per run (a page's unused tail); else None."""
    runs = []
    for seg in chain[:-1]:
        if len(seg):
            rng = seg.contiguous_range()
            if rng is None:
                return None
            runs.append(rng)
    leaf = chain[-1]
    if len(leaf):
        pages = leaf.pages  # a leaf fills its pages in order: consecutive pages, one run
        if any(b - a != 1 for a, b in pairwise(pages)):
            return None
        runs.append((pages[0] * PAGE, pages[0] * PAGE + len(leaf)))
    if not runs:
        return None
    lo, hi = min(a for a, _ in runs), max(b for _, b in runs)
    if hi - lo > sum(b - a for a, b in runs) + PAGE * len(runs):
        return None
    return lo, hi, runs


class DecodePlan:
    """One decode step's attention. Every device tensor it indexes with is a view of, or derived
    from, one packed int32 tensor (`host` on the CPU, sent in one copy), so that a step can also
    run from a CUDA graph: `bind` derives them from a static device copy that each replay
    refills, and `key` names the steps that can share one graph (`cuda_graphs.py`).

    `for_graphs`: lay the step out for that: the leaf table's width is rounded up to a power
    of two (at least `MIN_GRAPH_LEAF_WIDTH`), so that consecutive steps share a layout (only
    their lengths and pages change, which are data), and `key` is set. Off, `key` is None."""

    def __init__(self, cache: KVCache, chains: list[list[Segment]], new_slots: list[int], scale: float,
                 *, for_graphs: bool = False):
        self.cache, self.scale = cache, scale
        self.chains, self.for_graphs = chains, for_graphs
        # The CPU kernel's jobs (`step_jobs`), built at the first layer where it serves.
        self._cpu_jobs: DecodeJobs | None | object = _UNSET
        # A leaf fills its own pages in order (kv_cache: slot j lives in pages[j // PAGE]), so
        # its slots follow from its page list: the host sends pages, the device expands them.
        leaves = [c[-1] for c in chains]
        lengths = [len(s.slots) for s in leaves]
        width = max(lengths)
        if for_graphs:
            width = max(MIN_GRAPH_LEAF_WIDTH, 1 << max(0, width - 1).bit_length())
        self.batch, self.width = len(chains), width
        self.pages_per_row = pmax = max(1, -(-width // PAGE))
        groups: dict[int, tuple[Segment, list[int]]] = {}
        for row, chain in enumerate(chains):
            for seg in chain[:-1]:
                if len(seg):
                    groups.setdefault(seg.id, (seg, []))[1].append(row)
        self._group_rows = list(groups.values())
        # Everything the step indexes with goes to the device in one copy (a decode step is
        # short: on a GPU, per-tensor host-to-device copies would cost as much as the kernels).
        # Built with list operations and read through an int32 array: this runs every step,
        # and torch.tensor(list) costs ~0.1 us per element.
        values = list(new_slots)
        values += lengths
        for _, rs in self._group_rows:
            values += rs
        pad = [0] * pmax
        for s in leaves:
            pages = s.pages
            if len(pages) >= pmax:
                values += pages[:pmax]
            else:
                values += pages
                values += pad[len(pages) :]
        self.host = torch.frombuffer(array("i", values), dtype=torch.int32)
        self.key = None
        if for_graphs:
            # A graph reads each shared segment's slot tensor at the address it was recorded
            # with: the key holds it (a segment that changes gets a new tensor, so a new key),
            # and whoever keeps a graph keeps these tensors alive (`segment_tensors`).
            self.segment_tensors = [seg.slot_tensor(cache.device) for seg, _ in self._group_rows]
            self.key = (self.batch, width, tuple(
                (seg.id, len(seg), t.data_ptr(), tuple(rs))
                for (seg, rs), t in zip(self._group_rows, self.segment_tensors)))
        self.write: torch.Tensor | None = None
        # One sequence whose keys lie in one run of slots but for small gaps (a prompt's pages,
        # then its answer's): one masked attention over that run replaces the leaf gather, a
        # second attention and the merge in every layer. Only off CUDA graphs and Triton.
        self.window = None if for_graphs or self.batch != 1 else _window(chains[0])
        self._window_mask: torch.Tensor | None = None
        # Groups that hold every row in order; their merge needs no gather and scatter (used
        # off the Triton path, where in-place merges into graph buffers do not matter).
        self._whole = [rs == list(range(self.batch)) for _, rs in self._group_rows]
        self._gather = _UNSET

    def bind(self, packed: torch.Tensor) -> DecodePlan:
        """Derive the step's device tensors from `packed` (a device copy of `host`). Inside a
        CUDA graph capture these few ops are recorded and rerun on each replay."""
        b = self.batch
        self._gather = _UNSET
        self.write = packed[:b].long()
        self.leaf_lengths = packed[b : 2 * b]
        at = 2 * b
        self.groups = []
        for seg, rs in self._group_rows:
            self.groups.append((seg, packed[at : at + len(rs)]))
            at += len(rs)
        cols = torch.arange(self.width, dtype=torch.int32, device=packed.device)
        pages = packed[at:].view(b, self.pages_per_row)
        self.leaf_table = pages[:, cols // PAGE] * PAGE + cols % PAGE
        return self

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        if self._cpu_jobs is _UNSET:
            serves = not self.for_graphs and dispatch.cpu_step_attention_available(q, c.k)
            self._cpu_jobs = step_jobs(self.chains) if serves else None
        if self.write is None:
            if self._cpu_jobs is not None:  # the kernel reads slot ranges: no tables to derive
                self.write = self.host[: self.batch].long()
            else:
                self.bind(self.host.to(c.device))
        c.k[layer].index_copy_(0, self.write, k.to(c.k.dtype))
        c.v[layer].index_copy_(0, self.write, v.to(c.v.dtype))
        if self._cpu_jobs is not None:  # every part and merge of the step in one kernel call
            return dispatch.cpu_step_attention(q, c.k[layer], c.v[layer], self._cpu_jobs,
                                               self.scale)[0]
        if self.window is not None and not dispatch.uses_triton(q):
            lo, hi, runs = self.window
            if self._window_mask is None:  # built once a step, for every layer
                mask = torch.full((hi - lo,), float("-inf"), device=c.device,
                                  dtype=dispatch.attention_dtype(q, c.k))
                for a, b in runs:
                    mask[a - lo : b - lo] = 0.0
                self._window_mask = mask
            return dispatch.window_attention(q, c.k[layer, lo:hi], c.v[layer, lo:hi],
                                             self._window_mask, self.scale)
        if self._gather is _UNSET:  # what every layer's leaf gather shares: built once a step
            self._gather = dispatch.leaf_gather(q, c.k[layer], self.leaf_table, self.leaf_lengths)
        out, lse = dispatch.leaf_attention(
            q, c.k[layer], c.v[layer], self.leaf_table, self.leaf_lengths, self.scale,
            gather=self._gather,
        )
        for (seg, rows), whole in zip(self.groups, self._whole):
            if whole and self._gather is not None:
                # Every row in order (n samples of one prompt): no row selection, no scatter.
                o, l = attend_segment(c, layer, q, seg, self.scale)
                out, lse = dispatch.merge_attention(out, lse, o, l)
                continue
            o, l = attend_segment(c, layer, q.index_select(0, rows), seg, self.scale)
            dispatch.merge_attention_into(out, lse, rows, o, l)
        return out


class ExtendPlan:
    """New tokens for several sequences, laid out one after another in the batch."""

    def __init__(self, cache: KVCache, contexts: list[list[Segment]], counts: list[int],
                 new_slots: list[int], scale: float, *, dtype: torch.dtype | None = None):
        """`dtype`: what a sequence without earlier KV computes its causal attention in (None:
        the queries' dtype; the engine passes bf16 when the model's linears run in bf16)."""
        self.cache, self.scale, self.dtype = cache, scale, dtype
        self.contexts, self.counts, self.new_slots = contexts, counts, new_slots
        self.write = torch.tensor(new_slots, dtype=torch.int64, device=cache.device)
        self._cpu_jobs: DecodeJobs | None | object = _UNSET

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        if self._cpu_jobs is _UNSET:
            serves = dispatch.cpu_step_attention_available(q, c.k)
            self._cpu_jobs = extend_jobs(self.contexts, self.counts, self.new_slots,
                                         CPU_LANES_PER_JOB, q.shape[1] // c.k.shape[2]) if serves else None
        if self._cpu_jobs is not None:  # the new tokens' KV first: the kernel reads the pool
            c.k[layer].index_copy_(0, self.write, k.to(c.k.dtype))
            c.v[layer].index_copy_(0, self.write, v.to(c.v.dtype))
            return dispatch.cpu_step_attention(q, c.k[layer], c.v[layer], self._cpu_jobs,
                                               self.scale)[0]
        outs = []
        start = 0
        for segs, n in zip(self.contexts, self.counts):
            qs, ks, vs = q[start : start + n], k[start : start + n], v[start : start + n]
            if not any(len(seg) for seg in segs):  # nothing before: no merge, no lse needed
                outs.append(dispatch.causal_attention(qs, ks, vs, self.scale, dtype=self.dtype))
                start += n
                continue
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
