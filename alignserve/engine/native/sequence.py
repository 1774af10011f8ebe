"""Engine-side state of a sequence and of a group being generated together."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from alignserve.engine.native.kv_cache import Segment
from alignserve.engine.protocol import Observer, SamplingParams, SeqHandle, TokenTally
from alignserve.engine.steering import Steering
from alignserve.engine.text import DeferredText, IncrementalText


@dataclass(eq=False)
class GenGroup:
    """Sequences that one `generate` call samples with the same parameters."""

    params: SamplingParams
    steering: Steering | None
    observer: Observer | None
    queue: asyncio.Queue
    tally: TokenTally | None
    kind: str
    stop_ids: frozenset[int]
    live: int = 0
    bitmask: Any = None  # the allowed-token mask buffer, reused by each step (sampler.py)
    amateur: Any = None  # a served amateur engine (steering), fed in lockstep
    feeding: set = field(default_factory=set)  # its extend tasks in flight


@dataclass(eq=False)
class SeqState:
    id: int
    handle: SeqHandle
    chain: list[Segment]
    logits: torch.Tensor | None = None  # pending next-token logits [V], float32
    hidden: torch.Tensor | None = None  # the normalized hidden state behind `logits`
    early_layer: int | None = None  # also keep the logits of the first early_layer layers
    early_logits: torch.Tensor | None = None
    # the contrastive amateur's context when it is the expert on another prompt: a sequence of
    # this engine fed every token this one samples
    follower: SeqState | None = None
    # a served amateur (another engine) in lockstep: its handle, and whether the token this
    # sequence last sampled is still being fed to it (the sequence waits for its logits)
    amateur: SeqHandle | None = None
    amateur_pending: bool = False
    group: GenGroup | None = None
    rng_seed: int = 0
    text: IncrementalText | DeferredText | None = None
    released: bool = False
    busy: bool = False  # in a queued extend or prefill
    # structured outputs: this sequence's grammar matcher (engine/grammar GrammarState),
    # started by the sampler on its first constrained step, forked and truncated with it
    grammar: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.handle.token_ids)
