"""Shared-prefix (Hydragen) attention equals ordinary attention over the concatenated KV."""

from __future__ import annotations

import pytest
import torch

from alignserve.engine.native.attention import DecodePlan, ExtendPlan
from alignserve.engine.native.kv_cache import PAGE, KVCache
from alignserve.kernels.attention import attention_lse_reference
from tests.tolerance import attention_tol


def _fill(cache: KVCache, chain, n: int, gen: torch.Generator) -> None:
    slots = torch.tensor(cache.append_slots(chain, n), dtype=torch.int64)
    for layer in range(cache.k.shape[0]):
        cache.k[layer, slots] = torch.randn(n, *cache.k.shape[2:], generator=gen).to(cache.k.dtype)
        cache.v[layer, slots] = torch.randn(n, *cache.v.shape[2:], generator=gen).to(cache.v.dtype)


def _chain_kv(cache: KVCache, chain, layer: int):
    slots = torch.tensor([s for seg in chain for s in seg.slots])
    return cache.k[layer, slots], cache.v[layer, slots]


@pytest.mark.parametrize(
    "heads,kv_heads,dim,prefix,suffixes",
    [
        (9, 3, 64, 200, [1, 5, 17, 33]),
        (4, 1, 32, 37, [1]),
        (8, 8, 16, 1, [3, 3, 70]),
        (6, 2, 64, 300, [40, 1, 2, 90, 5, 6, 7, 8]),
    ],
)
def test_decode_plan_matches_full_attention(heads, kv_heads, dim, prefix, suffixes):
    gen = torch.Generator().manual_seed(prefix * 7 + len(suffixes))
    cache = KVCache(2, 4096, kv_heads, dim, torch.float32, torch.device("cpu"))
    root = cache.new_chain(0)
    _fill(cache, root, prefix, gen)
    children = cache.fork(root, 0, list(range(1, len(suffixes) + 1)))
    for chain, n in zip(children, suffixes):
        _fill(cache, chain, n - 1, gen)  # the step's own token is written by the plan
    new_slots = [cache.append_slots(c, 1)[0] for c in children]
    plan = DecodePlan(cache, children, new_slots, dim**-0.5)
    q = torch.randn(len(children), heads, dim, generator=gen)
    k_new = torch.randn(len(children), kv_heads, dim, generator=gen)
    v_new = torch.randn(len(children), kv_heads, dim, generator=gen)
    out = plan.attend(1, q, k_new, v_new)
    assert len(plan.groups) == 1  # the prefix is one group: read once for all sequences
    for i, chain in enumerate(children):
        k, v = _chain_kv(cache, chain, 1)
        assert torch.equal(k[-1], k_new[i])  # the plan stored the new token's KV
        ref, _ = attention_lse_reference(q[i : i + 1], k, v, dim**-0.5)
        torch.testing.assert_close(out[i : i + 1], ref, **attention_tol(dim, len(k)))


@pytest.mark.parametrize("force", ["reference", None])
@pytest.mark.parametrize("prefix,before,answer", [(200, 0, 1), (37, 0, 40), (1408, 3, 70)])
def test_one_sequence_attends_over_its_window(monkeypatch, force, prefix, before, answer):
    """A lone sequence whose prompt and answer lie in one run of pages (gaps: the tails of
    partly used pages) is served by one masked attention over the run; it equals attention
    over its own keys, and other sequences' KV inside the run is masked out."""
    from alignserve.kernels import dispatch

    monkeypatch.setattr(dispatch, "FORCE", force)
    heads, kv_heads, dim = 9, 3, 64
    gen = torch.Generator().manual_seed(prefix + answer)
    cache = KVCache(2, 4096, kv_heads, dim, torch.float32, torch.device("cpu"))
    root = cache.new_chain(0)
    _fill(cache, root, prefix, gen)
    [chain] = cache.fork(root, 0, [1])
    other = cache.new_chain(2)  # another sequence's page between the prompt's and the answer's
    if before:
        _fill(cache, other, before, gen)
    _fill(cache, chain, answer - 1, gen)
    slot = cache.append_slots(chain, 1)
    plan = DecodePlan(cache, [chain], slot, dim**-0.5)
    lo, hi, runs = plan.window
    assert len(runs) == 2 and hi - lo >= prefix + answer + (PAGE if before else 0)
    q = torch.randn(1, heads, dim, generator=gen)
    k_new, v_new = torch.randn(1, kv_heads, dim, generator=gen), torch.randn(1, kv_heads, dim, generator=gen)
    out = plan.attend(1, q, k_new, v_new)
    k, v = _chain_kv(cache, [chain[0], chain[1]], 1)
    ref, _ = attention_lse_reference(q, k, v, dim**-0.5)
    torch.testing.assert_close(out, ref, **attention_tol(dim, len(k)))
    plan.window = None  # the general path (gather, second attention, merge) agrees
    torch.testing.assert_close(plan.attend(1, q, k_new, v_new), ref, **attention_tol(dim, len(k)))


def test_no_window_where_the_keys_are_scattered():
    gen = torch.Generator().manual_seed(5)
    cache = KVCache(1, 4096, 1, 8, torch.float32, torch.device("cpu"))
    root = cache.new_chain(0)
    _fill(cache, root, 20, gen)
    [chain] = cache.fork(root, 0, [1])
    far = cache.new_chain(2)
    _fill(cache, far, 5 * PAGE, gen)  # the answer starts five pages past the prompt
    _fill(cache, chain, 3, gen)
    assert DecodePlan(cache, [chain], cache.append_slots(chain, 1), 0.3).window is None
    other = cache.new_chain(3)
    _fill(cache, chain, PAGE, gen)
    _fill(cache, other, 1, gen)  # takes the next page: the answer's next page is not adjacent
    _fill(cache, chain, PAGE, gen)
    assert DecodePlan(cache, [chain], cache.append_slots(chain, 1), 0.3).window is None
    two = cache.fork(root, 0, [4, 5])  # two rows: the grouped path, never a window
    assert DecodePlan(cache, two, [cache.append_slots(c, 1)[0] for c in two], 0.3).window is None


@pytest.mark.parametrize("suffixes", [[9], [1, 5, 17]])
def test_a_bf16_pool_is_read_in_bf16(suffixes):
    """A CPU's bf16 KV pool with fp32 queries (the engine's default where the linears run in
    bf16): the lone row's window and the grouped path both compute in bf16 and stay within
    bf16 rounding of fp32 attention over the same (rounded) keys."""
    heads, kv_heads, dim, prefix = 9, 3, 64, 700
    gen = torch.Generator().manual_seed(len(suffixes))
    cache = KVCache(1, 4096, kv_heads, dim, torch.bfloat16, torch.device("cpu"))
    root = cache.new_chain(0)
    _fill(cache, root, prefix, gen)
    children = cache.fork(root, 0, list(range(1, len(suffixes) + 1)))
    for chain, n in zip(children, suffixes):
        _fill(cache, chain, n - 1, gen)
    plan = DecodePlan(cache, children, [cache.append_slots(c, 1)[0] for c in children], dim**-0.5)
    assert (plan.window is not None) == (len(children) == 1)
    q = torch.randn(len(children), heads, dim, generator=gen)
    kv_new = torch.randn(len(children), kv_heads, dim, generator=gen)
    out = plan.attend(0, q, kv_new, kv_new)
    assert out.dtype == torch.float32
    for i, chain in enumerate(children):
        k, v = _chain_kv(cache, chain, 0)
        ref, _ = attention_lse_reference(q[i : i + 1], k.float(), v.float(), dim**-0.5)
        torch.testing.assert_close(out[i : i + 1], ref, **attention_tol(dim, len(k), torch.bfloat16))


def test_deep_tree_of_segments_and_merge_after_release():
    gen = torch.Generator().manual_seed(3)
    cache = KVCache(1, 2048, 2, 16, torch.float32, torch.device("cpu"))
    chains = {0: cache.new_chain(0)}
    _fill(cache, chains[0], 50, gen)
    for cid, chain in zip([1, 2], cache.fork(chains[0], 0, [1, 2])):
        chains[cid] = chain
        _fill(cache, chain, 9, gen)
    for cid, chain in zip([3, 4], cache.fork(chains[1], 1, [3, 4])):
        chains[cid] = chain
        _fill(cache, chain, 4, gen)
    used = cache.used_slots
    cache.release(chains.pop(0), 0, chains)
    cache.release(chains.pop(2), 2, chains)
    assert cache.used_slots < used  # sequence 2's own pages went back
    cache.release(chains.pop(1), 1, chains)
    # 3 and 4 now share prompt + beam: the two shared segments merged into one.
    assert len(chains[3]) == 2 and chains[3][0] is chains[4][0]
    assert len(chains[3][0]) == 59
    live = [chains[3], chains[4]]
    slots = [cache.append_slots(c, 1)[0] for c in live]
    plan = DecodePlan(cache, live, slots, 0.25)
    q = torch.randn(2, 4, 16, generator=gen)
    kn, vn = torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen)
    out = plan.attend(0, q, kn, vn)
    for i, chain in enumerate(live):
        k, v = _chain_kv(cache, chain, 0)
        ref, _ = attention_lse_reference(q[i : i + 1], k, v, 0.25)
        torch.testing.assert_close(out[i : i + 1], ref, **attention_tol(16, len(k)))
    for cid in (3, 4):
        cache.release(chains.pop(cid), cid, chains)
    assert cache.used_slots == 0


def test_extend_plan_is_causal_over_context():
    gen = torch.Generator().manual_seed(5)
    cache = KVCache(1, 1024, 1, 8, torch.float32, torch.device("cpu"))
    chain = cache.new_chain(0)
    _fill(cache, chain, 21, gen)
    before = [seg for seg in chain]
    from alignserve.engine.native.kv_cache import Segment

    snap = Segment()
    snap.slots = list(chain[-1].slots)
    new = cache.append_slots(chain, 6)
    plan = ExtendPlan(cache, [before[:-1] + [snap]], [6], new, 8**-0.5)
    q = torch.randn(6, 2, 8, generator=gen)
    kn, vn = torch.randn(6, 1, 8, generator=gen), torch.randn(6, 1, 8, generator=gen)
    out = plan.attend(0, q, kn, vn)
    k, v = _chain_kv(cache, chain, 0)
    ref, _ = attention_lse_reference(q, k, v, 8**-0.5, causal_offset=21)
    torch.testing.assert_close(out, ref, **attention_tol(8, len(k)))


def test_truncate_leaf_returns_pages():
    cache = KVCache(1, 512, 1, 8, torch.float32, torch.device("cpu"))
    chain = cache.new_chain(0)
    cache.append_slots(chain, 3 * PAGE + 2)
    cache.truncate_leaf(chain, PAGE + 1)
    assert len(chain[-1]) == PAGE + 1 and cache.used_slots == 2 * PAGE
    again = cache.append_slots(chain, PAGE - 1)  # fills the kept page first
    assert again[0] == chain[-1].slots[PAGE + 1] and cache.used_slots == 2 * PAGE
