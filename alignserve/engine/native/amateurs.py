"""Contrastive amateurs on the native engine: the contexts an amateur reads, opened and fed by
the engine itself (strategies only name the amateur, `engine.steering`).

- `AmateurPrompt`: the expert on another prompt. Each generating sequence gets a follower on
  this engine holding the prompt plus the sequence's output so far; the step code feeds it
  every token the sequence samples (one decode row more), and its pending logits are the
  amateur's.
- `ServedAmateur`: another engine (same vocabulary). Each sequence gets a sequence there holding
  its tokens so far; after each sampled token the engine extends it there and the sequence
  samples again once the amateur's logits are pending (lockstep, run by the engine's loop).
- `EarlyLayers` needs no context: the forward pass keeps the early layer's logits.

Sequences that share a context (the forks of one prompt) share its prefill: it is computed
once and forked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from alignserve.engine.protocol import SeqHandle, TokenTally


async def open_contexts(engine, seqs: Sequence[SeqHandle],
                        context_of: Callable[[SeqHandle], list[int]],
                        tally: TokenTally | None) -> list[SeqHandle]:
    """One sequence on `engine` per seq, holding `context_of(seq)`, logits pending."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(tuple(context_of(s)), []).append(i)
    out: list[SeqHandle | None] = [None] * len(seqs)
    opened: list[SeqHandle] = []
    try:
        for context, rows in groups.items():
            root = await engine.prefill(list(context), tally)
            opened.append(root)
            if len(rows) == 1:
                out[rows[0]] = root
                continue
            children = await engine.fork(root, len(rows))
            opened.extend(children)
            await engine.release([root])
            opened.remove(root)
            for i, child in zip(rows, children):
                out[i] = child
    except BaseException:
        await engine.release(opened)
        raise
    return out  # type: ignore[return-value]
