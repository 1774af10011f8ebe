"""The CPU decode-attention kernel (C++, built here at first use) against the PyTorch reference.

Each case is a decode step's jobs: shared segments with the rows that read them, each row's own
leaf, rows in several jobs (a tree of segments) or in none, key runs with gaps. The kernel's
pools are bf16 and its queries fp32; it accumulates in fp32, and its scores multiply fp32 queries
or, on CPUs with bf16 dot products, queries rounded to bf16. So the reference runs in fp32 on the
same (rounded) keys and the tolerance is that of reordering in the dtype the queries enter in
(`attention_tol`).
"""

from __future__ import annotations

import pytest
import torch

from alignserve.engine.native.attention import DecodePlan
from alignserve.engine.native.kv_cache import KVCache
from alignserve.kernels import attention_cpu, cpu_build
from alignserve.kernels.attention import attention_lse_reference
from tests.tolerance import attention_tol


def _query_dtype() -> torch.dtype:
    return torch.bfloat16 if attention_cpu.bf16_scores() else torch.float32


needs_kernel = pytest.mark.skipif(cpu_build.compiler() is None,
                                  reason="no C++ compiler on PATH (the kernel's fallback is tested)")


def test_the_kernel_builds_where_a_compiler_is():
    if cpu_build.compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    assert attention_cpu.library() is not None


def test_a_failing_build_raises_with_the_compilers_words(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="failed"):
        cpu_build.build(attention_cpu.SOURCE, "false")  # exits 1 for any arguments
    assert not list(tmp_path.rglob("*.so"))  # no half-built library left to load


def test_load_is_none_without_a_compiler_or_with_a_stale_build(tmp_path, monkeypatch, caplog):
    source = tmp_path / "cpu_attention_copy.cpp"  # a path of its own: `load` caches per source
    source.write_text(attention_cpu.SOURCE.read_text())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    assert cpu_build.load(source, "alignserve_cpu_attention_version", attention_cpu.VERSION) is None
    assert "no C++ compiler" in caplog.text
    monkeypatch.undo()
    if cpu_build.compiler() is None:
        return
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    other = tmp_path / "cpu_attention_other.cpp"
    other.write_text(attention_cpu.SOURCE.read_text())
    assert cpu_build.load(other, "alignserve_cpu_attention_version", attention_cpu.VERSION + 1) is None
    assert "another version" in caplog.text


def _reference(q, k_pool, v_pool, jobs, scale):
    """Per row: attention over the concatenated keys of every job that holds it."""
    rows, h, d = q.shape
    out = torch.zeros(rows, h, d)
    lse = torch.full((rows, h), float("-inf"))
    for r in range(rows):
        slots = [s for job_rows, ranges in jobs if r in job_rows for a, b in ranges
                 for s in range(a, b)]
        if slots:
            idx = torch.tensor(slots)
            o, l = attention_lse_reference(q[r : r + 1], k_pool[idx].float(), v_pool[idx].float(),
                                           scale)
            out[r], lse[r] = o[0], l[0]
    return out, lse


def _case(name: str, gen: torch.Generator):
    """(rows, jobs) for the named layout, over a pool of 8192 slots."""
    if name == "one_row_window":  # a prompt's run, then its answer's pages after a gap
        return 1, [([0], [(0, 1447)]), ([0], [(1456, 1520)])]
    if name == "group_and_leaves":  # n samples of one prompt
        return 16, [(list(range(16)), [(0, 1447)])] + [
            ([r], [(2048 + 128 * r, 2048 + 128 * r + 5 + 7 * r)]) for r in range(16)]
    if name == "tree":  # prompt, two beams' segments, leaves; one row reads nothing
        return 6, [([0, 1, 2, 3, 4], [(0, 300), (320, 333)]), ([0, 1], [(400, 437)]),
                   ([2, 3, 4], [(500, 516), (540, 541)]), ([0], [(600, 601)]),
                   ([3], [(700, 750)]), ([4], [])]
    if name == "many_lanes":  # 40 rows: more lanes than one work item holds
        return 40, [(list(range(40)), [(16, 999)])] + [([r], [(1024 + 16 * r, 1033 + 16 * r)])
                                                        for r in range(40)]
    if name == "scattered":  # a segment whose slots are many short runs
        slots = torch.randperm(4000, generator=gen)[:700].sort().values.tolist()
        ranges = [(s, s + 1) for s in slots]
        return 3, [([0, 1, 2], ranges), ([1], [(5000, 5003)])]
    raise ValueError(name)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 128), (4, 4, 64), (16, 1, 64)])
@pytest.mark.parametrize("layout", ["one_row_window", "group_and_leaves", "tree", "many_lanes",
                                    "scattered"])
def test_kernel_matches_the_reference(heads, kv_heads, dim, layout):
    gen = torch.Generator().manual_seed(hash((heads, layout)) % 2**31)
    rows, jobs = _case(layout, gen)
    k_pool = torch.randn(8192, kv_heads, dim, generator=gen).bfloat16()
    v_pool = torch.randn(8192, kv_heads, dim, generator=gen).bfloat16()
    q = torch.randn(rows, heads, dim, generator=gen) * 2  # peaked softmaxes too
    scale = dim**-0.5
    out, lse = attention_cpu.decode_attention(q, k_pool, v_pool,
                                              attention_cpu.DecodeJobs.build(rows, jobs), scale)
    ref_out, ref_lse = _reference(q, k_pool, v_pool, jobs, scale)
    longest = max(sum(b - a for job_rows, ranges in jobs if r in job_rows for a, b in ranges)
                  for r in range(rows))
    tol = attention_tol(dim, longest, _query_dtype())
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    empty = torch.isinf(ref_lse[:, 0])
    assert torch.equal(torch.isinf(lse[:, 0]), empty)  # a row with no keys: lse -inf, out 0
    assert not out[empty].any()


@needs_kernel
def test_the_build_without_bf16_dot_products_matches_in_fp32(tmp_path, monkeypatch):
    """The fp32 path that CPUs without AVX512-BF16 build, built here with it switched off:
    fp32 reordering's tolerance, every layout, and a prompt's causal jobs."""
    if not attention_cpu.bf16_scores():
        pytest.skip("this CPU's own build is the fp32 one (the tests above cover it)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_build, "FLAGS", (*cpu_build.FLAGS, "-mno-avx512bf16"))
    source = tmp_path / "cpu_attention_fp32.cpp"
    source.write_text(attention_cpu.SOURCE.read_text())
    lib = cpu_build.load(source, "alignserve_cpu_attention_version", attention_cpu.VERSION)
    assert lib is not None and lib.alignserve_cpu_attention_bf16_scores() == 0
    monkeypatch.setattr(attention_cpu, "library", lambda: attention_cpu.declare(lib))
    gen = torch.Generator().manual_seed(5)
    k_pool = torch.randn(8192, 3, 64, generator=gen).bfloat16()
    v_pool = torch.randn(8192, 3, 64, generator=gen).bfloat16()
    cases = [_case(name, gen) for name in ("one_row_window", "group_and_leaves", "tree",
                                           "many_lanes", "scattered")]
    cases.append((50, [(list(range(b, min(50, b + 21))), [(100, 100 + min(50, b + 21))])
                       for b in range(0, 50, 21)]))  # a 50-token prompt in causal blocks
    for i, (rows, jobs) in enumerate(cases):
        causal = [True] * len(jobs) if i == len(cases) - 1 else None
        q = torch.randn(rows, 9, 64, generator=gen)
        out, lse = attention_cpu.decode_attention(
            q, k_pool, v_pool, attention_cpu.DecodeJobs.build(rows, jobs, causal), 0.125)
        if causal:
            ref_out, ref_lse = attention_lse_reference(q, k_pool[100:150].float(),
                                                       v_pool[100:150].float(), 0.125, 0)
        else:
            ref_out, ref_lse = _reference(q, k_pool, v_pool, jobs, 0.125)
        tol = attention_tol(64, 1447 + 128)
        torch.testing.assert_close(out, ref_out, **tol)
        torch.testing.assert_close(lse, ref_lse, **tol)


@needs_kernel
def test_threads_do_not_change_the_result():
    """Work is split by threads (key chunks), merged in a fixed order per thread count: every
    count is within reordering of the reference, and a given count is deterministic."""
    gen = torch.Generator().manual_seed(7)
    rows, jobs = _case("group_and_leaves", gen)
    k_pool = torch.randn(8192, 3, 64, generator=gen).bfloat16()
    v_pool = torch.randn(8192, 3, 64, generator=gen).bfloat16()
    q = torch.randn(rows, 9, 64, generator=gen)
    packed = attention_cpu.DecodeJobs.build(rows, jobs)
    before = torch.get_num_threads()
    try:
        outs = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs[n] = attention_cpu.decode_attention(q, k_pool, v_pool, packed, 0.125)[0]
            again = attention_cpu.decode_attention(q, k_pool, v_pool, packed, 0.125)[0]
            assert torch.equal(outs[n], again)
    finally:
        torch.set_num_threads(before)
    for n in (2, 3):
        torch.testing.assert_close(outs[n], outs[1], **attention_tol(64, 1447 + 110, _query_dtype()))


def _step(kv_heads: int, dim: int, suffixes: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(2, 4096, kv_heads, dim, torch.bfloat16, torch.device("cpu"))
    root = cache.new_chain(0)
    slots = torch.tensor(cache.append_slots(root, 333))
    for layer in range(2):
        cache.k[layer, slots] = torch.randn(333, kv_heads, dim, generator=gen).bfloat16()
        cache.v[layer, slots] = torch.randn(333, kv_heads, dim, generator=gen).bfloat16()
    children = cache.fork(root, 0, list(range(1, len(suffixes) + 1)))
    for chain, n in zip(children, suffixes):
        s = torch.tensor(cache.append_slots(chain, n), dtype=torch.long)
        for layer in range(2):
            cache.k[layer, s] = torch.randn(n, kv_heads, dim, generator=gen).bfloat16()
            cache.v[layer, s] = torch.randn(n, kv_heads, dim, generator=gen).bfloat16()
    new = [cache.append_slots(c, 1)[0] for c in children]
    q = torch.randn(len(children), 3 * kv_heads, dim, generator=gen)
    kn = torch.randn(len(children), kv_heads, dim, generator=gen)
    return cache, children, new, q, kn


@needs_kernel
@pytest.mark.parametrize("suffixes", [[20], [0, 4, 17, 40]])
def test_decode_plan_runs_the_kernel_and_agrees_with_torchs_ops(monkeypatch, suffixes):
    outs = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("ALIGNSERVE_CPU_ATTENTION", setting)
        cache, chains, new, q, kn = _step(3, 64, suffixes, seed=len(suffixes))
        plan = DecodePlan(cache, chains, new, 0.125)
        outs[setting] = plan.attend(1, q, kn, kn)
        assert (plan._cpu_jobs is not None) == (setting == "on")
    # torch's fused op rounds the queries to bf16 (the pool's dtype); the kernel keeps fp32
    torch.testing.assert_close(outs["on"], outs["off"], **attention_tol(64, 400, torch.bfloat16))


def test_unserved_shapes_keep_torchs_ops(monkeypatch):
    """Head dims the kernel has no build for, and fp32 pools (the exact engine), take the
    existing paths."""
    cache, chains, new, q, kn = _step(2, 32, [3, 5], seed=1)
    plan = DecodePlan(cache, chains, new, 0.2)
    plan.attend(0, q, kn, kn)
    assert plan._cpu_jobs is None
    assert not attention_cpu.available(torch.zeros(1, 6, 64), torch.zeros(4, 2, 64))


@needs_kernel
@pytest.mark.parametrize("dim,context,counts", [(64, 0, [1447]), (64, 300, [37, 1, 70]),
                                                (128, 17, [5, 64])])
def test_extend_plan_runs_the_kernel_causally(dim, context, counts):
    """A prompt's prefill (nothing before) and extends after a shared context: every new token
    sees the context and the new tokens up to itself, through the kernel's causal jobs."""
    from alignserve.engine.native.attention import ExtendPlan

    kv_heads, heads = 2, 8
    gen = torch.Generator().manual_seed(context + len(counts))
    cache = KVCache(1, 8192, kv_heads, dim, torch.bfloat16, torch.device("cpu"))
    root = cache.new_chain(0)
    if context:
        s = torch.tensor(cache.append_slots(root, context), dtype=torch.long)
        cache.k[0, s] = torch.randn(context, kv_heads, dim, generator=gen).bfloat16()
        cache.v[0, s] = torch.randn(context, kv_heads, dim, generator=gen).bfloat16()
    chains = cache.fork(root, 0, list(range(1, len(counts) + 1)))
    new = [slot for chain, n in zip(chains, counts) for slot in cache.append_slots(chain, n)]
    total = sum(counts)
    q = torch.randn(total, heads, dim, generator=gen)
    k = torch.randn(total, kv_heads, dim, generator=gen).bfloat16().float()
    v = torch.randn(total, kv_heads, dim, generator=gen).bfloat16().float()
    plan = ExtendPlan(cache, [c[:-1] for c in chains], counts, new, dim**-0.5)
    out = plan.attend(0, q, k, v)
    assert plan._cpu_jobs is not None
    start = 0
    for chain, n in zip(chains, counts):
        slots = torch.tensor([s for seg in chain for s in seg.slots])
        kc, vc = cache.k[0, slots].float(), cache.v[0, slots].float()
        assert torch.equal(kc[len(kc) - n:], k[start : start + n])  # the new KV was stored
        ref, _ = attention_lse_reference(q[start : start + n], kc, vc, dim**-0.5,
                                         causal_offset=len(kc) - n)
        torch.testing.assert_close(out[start : start + n], ref,
                                   **attention_tol(dim, len(kc), _query_dtype()))
        start += n
