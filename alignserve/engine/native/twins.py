"""Twin rows: samples of one request that are the same sequence in a decode step.

N samples forked from one prompt draw their first tokens from the same distribution, and a
chat model's first tokens are few ("The", "A"): 16 samples at temperature 0.7 start with about
4 distinct tokens and 8 distinct pairs (bench/prune_sim.py's pool of keyword prompts). Rows
with the same KV (the same shared segments, the same tokens in their own leaves) that feed the
same token at the same position compute the same K, V and logits. The step computes one of
them, the representative; each twin gets a copy of its new K/V slot and its logits, and goes
on sampling with its own random stream, so twins diverge where sampling makes them. Nothing is
approximated: a twin's KV and logits are what its own forward pass would have produced, up to
the batch-size rounding any batched step has. Greedy samples of one prompt stay twins for
good, and cost one row.

Only rows charged to the same request (one `generate` group or one `extend` call) are
compared, so every request's model tokens are its own.
"""

from __future__ import annotations

from typing import Any

from alignserve.engine.native.sequence import SeqState


def twin_of(rows: list[tuple[SeqState, int, Any]]) -> list[int]:
    """For each row (state, token just fed, owner) after its token was recorded and its new
    slot appended: the index of the row it is a twin of, or its own index when it is computed
    itself. Rows are bucketed by what is cheap to compare (owner, shared segments, leaf
    length, token); only rows that share a bucket compare their leaves' tokens."""
    out = list(range(len(rows)))
    buckets: dict[tuple, list[int]] = {}
    for i, (st, tok, owner) in enumerate(rows):
        key = (id(owner), st.early_layer, tuple(seg.id for seg in st.chain[:-1]),
               len(st.chain[-1]), tok)
        buckets.setdefault(key, []).append(i)
    for members in buckets.values():
        if len(members) < 2:
            continue
        first: dict[tuple[int, ...], int] = {}
        for i in members:
            st = rows[i][0]
            leaf = tuple(st.handle.token_ids[len(st.handle.token_ids) - len(st.chain[-1]):])
            out[i] = first.setdefault(leaf, i)
    return out
