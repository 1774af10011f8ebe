"""Whole prompts whose KV outlives their requests, so that a request repeating a prompt skips
its prefill: what vLLM's prefix cache does for a prompt sent again (a benchmark's, a chat's
system prompt and history, a best-of-N retried).

An entry holds the prompt's sealed segments through a chain of its own (a pseudo-sequence that
the KV cache counts as one more user, so releasing the requests frees nothing), and the
prompt's last-token logits and hidden state, which a new sequence starts from. A hit forks
that chain: nothing is copied. Entries are keyed by the token ids and the numeric mode the KV
was computed in (bf16 or exact fp32 linears: a test may switch the model between them), and
evicted least recently used beyond `max_slots`, or all at once when the engine runs short of
KV memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from alignserve.engine.native.kv_cache import KVCache, Segment


@dataclass
class CachedPrompt:
    owner: int  # the pseudo-sequence id that keeps the segments alive
    chain: list[Segment]  # the prompt's shared segments plus an empty leaf
    logits: torch.Tensor  # [V] float32: the prompt's next-token logits
    hidden: torch.Tensor | None
    slots: int


class PromptCache:
    def __init__(self, kv: KVCache, chains: dict[int, list[Segment]], max_slots: int):
        """`chains`: the engine's id -> chain map, which the KV cache's release reads to
        merge segments; the pseudo-sequences live there too."""
        self.kv, self.chains, self.max_slots = kv, chains, max_slots
        self._entries: OrderedDict[Hashable, CachedPrompt] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def slots(self) -> int:
        return sum(e.slots for e in self._entries.values())

    def lookup(self, key: Hashable) -> CachedPrompt | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def remember(self, key: Hashable, chain: list[Segment], seq_id: int, new_id: Callable[[], int],
                 logits: torch.Tensor, hidden: torch.Tensor | None) -> bool:
        """Keep the prompt `chain` (sealed: its leaf is empty) of sequence `seq_id`; False when
        it is already kept or larger than the whole budget."""
        slots = self.kv.chain_length(chain)
        if key in self._entries or slots > self.max_slots or not slots:
            return False
        owner = new_id()
        own = self.kv.fork(chain, seq_id, [owner])[0]
        self.chains[owner] = own
        # Clones: the rows are views of a whole step's logits, which they would keep alive.
        self._entries[key] = CachedPrompt(owner, own, logits.clone(),
                                          None if hidden is None else hidden.clone(), slots)
        while self.slots > self.max_slots:
            self._drop(next(iter(self._entries)))
        return True

    def clear(self) -> int:
        """Drop every entry (the engine is short of KV memory); returns how many slots that
        freed (segments that live sequences still use stay)."""
        before = self.kv.free_slots()
        for key in list(self._entries):
            self._drop(key)
        return self.kv.free_slots() - before

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self.kv.release(entry.chain, entry.owner, self.chains)
        del self.chains[entry.owner]
