"""Decode attention over the slot pool: the Triton kernels against the PyTorch references.

The Triton kernels run on CPU under TRITON_INTERPRET=1, which triton reads when it is first
imported; other tests in this process import it earlier (transformers does), so the kernel tests
run in a child pytest process started by `test_triton_attention_kernels_under_interpreter`
(only the `test_triton_*` tests, defined only in that child). The reference tests and a compile
of the kernels for an H100 (sm_90, no GPU needed) run in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from alignserve.kernels import attention_fused, dispatch
from alignserve.kernels.attention import attention_lse_reference, merge_attention
from tests.tolerance import attention_tol, model_tol, reorder_tol

CHILD = os.environ.get("ALIGNSERVE_TRITON_CHILD") == "1"
INF = float("inf")
# A merge is elementwise: two exps and a sum of two terms per element
MERGE_TOL = reorder_tol(torch.float32, 2, depth=2)


def _pool(slots: int, kvh: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, kvh, d, generator=g).to(dtype)
    v = torch.randn(slots, kvh, d, generator=g).to(dtype)
    return k, v, g


def _shared_prefix_case(b: int, h: int, kvh: int, d: int, prefix: int, leaf_lens: list[int],
                        seed: int = 0):
    """A group of b sequences sharing `prefix` slots (not contiguous), each with its own leaf."""
    pool = prefix + sum(leaf_lens) + 17
    k, v, g = _pool(pool, kvh, d, seed)
    perm = torch.randperm(pool, generator=g).int()
    prefix_slots = perm[:prefix]
    lmax = max(max(leaf_lens), 1)
    table = torch.full((b, lmax), 10**6, dtype=torch.int32)  # padding must never be read
    start = prefix
    for i, n in enumerate(leaf_lens):
        table[i, :n] = perm[start:start + n]
        start += n
    q = torch.randn(b, h, d, generator=g)
    lengths = torch.tensor(leaf_lens, dtype=torch.int32)
    return q, k, v, prefix_slots, table, lengths


def _full_attention(q, k, v, prefix_slots, table, lengths, scale):
    outs, lses = [], []
    for i in range(q.shape[0]):
        idx = torch.cat([prefix_slots, table[i, : int(lengths[i])]]).long()
        o, l = attention_lse_reference(q[i:i + 1], k[idx], v[idx], scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


# ----------------------------------------------------------------------------------------------
# this process: references, dispatch on CPU, and the compile for sm_90
# ----------------------------------------------------------------------------------------------

if not CHILD:

    def test_merge_of_prefix_and_leaves_equals_attention_over_concatenation():
        scale = 64 ** -0.5
        q, k, v, pre, table, lengths = _shared_prefix_case(4, 9, 3, 64, 37, [0, 1, 5, 12])
        o_p, l_p = dispatch.segment_attention(q, k, v, pre, scale)
        o_l, l_l = dispatch.leaf_attention(q, k, v, table, lengths, scale)
        assert torch.isneginf(l_l[0]).all() and (o_l[0] == 0).all()  # an empty leaf
        out, lse = merge_attention(o_p, l_p, o_l, l_l)
        ref_o, ref_l = _full_attention(q, k, v, pre, table, lengths, scale)
        tol = attention_tol(64, 37 + 12)
        torch.testing.assert_close(out, ref_o, **tol)
        torch.testing.assert_close(lse, ref_l, **tol)

    def test_merge_into_reference_folds_a_segment_into_its_rows():
        scale = 0.125
        q, k, v, pre, table, lengths = _shared_prefix_case(5, 4, 1, 64, 20, [3, 0, 4, 1, 2],
                                                           seed=4)
        out, lse = dispatch.leaf_attention(q, k, v, table, lengths, scale)
        rows = torch.tensor([3, 1, 4])  # the group sharing the prefix
        o_p, l_p = dispatch.segment_attention(q[rows], k, v, pre, scale)
        dispatch.merge_attention_into(out, lse, rows, o_p, l_p)
        ref_o, ref_l = _full_attention(q, k, v, pre, table, lengths, scale)
        tol = attention_tol(64, 20 + 4)
        torch.testing.assert_close(out[rows], ref_o[rows], **tol)
        torch.testing.assert_close(lse[rows], ref_l[rows], **tol)

    def test_dispatch_on_cpu_uses_torchs_fused_attention_or_the_forced_reference():
        q = torch.randn(2, 4, 64)
        assert not dispatch.uses_triton(q)
        assert not dispatch.uses_triton(q, force="reference")
        with pytest.raises(ValueError):
            dispatch.uses_triton(q, force="fast")
        assert attention_fused.available(q)
        k, v, _ = _pool(30, 1, 64, 1)
        slots = torch.tensor([29, 3, 7, 0, 12], dtype=torch.int32)
        ref_o, ref_l = attention_lse_reference(q, k[slots.long()], v[slots.long()], 0.125)
        out, lse = dispatch.segment_attention(q, k, v, slots, 0.125, force="reference")
        assert torch.equal(out, ref_o) and torch.equal(lse, ref_l)
        out, lse = dispatch.segment_attention(q, k, v, slots, 0.125)  # the fused path
        assert not torch.equal(out, ref_o)  # another computation ...
        torch.testing.assert_close(out, ref_o, **attention_tol(64, 5))  # ... the same result
        torch.testing.assert_close(lse, ref_l, **attention_tol(64, 5))

    @pytest.mark.parametrize("h,kvh,m,length", [(9, 3, 7, 130), (4, 4, 1, 5), (8, 2, 33, 33)])
    def test_fused_attention_matches_the_reference(h, kvh, m, length):
        g = torch.Generator().manual_seed(m)
        q = torch.randn(m, h, 64, generator=g)
        k, v = torch.randn(2, length, kvh, 64, generator=g).unbind(0)
        ref = attention_lse_reference(q, k, v, 0.125)
        got = attention_fused.attention_lse(q, k, v, 0.125)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **attention_tol(64, length))
        half = attention_fused.attention_lse(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125)
        # bf16 inputs against the fp32 reference: each input rounded once (u = 2^-9), through
        # the same three reductions
        torch.testing.assert_close(half[0], ref[0], **attention_tol(64, length, torch.bfloat16))
        if m == length:  # causal: query i sees keys j <= i
            ref = attention_lse_reference(q, k, v, 0.125, causal_offset=0)
            got = dispatch.attention(q, k, v, 0.125, causal=True)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, **attention_tol(64, length))
        assert half[0].dtype == half[1].dtype == torch.float32

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_fused_cuda_attention_passes_its_check_and_matches_the_reference():
        assert attention_fused.cuda_ok(torch.device("cuda"))
        g = torch.Generator(device="cuda").manual_seed(3)
        q, k, v = (torch.randn(300, h, 64, generator=g, device="cuda", dtype=torch.bfloat16)
                   for h in (32, 8, 8))
        got = dispatch.attention(q, k, v, 0.125, causal=True)
        ref = attention_lse_reference(q, k, v, 0.125, causal_offset=0)
        torch.testing.assert_close(got[0], ref[0], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got[1], ref[1], atol=2e-2, rtol=1e-3)

    def test_fused_leaf_attention_handles_ragged_and_empty_rows():
        q, k, v, _, table, lengths = _shared_prefix_case(5, 9, 3, 64, 10, [0, 1, 7, 3, 12], seed=2)
        got = dispatch.leaf_attention(q, k, v, table, lengths, 0.125)
        ref = dispatch.leaf_attention(q, k, v, table, lengths, 0.125, force="reference")
        assert torch.isneginf(got[1][0]).all() and (got[0][0] == 0).all()
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **attention_tol(64, 12))

    def test_triton_attention_kernels_under_interpreter():
        """Runs this module's `test_triton_*` tests in a child with TRITON_INTERPRET=1."""
        if not dispatch.triton_available():
            pytest.fail("triton is not installed (pip install -e '.[triton]')")
        env = dict(os.environ, TRITON_INTERPRET="1", ALIGNSERVE_TRITON_CHILD="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
               "-k", "test_triton_", __file__]
        r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=800)
        summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        assert r.returncode == 0, r.stdout[-12000:] + r.stderr[-4000:]
        assert " passed" in summary and "failed" not in summary, summary
        print("interpreter child:", summary)

    def test_attention_kernels_compile_for_sm90():
        """The kernels pass Triton's GPU compiler (to a cubin for an H100) in their default
        configurations: the interpreter accepts code that the compiler rejects."""
        pytest.importorskip("triton")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler import compile as tcompile

        from alignserve.kernels import attention_triton as at

        ptr = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "slots_ptr": "*i32",
               "table_ptr": "*i32", "len_ptr": "*i32", "out_ptr": "*fp32", "lse_ptr": "*fp32",
               "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32",
               "a_out_ptr": "*fp32", "a_lse_ptr": "*fp32", "b_out_ptr": "*fp32",
               "b_lse_ptr": "*fp32", "rows_ptr": "*i64"}

        def build(fn, consts, warps):
            sig = {n: "constexpr" if n in consts else ptr.get(n, "i32") for n in fn.arg_names}
            src = ASTSource(fn=fn, signature=sig,
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            return tcompile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "enable_fp_fusion": True})

        for g, d, m in ((3, 64, 64), (4, 128, 64), (3, 64, 2)):
            bq, bn, w = at.segment_config(m * g, d)
            assert build(at._segment_partial_kernel,
                         {"G": g, "D": d, "BLOCK_Q": bq, "BLOCK_N": bn}, w).asm["cubin"]
        for g, d in ((3, 64), (4, 128)):
            bg, bn, w = at.leaf_config(g, d)
            assert build(at._leaf_partial_kernel,
                         {"G": g, "D": d, "BLOCK_G": bg, "BLOCK_N": bn}, w).asm["cubin"]
        assert build(at._combine_kernel, {"D": 64, "BLOCK_R": 16, "BLOCK_C": 32}, 4).asm["cubin"]
        for has_rows in (False, True):
            assert build(at._merge_kernel, {"D": 64, "BLOCK_H": 32, "HAS_ROWS": has_rows},
                         4).asm["cubin"]


# ----------------------------------------------------------------------------------------------
# the child: Triton kernels under the interpreter (fp32, tiny shapes)
# ----------------------------------------------------------------------------------------------

if CHILD:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from alignserve.kernels import attention_triton as at

    @pytest.mark.parametrize(
        "h,kvh,d,m,length,chunk,block_q",
        [
            (9, 3, 64, 3, 50, 16, None),  # SmolLM2 heads, 4 chunks
            (4, 1, 64, 1, 40, None, None),  # a group of one, one chunk
            (9, 3, 64, 7, 45, 16, 16),  # 21 query rows in two tiles of 16
            (8, 2, 128, 2, 33, 16, None),  # head_dim 128
        ],
    )
    def test_triton_segment_attention_matches_reference(h, kvh, d, m, length, chunk, block_q):
        k, v, g = _pool(120, kvh, d, seed=h * 100 + length)
        slots = torch.randperm(120, generator=g)[:length].int()  # not contiguous
        q = torch.randn(m, h, d, generator=g)
        out, lse = at.segment_attention_triton(q, k, v, slots, d ** -0.5, chunk_size=chunk,
                                               block_n=16, block_q=block_q)
        ref_o, ref_l = attention_lse_reference(q, k[slots.long()], v[slots.long()], d ** -0.5)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        torch.testing.assert_close(out, ref_o, **attention_tol(d, length))
        torch.testing.assert_close(lse, ref_l, **attention_tol(d, length))

    def test_triton_segment_attention_fp16_pool():
        k, v, g = _pool(100, 3, 64, seed=5, dtype=torch.float16)
        slots = torch.randperm(100, generator=g)[:45].int()
        q = torch.randn(4, 9, 64, generator=g).half()
        out, lse = at.segment_attention_triton(q, k, v, slots, 0.125, chunk_size=16, block_n=16)
        ref_o, ref_l = attention_lse_reference(q, k[slots.long()], v[slots.long()], 0.125)
        torch.testing.assert_close(out, ref_o, **attention_tol(64, 45, torch.float16))
        torch.testing.assert_close(lse, ref_l, **attention_tol(64, 45))  # kept in fp32

    def test_triton_empty_segment_is_zero_with_minus_inf_lse():
        k, v, _ = _pool(10, 1, 64, seed=0)
        out, lse = at.segment_attention_triton(torch.randn(2, 4, 64), k, v,
                                               torch.zeros(0, dtype=torch.int32), 0.125)
        assert (out == 0).all() and torch.isneginf(lse).all()

    @pytest.mark.parametrize("h,kvh,chunk", [(9, 3, None), (9, 3, 16), (4, 1, 8)])
    def test_triton_leaf_attention_ragged(h, kvh, chunk):
        scale = 0.125
        q, k, v, _, table, lengths = _shared_prefix_case(5, h, kvh, 64, 0, [0, 1, 7, 20, 33],
                                                         seed=h + (chunk or 0))
        out, lse = at.leaf_attention_triton(q, k, v, table, lengths, scale, chunk_size=chunk,
                                            block_n=16)
        ref_o, ref_l = dispatch.leaf_attention(q, k, v, table, lengths, scale,
                                               force="reference")
        assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
        torch.testing.assert_close(out, ref_o, **attention_tol(64, 33))
        torch.testing.assert_close(lse, ref_l, **attention_tol(64, 33))

    def test_triton_leaf_lengths_are_clamped_to_the_table():
        q, k, v, _, table, _ = _shared_prefix_case(3, 4, 1, 64, 0, [5, 20, 9], seed=2)
        lengths = torch.tensor([3, 50, 9], dtype=torch.int32)  # 50 > the table's width 20
        for ml in (None, 8):
            got = dispatch.leaf_attention(q, k, v, table, lengths, 0.125, force="triton",
                                          max_length=ml)
            want = dispatch.leaf_attention(q, k, v, table, lengths, 0.125, force="reference",
                                           max_length=ml)
            torch.testing.assert_close(got, want, **attention_tol(64, 20))

    def test_triton_decode_step_equals_attention_over_concatenated_kv():
        """Prefix once for the group (split in chunks) + each leaf, merged: exact attention."""
        scale = 64 ** -0.5
        q, k, v, pre, table, lengths = _shared_prefix_case(4, 9, 3, 64, 70, [0, 1, 6, 19],
                                                           seed=11)
        o_p, l_p = dispatch.segment_attention(q, k, v, pre, scale, force="triton", chunk_size=16)
        o_l, l_l = dispatch.leaf_attention(q, k, v, table, lengths, scale, force="triton")
        out, lse = dispatch.merge_attention(o_p, l_p, o_l, l_l)
        ref_o, ref_l = _full_attention(q, k, v, pre, table, lengths, scale)
        torch.testing.assert_close(out, ref_o, **attention_tol(64, 70 + 19))
        torch.testing.assert_close(lse, ref_l, **attention_tol(64, 70 + 19))

    def test_triton_merge_matches_reference_including_empty_parts():
        g = torch.Generator().manual_seed(8)
        n, h, d = 5, 9, 64
        oa, ob = torch.randn(n, h, d, generator=g), torch.randn(n, h, d, generator=g)
        la, lb = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
        la[0] = -INF  # an empty first part
        lb[1] = -INF  # an empty second part
        la[2, :4] = lb[2, :4] = -INF  # both empty for some heads
        oa[0] = ob[1] = 0
        oa[2, :4] = ob[2, :4] = 0
        out, lse = dispatch.merge_attention(oa, la, ob, lb, force="triton")
        ref_o, ref_l = merge_attention(oa, la, ob, lb)
        torch.testing.assert_close(out, ref_o, **MERGE_TOL)
        torch.testing.assert_close(lse, ref_l)
        assert (out[2, :4] == 0).all() and torch.isneginf(lse[2, :4]).all()

    def test_triton_merge_into_rows_in_place():
        g = torch.Generator().manual_seed(9)
        b, h, d = 6, 4, 64
        out, lse = torch.randn(b, h, d, generator=g), torch.randn(b, h, generator=g)
        lse[4] = -INF
        out[4] = 0
        rows = torch.tensor([4, 1, 3])
        po, pl = torch.randn(3, h, d, generator=g), torch.randn(3, h, generator=g)
        want_o, want_l = out.clone(), lse.clone()
        dispatch.merge_attention_into(want_o, want_l, rows, po, pl, force="reference")
        got_o, got_l = out.clone(), lse.clone()
        dispatch.merge_attention_into(got_o, got_l, rows, po, pl, force="triton")
        torch.testing.assert_close(got_o, want_o, **MERGE_TOL)
        torch.testing.assert_close(got_l, want_l)
        assert torch.equal(got_o[[0, 2, 5]], out[[0, 2, 5]])  # other rows untouched
        torch.testing.assert_close(got_o[4], po[0])  # merged with an empty part

    def test_triton_dispatch_force_paths_agree():
        q, k, v, pre, table, lengths = _shared_prefix_case(3, 4, 1, 64, 20, [2, 9, 4], seed=3)
        for fn, args in ((dispatch.segment_attention, (pre,)),
                         (dispatch.leaf_attention, (table, lengths))):
            a = fn(q, k, v, *args, 0.125, force="triton")
            b = fn(q, k, v, *args, 0.125, force="reference")
            torch.testing.assert_close(a, b, **attention_tol(64, 20 + 9))

    def test_triton_whole_decode_steps_match_the_reference():
        """The decode step as the GPU runs it (the Triton kernels, plans laid out for graphs,
        whole steps on static buffers with the plan bound to them; uncaptured here) against
        the same steps on the references."""
        from torch.utils._python_dispatch import TorchDispatchMode

        from alignserve.engine.native.cuda_graphs import DecodeGraphRunner
        from tests.test_cuda_graphs import assert_step_close, decode_both, tiny_model

        class RecordOps(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = set()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.add(str(func).split(".")[1])
                return func(*args, **(kwargs or {}))

        model = tiny_model()
        steps = {}
        recorder = RecordOps()
        try:
            for mode in ("reference", "triton"):
                dispatch.FORCE = mode
                runner = DecodeGraphRunner(model, capture=False, whole_after=1)
                if mode == "triton":
                    body = runner._whole_body

                    def recorded(entry, plan, body=body):
                        with recorder:
                            body(entry, plan)

                    runner._whole_body = recorded
                with torch.inference_mode():
                    steps[mode] = decode_both(model, runner, 3, steps=3, seed=4, early=(2,),
                                              for_graphs=True)
                assert runner.whole_steps == 3 and runner.whole_built == 1
        finally:
            dispatch.FORCE = None
        # What a CUDA graph records must not read device values on the host (a sync: the
        # capture fails): nothing in the whole step as the GPU runs it does.
        assert "index_copy_" in recorder.ops and "linear" in recorder.ops
        syncs = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal"}
        assert not recorder.ops & syncs, recorder.ops & syncs
        for (plain_ref, _), (plain_tri, whole_tri) in zip(steps["reference"], steps["triton"]):
            assert_step_close((plain_tri, whole_tri), **model_tol(model.cfg))
            assert_step_close((plain_ref, whole_tri), **model_tol(model.cfg))
