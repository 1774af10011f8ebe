"""KV memory: a token-slot pool per layer, and segments that let sequences share it.

A sequence's KV is a chain of segments, root first. Its last segment, the leaf, is its own
and is where its new tokens go; every other segment may be shared with other sequences
(a prompt shared by N candidates, a beam shared by its lookahead rollouts). Forking seals the
leaf (it becomes shared) and gives every branch a fresh leaf: nothing is copied. Segments are
lists of slot indices into the pool, so merging two segments, when the same sequences use
both, is a concatenation of indices, never of KV.
"""

from __future__ import annotations

import itertools

import torch

PAGE = 16  # slots are handed out in pages so a sequence's slots are mostly contiguous


def canonical_device(device: torch.device | str) -> torch.device:
    """The device as a tensor on it reports it: "cuda" becomes "cuda:<current>"."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class OutOfKVMemory(RuntimeError):
    pass


class SlotAllocator:
    """Pages handed out lowest first, in ascending order, also after frees: a prompt then gets
    one run of slots, which attention reads as a view of the pool. Freed pages appended as
    they came (the leaves' pages last in, first out) gave the next prompt its pages in
    reverse, and a CPU decode step then gathered that prompt's KV in every layer (two copies of
    1,447 x 3 x 64 floats a layer: a third of a 1-row step)."""

    def __init__(self, num_slots: int):
        self.num_pages = num_slots // PAGE
        self._free = list(range(self.num_pages - 1, -1, -1))  # descending: pop() takes the lowest
        self._sorted = True

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfKVMemory(f"need {n} pages, {len(self._free)} free")
        if not self._sorted:  # once after any frees: ~0.1 ms for a 2 GiB pool's pages
            self._free.sort(reverse=True)
            self._sorted = True
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        if pages:
            self._free.extend(pages)
            self._sorted = False


def slot_runs(slots: list[int]) -> list[tuple[int, int]]:
    """A slot list as its runs of consecutive slots [(start, stop), ...]."""
    runs: list[tuple[int, int]] = []
    for s in slots:
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


class Segment:
    _ids = itertools.count()

    def __init__(self) -> None:
        self.id = next(Segment._ids)
        self.slots: list[int] = []
        self.pages: list[int] = []
        self.tail_free = 0  # unused slots left in the last page
        self.users: set[int] = set()  # ids of the sequences whose chain holds this segment
        self._tensor: torch.Tensor | None = None
        self._range: tuple[int, int] | None = None
        self._runs: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.slots)

    def changed(self) -> None:
        self._tensor = None
        self._range = None
        self._runs = None

    def runs(self) -> list[tuple[int, int]]:
        """The slots as runs of consecutive slots [(start, stop), ...] (what the CPU attention
        kernel reads), built once until the segment changes."""
        if self._runs is None:
            self._runs = slot_runs(self.slots)
        return self._runs

    def slot_tensor(self, device: torch.device) -> torch.Tensor:
        """The slots as an int32 tensor (what the kernels index with), built once per device.
        Devices are compared as tensors name them ("cuda" is "cuda:0" here): a tensor built
        anew on every call would cost a copy per layer and a new address for CUDA graphs."""
        device = canonical_device(device)
        if self._tensor is None or self._tensor.device != device:
            self._tensor = torch.tensor(self.slots, dtype=torch.int32, device=device)
        return self._tensor

    def contiguous_range(self) -> tuple[int, int] | None:
        """(start, stop) when the slots are one run, so the pool can be read as a view."""
        if self._range is None and self.slots:
            start = self.slots[0]
            if self.slots[-1] - start + 1 == len(self.slots) and all(
                b - a == 1 for a, b in zip(self.slots, self.slots[1:])
            ):
                self._range = (start, start + len(self.slots))
            else:
                self._range = (-1, -1)
        return None if self._range is None or self._range[0] < 0 else self._range


class KVCache:
    """The pool tensors plus the bookkeeping of chains; one per engine."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        num_slots = max(PAGE, num_slots // PAGE * PAGE)
        self.num_slots = num_slots
        self.device = device = canonical_device(device)
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = SlotAllocator(num_slots)

    def convert(self, dtype: torch.dtype) -> None:
        """Hold the pool in `dtype` from now on, values kept (rounded when narrower): what the
        engine's exact-fp32 switch does to a CPU's bf16 pool. Slots, chains and segments stay."""
        if self.k.dtype != dtype:
            self.k, self.v = self.k.to(dtype), self.v.to(dtype)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def used_slots(self) -> int:
        return (self.allocator.num_pages - self.allocator.free_pages) * PAGE

    def free_slots(self) -> int:
        return self.allocator.free_pages * PAGE

    # chains -------------------------------------------------------------------------------
    def new_chain(self, seq_id: int) -> list[Segment]:
        leaf = Segment()
        leaf.users.add(seq_id)
        return [leaf]

    def append_slots(self, chain: list[Segment], n: int) -> list[int]:
        """Reserve n slots at the end of the chain's leaf; returns them."""
        leaf = chain[-1]
        out: list[int] = []
        take = min(n, leaf.tail_free)
        if take:
            first = leaf.pages[-1] * PAGE + (PAGE - leaf.tail_free)
            out.extend(range(first, first + take))
            leaf.tail_free -= take
        rest = n - take
        if rest:
            pages = self.allocator.allocate(-(-rest // PAGE))
            for p in pages:
                out.extend(range(p * PAGE, p * PAGE + PAGE))
            leaf.pages.extend(pages)
            leaf.tail_free = len(pages) * PAGE - rest
            out = out[:n]
        leaf.slots.extend(out)
        leaf.changed()
        return out

    def pages_needed(self, chain: list[Segment], n: int) -> int:
        return max(0, -(-(n - chain[-1].tail_free) // PAGE))

    def seal(self, chain: list[Segment], seq_id: int) -> None:
        """Make the leaf a shared-able segment and start a fresh leaf (no-op when empty)."""
        if len(chain[-1]) == 0:
            return
        leaf = Segment()
        leaf.users.add(seq_id)
        chain.append(leaf)

    def fork(self, chain: list[Segment], parent_id: int, child_ids: list[int]) -> list[list[Segment]]:
        self.seal(chain, parent_id)
        shared = chain[:-1]
        children = []
        for cid in child_ids:
            for seg in shared:
                seg.users.add(cid)
            children.append(shared + self.new_chain(cid))
        return children

    def truncate_leaf(self, chain: list[Segment], keep_in_leaf: int) -> None:
        # A leaf owns all its pages and fills them in order: slot i lives in pages[i // PAGE].
        leaf = chain[-1]
        if keep_in_leaf >= len(leaf):
            return
        keep_pages = -(-keep_in_leaf // PAGE)
        self.allocator.free(leaf.pages[keep_pages:])
        leaf.pages = leaf.pages[:keep_pages]
        leaf.slots = leaf.slots[:keep_in_leaf]
        leaf.tail_free = keep_pages * PAGE - keep_in_leaf
        leaf.changed()

    def release(self, chain: list[Segment], seq_id: int, chains: dict[int, list[Segment]]) -> None:
        """Drop a sequence; free segments nobody uses; merge segments that became equivalent."""
        for seg in chain:
            seg.users.discard(seq_id)
            if not seg.users:
                self.allocator.free(seg.pages)
                seg.pages, seg.slots = [], []
        survivors = {u for seg in chain for u in seg.users}
        for uid in survivors:
            self.normalize(chains[uid], chains)

    def normalize(self, chain: list[Segment], chains: dict[int, list[Segment]]) -> None:
        """Merge adjacent shared segments used by exactly the same sequences."""
        i = 0
        while i < len(chain) - 2:  # never merge into the leaf
            a, b = chain[i], chain[i + 1]
            if a.users == b.users:
                a.slots = a.slots + b.slots
                a.pages = a.pages + b.pages
                a.tail_free = 0  # the gap is not reusable: a no longer grows
                a.changed()
                for uid in b.users:
                    chains[uid].remove(b)
            else:
                i += 1

    def chain_length(self, chain: list[Segment]) -> int:
        return sum(len(s) for s in chain)
