"""Logit processing and sampling: the fused Triton kernel against the PyTorch references.

As in test_kernels_attention.py, the Triton tests (`test_triton_*`, defined only in the child)
run in a child pytest process with TRITON_INTERPRET=1, started by
`test_triton_sampling_kernels_under_interpreter`; the reference tests and a compile of the
kernels for sm_90 run in this process.

Distribution tests are chi-square tests of many draws (one row per draw, seeds 0..N-1) against
the reference probabilities; they use fixed seeds, so they are deterministic, and they require
a p-value above 1e-3 (e.g. the critical value of chi-square with 10 degrees of freedom at that
level is 29.6).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from alignserve.kernels import dispatch
from alignserve.kernels.logits_ops import (
    Contrastive,
    LogitBias,
    Penalties,
    ValueGuidance,
    apply_bitmask_reference,
    apply_penalties_reference,
    contrastive_reference,
    process_logits_reference,
    sample_processed_reference,
    sampling_probs_reference,
    unpack_bitmask,
    vas_reference,
)
from alignserve.kernels.sampling import filter_logits_reference, row_seed

CHILD = os.environ.get("ALIGNSERVE_TRITON_CHILD") == "1"
INF = float("inf")


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, int]:
    """(statistic, p-value, degrees of freedom) of draws `tokens` against `probs` [V]; categories
    expected fewer than 5 times are pooled. Draws outside the support fail outright."""
    n = tokens.numel()
    counts = torch.bincount(tokens.flatten(), minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"draws outside the support: {counts[~support]}"
    exp = probs.double()[support] * n
    obs = counts[support]
    order = torch.argsort(exp)
    exp, obs = exp[order], obs[order]
    small = exp < 5
    bins_e = exp[~small].tolist()
    bins_o = obs[~small].tolist()
    if small.any():
        pe, po = float(exp[small].sum()), float(obs[small].sum())
        if pe >= 5 or not bins_e:
            bins_e.append(pe)
            bins_o.append(po)
        else:
            bins_e[0] += pe
            bins_o[0] += po
    df = len(bins_e) - 1
    stat = sum((o - e) ** 2 / e for o, e in zip(bins_o, bins_e))
    if df == 0:
        return stat, 1.0, 0
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, p, df


def _rows(x, b, dtype=torch.float32):
    return torch.full((b,), x, dtype=dtype)


def _table():
    """A fixed expert / amateur pair over 8 tokens."""
    expert = torch.tensor([[2.0, 1.5, 0.5, -1.0, 3.0, 0.0, -3.0, 1.0]])
    amateur = torch.tensor([[1.0, 2.5, -0.5, 0.0, 2.0, 1.0, 0.0, -1.0]])
    return expert, amateur


# ----------------------------------------------------------------------------------------------
# this process: the references, dispatch on CPU, compile for sm_90
# ----------------------------------------------------------------------------------------------

if not CHILD:

    def test_contrastive_reference_on_a_fixed_table():
        expert, amateur = _table()
        scores = contrastive_reference(expert, amateur, torch.tensor([0.1]), torch.tensor([0.5]))
        # plausible: expert >= 3 + log(0.1) = 0.697 -> tokens 0, 1, 4, 7
        want = torch.tensor([[1.5 * 2.0 - 0.5 * 1.0, 1.5 * 1.5 - 0.5 * 2.5, -INF, -INF,
                              1.5 * 3.0 - 0.5 * 2.0, -INF, -INF, 1.5 * 1.0 + 0.5 * 1.0]])
        assert torch.equal(scores, want)
        # rows without an amateur are untouched
        x = process_logits_reference(
            torch.cat([expert, expert]),
            contrastive=Contrastive(amateur, torch.tensor([-1, 0]), torch.tensor([0.1, 0.1]),
                                    torch.tensor([0.5, 0.5])))
        assert torch.equal(x[0], expert[0]) and torch.equal(x[1], want[0])

    def test_vas_reference_on_a_fixed_table():
        expert, _ = _table()
        ids = torch.tensor([[4, 2, -1], [4, 2, -1], [-1, -1, -1]])
        vals = torch.tensor([[1.0, 4.0, 9.0]] * 3)
        keep = torch.tensor([False, True, False])
        out = vas_reference(expert.repeat(3, 1), ids, vals, torch.tensor([0.5, 0.5, 0.5]), keep)
        masked = torch.full((8,), -INF)
        masked[4], masked[2] = 3.5, 2.5
        kept = expert[0].clone()
        kept[4], kept[2] = 3.5, 2.5
        assert torch.equal(out[0], masked)
        assert torch.equal(out[1], kept)
        assert torch.equal(out[2], expert[0])  # no candidate: no VAS

    def test_penalties_reference_on_a_fixed_table():
        x = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
        pen = Penalties(torch.tensor([[1, 0, -1]]), torch.tensor([[2, 1, 5]]),
                        torch.tensor([2.0]), torch.tensor([0.25]), torch.tensor([0.5]))
        out = apply_penalties_reference(x, pen)
        want = torch.tensor([[2.0 / 2 - 0.25 - 0.5, -1.0 * 2 - 0.5 - 0.5, 0.5, 3.0]])
        assert torch.equal(out, want)
        assert torch.equal(x, torch.tensor([[2.0, -1.0, 0.5, 3.0]]))  # not in place

    def test_bitmask_and_bias_reference_on_a_fixed_table():
        """xgrammar's packing (bit j of word w: token 32 w + j; -1 allows all 32), -inf where
        disallowed; the bias adds per row; masking first leaves the plausibility cut among the
        allowed tokens, and a bias cannot revive a masked token."""
        v = 40
        packed = torch.tensor([[-1, -1], [0b1010, 1]], dtype=torch.int32)  # row 1: 1, 3 and 32
        allowed = unpack_bitmask(packed, v)
        assert allowed[0].all()
        assert allowed[1].nonzero().flatten().tolist() == [1, 3, 32]
        x = torch.zeros(2, v)
        out = apply_bitmask_reference(x, packed)
        assert torch.isinf(out[1, ~allowed[1]]).all() and torch.equal(out[0], x[0])
        bias = LogitBias(torch.tensor([[0, -1], [5, 3]]), torch.tensor([[2.0, 9.0], [100.0, 1.0]]))
        scores = process_logits_reference(x, bias=bias, allowed=packed)
        assert scores[0, 0] == 2.0 and scores[0, 1:].eq(0).all()
        assert scores[1, 5] == -INF and scores[1, 3] == 1.0 and scores[1, 1] == 0.0
        # contrastive: the expert's best token (0) is masked in row 1, so the cut is taken
        # among 1, 3 and 32 instead of leaving no plausible token
        expert = torch.full((2, v), -10.0)
        expert[:, 0], expert[:, 3] = 5.0, 1.0
        cd = Contrastive(torch.zeros(1, v), torch.tensor([0, 0]), _rows(0.5, 2), _rows(1.0, 2))
        scores = process_logits_reference(expert, contrastive=cd, allowed=packed)
        assert torch.isfinite(scores[1]).nonzero().flatten().tolist() == [3]
        assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [0]

    def test_empty_vas_support_under_contrastive_drops_the_contrastive_part():
        expert, amateur = _table()
        cd = Contrastive(amateur, torch.tensor([0]), torch.tensor([0.5]), torch.tensor([1.0]))
        vas = ValueGuidance(torch.tensor([[3, 6]]), torch.tensor([[1.0, 0.0]]),
                            torch.tensor([1.0]), torch.tensor([False]))
        x = process_logits_reference(expert, contrastive=cd, vas=vas)
        want = torch.full((8,), -INF)
        want[3], want[6] = 0.0, -3.0
        assert torch.equal(x[0], want)

    def test_reference_sampler_chi_square():
        g = torch.Generator().manual_seed(7)
        v, n = 24, 4000
        logits = (torch.randn(1, v, generator=g) * 1.5).expand(n, v).contiguous()
        temp, tk, tp, mp = _rows(0.8, n), _rows(12, n, torch.int64), _rows(0.9, n), _rows(0.02, n)
        tokens = dispatch.sample(logits, temp, tk, tp, mp, list(range(n)))
        probs = sampling_probs_reference(logits[:1], temp[:1], tk[:1], tp[:1], mp[:1])[0]
        stat, p, df = chi_square_pvalue(tokens, probs)
        assert p > 1e-3, (stat, p, df)

    def test_reference_sampler_greedy_and_seeds():
        g = torch.Generator().manual_seed(3)
        logits = torch.randn(4, 32, generator=g)
        temp = torch.tensor([0.0, 1.0, 1.0, 0.0])
        args = (temp, _rows(0, 4, torch.int64), _rows(1.0, 4), _rows(0.0, 4))
        a = dispatch.sample(logits, *args, [5, 6, 7, 8])
        b = dispatch.sample(logits, *args, [5, 6, 7, 8])
        assert torch.equal(a, b) and a.dtype == torch.int64
        assert a[0] == logits[0].argmax() and a[3] == logits[3].argmax()

    def test_triton_sampling_kernels_under_interpreter():
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

    def test_sampling_kernels_compile_for_sm90():
        """The fused kernels pass Triton's GPU compiler (a cubin for an H100)."""
        pytest.importorskip("triton")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler import compile as tcompile

        from alignserve.kernels import sampling_triton as st

        types = {"logits_ptr": "*bf16", "am_ptr": "*bf16", "seed_ptr": "*i64", "out_ptr": "*i64",
                 "topk_ptr": "*i32", "am_idx_ptr": "*i32", "vas_ids_ptr": "*i32",
                 "vas_mask_ptr": "*i32", "pen_ids_ptr": "*i32", "pen_cnt_ptr": "*i32",
                 "vas_on_ptr": "*i32", "mask_ptr": "*i32", "bias_ids_ptr": "*i32"}

        def build(fn, consts, warps):
            sig = {}
            for n in fn.arg_names:
                if n in consts:
                    sig[n] = "constexpr"
                elif n in types:
                    sig[n] = types[n]
                else:
                    sig[n] = "*fp32" if n.endswith("_ptr") else "i32"
            src = ASTSource(fn=fn, signature=sig,
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            return tcompile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "enable_fp_fusion": True})

        for has_cd, has_vas, has_mask in ((False, False, False), (True, True, True)):
            consts = {"HAS_CD": has_cd, "HAS_VAS": has_vas, "HAS_MASK": has_mask, "ROWS": 1,
                      "BLOCK_V": 2048,
                      "BLOCK_K": 16, "BLOCK_KB": 16, "GUMBEL_MAX": st._GUMBEL_MAX,
                      "MAX_ITERS": st._MAX_ITERS}
            assert build(st._sample_kernel, consts, 8).asm["cubin"]
        assert build(st._sparse_update_kernel,
                     {"HAS_PEN": True, "HAS_VAS": True, "HAS_BIAS": True, "BLOCK": 64},
                     4).asm["cubin"]


# ----------------------------------------------------------------------------------------------
# the child: the fused kernel under the interpreter
# ----------------------------------------------------------------------------------------------

if CHILD:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from alignserve.kernels import sampling_triton as st

    def _kernel_gumbel(seed: int, vocab: int) -> torch.Tensor:
        return torch.from_numpy(st.kernel_gumbel_numpy(seed, vocab))

    def _expected_tokens(scores, temp, tk, tp, mp, seeds) -> torch.Tensor:
        """argmax over each row's kept set (the reference's filters) of scores / T + the kernel's
        noise: what the kernel must return, token for token."""
        kept = torch.isfinite(filter_logits_reference(scores, temp, tk, tp, mp))
        greedy = temp <= 1e-5
        inv_t = torch.where(greedy, torch.ones_like(temp), 1.0 / temp.clamp_min(1e-5)).float()
        x = scores * inv_t[:, None]
        noise = torch.stack([_kernel_gumbel(int(s), scores.shape[1]) for s in seeds])
        y = torch.where(kept, x + noise, torch.full_like(x, -INF))
        return torch.where(greedy, x.argmax(1), y.argmax(1))

    def _random_params(b, g):
        pick = lambda vals: torch.tensor(vals)[torch.randint(0, len(vals), (b,), generator=g)]
        return (pick([0.0, 0.5, 1.0, 1.5]), pick([0, 1, 3, 10]).int(),
                pick([1.0, 0.3, 0.8, 0.95]), pick([0.0, 0.05, 0.3, 0.0]),
                torch.randint(0, 2 ** 62, (b,), generator=g))

    @pytest.mark.parametrize("v,block_v,scale", [(40, 16, 2.0), (300, 64, 0.3), (37, 256, 3.0)])
    def test_triton_sampling_is_the_gumbel_argmax_over_the_kept_set(v, block_v, scale):
        """Token for token, with per-row temperature / top-k / top-p / min-p mixed in one launch:
        several tiles per row, flat rows with small top-k (candidate rejections and pivot jumps),
        greedy rows."""
        g = torch.Generator().manual_seed(v)
        b = 300
        logits = torch.randn(b, v, generator=g) * scale
        temp, tk, tp, mp, seeds = _random_params(b, g)
        tokens = st.sample_triton(logits.clone(), temp, tk, tp, mp, seeds, block_v=block_v)
        want = _expected_tokens(logits, temp, tk, tp, mp, seeds)
        assert torch.equal(tokens, want), (tokens != want).nonzero().flatten().tolist()

    def test_triton_processing_is_exact_with_penalties_contrastive_and_vas():
        g = torch.Generator().manual_seed(1)
        b, v, k, p = 240, 50, 6, 5
        logits = torch.randn(b, v, generator=g) * 2
        amateur = torch.randn(b // 2, v, generator=g) * 2
        temp, tk, tp, mp, seeds = _random_params(b, g)
        am_idx = torch.randint(0, b // 2, (b,), generator=g).int()
        am_idx[torch.rand(b, generator=g) < 0.4] = -1
        cd = Contrastive(amateur, am_idx, torch.rand(b, generator=g) * 0.5 + 0.01,
                         torch.rand(b, generator=g))
        ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b)]).int()
        ids[torch.rand(b, k, generator=g) < 0.2] = -1
        ids[torch.rand(b, generator=g) < 0.3] = -1  # rows without VAS
        keep = (torch.rand(b, generator=g) < 0.5) & (am_idx < 0)
        vas = ValueGuidance(ids, torch.randn(b, k, generator=g), torch.rand(b, generator=g) * 2,
                            keep)
        pids = torch.stack([torch.randperm(v, generator=g)[:p] for _ in range(b)]).int()
        pids[torch.rand(b, p, generator=g) < 0.3] = -1
        pen = Penalties(pids, torch.randint(0, 4, (b, p), generator=g),
                        1 + torch.rand(b, generator=g), torch.rand(b, generator=g) * 0.5,
                        torch.rand(b, generator=g) * 0.5)
        for kw in ({"contrastive": cd}, {"vas": vas}, {"penalties": pen},
                   {"contrastive": cd, "vas": vas, "penalties": pen}):
            tokens = st.sample_triton(logits.clone(), temp, tk, tp, mp, seeds, block_v=16, **kw)
            scores = process_logits_reference(logits, kw.get("penalties"), kw.get("contrastive"),
                                              kw.get("vas"))
            want = _expected_tokens(scores, temp, tk, tp, mp, seeds)
            assert torch.equal(tokens, want), (sorted(kw), (tokens != want).nonzero().tolist())

    def test_triton_sampling_chi_square_with_mixed_rows_in_one_launch():
        """Four parameter sets interleaved in one launch, each checked against its reference
        distribution (4000 draws of the first, 1500 of each other)."""
        g = torch.Generator().manual_seed(5)
        v = 32
        base = torch.randn(2, v, generator=g) * 1.5
        configs = [  # (logits row, temperature, top_k, top_p, min_p, draws)
            (0, 0.8, 12, 0.9, 0.02, 4000),
            (1, 1.0, 0, 1.0, 0.0, 1500),
            (0, 1.6, 5, 1.0, 0.0, 1500),
            (1, 0.6, 0, 0.7, 0.1, 1500),
        ]
        which = torch.cat([torch.full((c[5],), i) for i, c in enumerate(configs)])
        which = which[torch.randperm(which.numel(), generator=g)]
        n = which.numel()
        param = lambda j, dt=torch.float32: torch.tensor([configs[i][j] for i in which.tolist()],
                                                         dtype=dt)
        logits = base[param(0, torch.long)]
        temp, tk, tp, mp = param(1), param(2, torch.int32), param(3), param(4)
        tokens = dispatch.sample(logits.clone(), temp, tk, tp, mp, torch.arange(n),
                                 force="triton")
        for i, (row, t, k, p, m, _) in enumerate(configs):
            probs = sampling_probs_reference(base[row:row + 1], torch.tensor([t]),
                                             torch.tensor([k]), torch.tensor([p]),
                                             torch.tensor([m]))[0]
            stat, pv, df = chi_square_pvalue(tokens[which == i], probs)
            assert pv > 1e-3, (i, stat, pv, df)

    def test_triton_contrastive_and_vas_on_the_fixed_table():
        expert, amateur = _table()
        n = 600
        logits = expert.expand(n, 8).contiguous()
        cd = Contrastive(amateur, torch.zeros(n, dtype=torch.int32), _rows(0.1, n), _rows(0.5, n))
        greedy = dispatch.sample(logits[:2].clone(), _rows(0.0, 2), _rows(0, 2, torch.int32),
                                 _rows(1.0, 2), _rows(0.0, 2), [0, 1], force="triton",
                                 contrastive=Contrastive(amateur, torch.tensor([0, -1]),
                                                         _rows(0.1, 2), _rows(0.5, 2)))
        assert greedy.tolist() == [4, 4]  # scores 2.5, 1.0, ., ., 3.5, ., ., 2.0 / expert argmax
        tokens = dispatch.sample(logits.clone(), _rows(1.0, n), _rows(0, n, torch.int32),
                                 _rows(1.0, n), _rows(0.0, n), range(n), force="triton",
                                 contrastive=cd)
        probs = sampling_probs_reference(logits[:1], _rows(1.0, 1), _rows(0, 1), _rows(1.0, 1),
                                         _rows(0.0, 1), contrastive=Contrastive(
                                             amateur, torch.tensor([0]), _rows(0.1, 1),
                                             _rows(0.5, 1)))[0]
        assert set(tokens.tolist()) <= {0, 1, 4, 7}  # the plausible set
        assert chi_square_pvalue(tokens, probs)[1] > 1e-3
        ids = torch.tensor([[4, 2, -1], [4, 2, -1]])
        vas = ValueGuidance(ids, torch.tensor([[1.0, 4.0, 9.0]] * 2), _rows(0.5, 2),
                            torch.tensor([False, True]))
        greedy = dispatch.sample(expert.expand(2, 8).contiguous(), _rows(0.0, 2),
                                 _rows(0, 2, torch.int32), _rows(1.0, 2), _rows(0.0, 2), [0, 1],
                                 force="triton", vas=vas)
        assert greedy.tolist() == [4, 4]  # 3.5 beats 2.5 (and 2.0 among the kept others)
        vas = ValueGuidance(torch.tensor([[4, 2, -1]]).expand(n, 3), torch.tensor(
            [[1.0, 4.0, 9.0]]).expand(n, 3), _rows(0.5, n), torch.zeros(n, dtype=torch.bool))
        tokens = dispatch.sample(logits.clone(), _rows(1.0, n), _rows(0, n, torch.int32),
                                 _rows(1.0, n), _rows(0.0, n), range(n), force="triton", vas=vas)
        assert set(tokens.tolist()) <= {2, 4}
        share = (tokens == 4).float().mean().item()
        want = 1 / (1 + math.exp(-1.0))  # softmax of (3.5, 2.5)
        assert abs(share - want) < 4 * math.sqrt(want * (1 - want) / n)

    def test_triton_penalties_and_kept_vas_are_written_into_the_logits():
        g = torch.Generator().manual_seed(2)
        logits = torch.randn(3, 20, generator=g)
        pen = Penalties(torch.tensor([[3, 0, -1], [5, 6, 7], [-1, -1, -1]]),
                        torch.tensor([[2, 1, 0], [1, 0, 3], [0, 0, 0]]),
                        torch.tensor([1.3, 0.8, 1.0]), torch.tensor([0.2, 0.0, 0.5]),
                        torch.tensor([0.1, 0.3, 0.0]))
        got = st.apply_sparse_updates_triton(logits.clone(), pen)
        torch.testing.assert_close(got, apply_penalties_reference(logits, pen))
        vas = ValueGuidance(torch.tensor([[1, 2], [3, -1], [4, 5]]), torch.ones(3, 2),
                            torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, True, False]))
        got = st.apply_sparse_updates_triton(logits.clone(), pen, vas, st.vas_keeping_rows(vas))
        want = vas_reference(apply_penalties_reference(logits, pen), vas.ids, vas.values,
                             vas.beta, torch.ones(3, dtype=torch.bool))
        want[2] = apply_penalties_reference(logits, pen)[2]  # a masking row: not written here
        torch.testing.assert_close(got, want)

    def test_triton_seeds_reproduce_and_do_not_depend_on_the_batch():
        g = torch.Generator().manual_seed(9)
        v = 64
        row = torch.randn(1, v, generator=g) * 0.2  # nearly flat: draws differ across seeds
        args = lambda b: (_rows(1.0, b), _rows(0, b, torch.int32), _rows(0.95, b), _rows(0.0, b))
        seqs = {}
        for seed in (11, 12):
            steps = [row_seed(seed, 0, t) for t in range(20)]
            a = dispatch.sample(row.expand(20, v).contiguous(), *args(20), steps, force="triton")
            b = dispatch.sample(row.expand(20, v).contiguous(), *args(20), steps, force="triton")
            assert torch.equal(a, b)
            seqs[seed] = a
        assert not torch.equal(seqs[11], seqs[12])
        # a row's draw does not depend on its neighbours or its position in the batch
        other = torch.randn(4, v, generator=g)
        batch = torch.cat([other[:3], row, other[3:]])
        seeds = [1, 2, 3, row_seed(11, 0, 0), 5]
        mixed = dispatch.sample(batch, *args(5), seeds, force="triton")
        assert mixed[3] == seqs[11][0]

    def test_triton_greedy_rows_are_the_argmax():
        g = torch.Generator().manual_seed(4)
        logits = torch.randn(6, 1000, generator=g)
        temp = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 0.0])
        tokens = dispatch.sample(logits.clone(), temp, torch.tensor([0, 5, 3, 0, 0, 1]),
                                 torch.tensor([1.0, 0.9, 0.5, 1.0, 0.2, 1.0]),
                                 _rows(0.0, 6), range(6), force="triton")
        greedy = temp == 0
        assert torch.equal(tokens[greedy], logits[greedy].argmax(1))
        assert tokens.dtype == torch.int64 and tokens.shape == (6,)

    def test_triton_rows_with_an_amateur_and_kept_vas_fall_back_to_the_reference():
        expert, amateur = _table()
        logits = expert.expand(4, 8).contiguous()
        cd = Contrastive(amateur, torch.tensor([0, 0, -1, 0]), _rows(0.1, 4), _rows(0.5, 4))
        vas = ValueGuidance(torch.tensor([[4, 1]] * 4), torch.ones(4, 2), _rows(1.0, 4),
                            torch.tensor([True, False, True, False]))
        args = (_rows(1.0, 4), _rows(0, 4, torch.int32), _rows(1.0, 4), _rows(0.0, 4),
                [3, 4, 5, 6])
        a = dispatch.sample(logits.clone(), *args, contrastive=cd, vas=vas, force="triton")
        b = sample_processed_reference(logits, *args, contrastive=cd, vas=vas)
        assert torch.equal(a, b)

    def _random_bitmask(b, v, g, p_allowed=0.6):
        """A packed int32 bitmask [b, ceil(v / 32)] (xgrammar's layout) and its bool form; every
        row keeps at least one token."""
        allowed = torch.rand(b, v, generator=g) < p_allowed
        allowed[torch.arange(b), torch.randint(0, v, (b,), generator=g)] = True
        words = (v + 31) // 32
        padded = torch.zeros(b, words * 32, dtype=torch.int64)
        padded[:, :v] = allowed.long()
        packed = (padded.view(b, words, 32) << torch.arange(32)).sum(-1)
        packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
        return packed, allowed

    def test_triton_bitmask_and_bias_match_the_reference_token_for_token():
        """The allowed-token bitmask (an extra load beside each expert logit) and the logit bias
        (in the sparse update) against `process_logits_reference`, alone and with penalties,
        contrastive and VAS in one launch."""
        g = torch.Generator().manual_seed(7)
        b, v, k = 200, 70, 5
        logits = torch.randn(b, v, generator=g) * 2
        temp, tk, tp, mp, seeds = _random_params(b, g)
        packed, allowed = _random_bitmask(b, v, g)
        assert torch.equal(unpack_bitmask(packed, v), allowed)
        bids = torch.stack([torch.randperm(v, generator=g)[:4] for _ in range(b)]).int()
        bids[torch.rand(b, 4, generator=g) < 0.3] = -1
        bias = LogitBias(bids, torch.randn(b, 4, generator=g) * 5)
        am_idx = torch.arange(b).int()
        am_idx[torch.rand(b, generator=g) < 0.5] = -1
        cd = Contrastive(torch.randn(b, v, generator=g) * 2, am_idx,
                         torch.rand(b, generator=g) * 0.5 + 0.01, torch.rand(b, generator=g))
        # VAS candidates among the allowed tokens (as the native sampler picks them)
        masked = torch.where(allowed, logits, torch.full_like(logits, -INF))
        ids = torch.topk(masked, k, dim=1).indices.int()
        ids[~torch.isfinite(torch.topk(masked, k, dim=1).values)] = -1
        vas = ValueGuidance(ids, torch.randn(b, k, generator=g), torch.rand(b, generator=g),
                            (torch.rand(b, generator=g) < 0.5) & (am_idx < 0))
        pids = torch.stack([torch.randperm(v, generator=g)[:3] for _ in range(b)]).int()
        pen = Penalties(pids, torch.randint(0, 3, (b, 3), generator=g),
                        1 + torch.rand(b, generator=g), torch.rand(b, generator=g) * 0.5,
                        torch.rand(b, generator=g) * 0.5)
        for kw in ({"allowed": packed}, {"bias": bias}, {"allowed": packed, "bias": bias},
                   {"allowed": packed, "contrastive": cd},
                   {"allowed": packed, "bias": bias, "penalties": pen, "contrastive": cd,
                    "vas": vas}):
            tokens = st.sample_triton(logits.clone(), temp, tk, tp, mp, seeds, block_v=16, **kw)
            scores = process_logits_reference(logits, kw.get("penalties"), kw.get("contrastive"),
                                              kw.get("vas"), kw.get("bias"), kw.get("allowed"))
            want = _expected_tokens(scores, temp, tk, tp, mp, seeds)
            assert torch.equal(tokens, want), (sorted(kw), (tokens != want).nonzero().tolist())
            if "allowed" in kw:
                assert bool(allowed[torch.arange(b), tokens].all()), sorted(kw)
