"""Kernel benchmarks for the lent GPU (issue 4): decode attention and fused sampling.

    python bench/kernel_sweep.py          # GPU checks, then the grid: bench/results/kernels-<date>.json
    python bench/kernel_sweep.py --quick  # a few shapes
    python bench/kernel_sweep.py --check  # only the correctness checks on the GPU (exit 1 on failure)
    python bench/kernel_sweep.py --sweep  # also split-K chunk sizes / tile configs of the prefix kernel

Attention (bf16, suffix 128 per sequence; SmolLM2-135M heads 9/3/64 and Llama-3.2-1B heads
32/8/64; batch 16 and 64; shared prefix 1K, 4K, 16K):
- ours: `segment_attention` (the prefix once for the whole group, split-K) + `leaf_attention`
  (each suffix) + `merge_attention`, eager and replayed from a CUDA graph;
- torch SDPA over per-sequence KV (every sequence holds its own copy of prefix + suffix);
- torch SDPA with the prefix as one block of queries, plus SDPA over the suffixes (no merge:
  SDPA returns no log-sum-exp, so this is a lower bound for that approach).
Bytes that must be read: the prefix K/V once, every suffix K/V, q; time floor = bytes / the
copy bandwidth measured in the same run. Goals: ours within 1.5x of the floor; >= 10x faster
than per-sequence SDPA at batch 64, prefix 4K.

Logits (bf16 logits; vocab 49152 / 128256 / 151936; batch 1..256): the fused Triton kernel
(`dispatch.sample`) against the unfused torch chain (temperature, sort-based top-k/top-p/min-p,
softmax, exponential noise, argmax). Goals: >= 10x faster; within 2x of one read of the logits.

Without a CUDA device it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = {"smollm2-135m": (9, 3, 64), "llama-3.2-1b": (32, 8, 64)}
VOCABS = {"smollm2": 49152, "llama3": 128256, "qwen2": 151936}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return out + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ALIGNSERVE_COMMIT", "unknown")


def _ms(fn, graph: bool = False) -> float:
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (1 GiB read + 1 GiB written)."""
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _ms(lambda: y.copy_(x))
    return 2 * n / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------
# correctness on the GPU (the CPU tests run the kernels only under the interpreter, in fp32)
# ----------------------------------------------------------------------------------------------

def run_checks() -> list[dict]:
    from alignserve.kernels import attention_triton as at
    from alignserve.kernels import sampling_triton as st
    from alignserve.kernels.attention import attention_lse_reference, merge_attention
    from alignserve.kernels.logits_ops import sampling_probs_reference
    from alignserve.kernels.sampling import filter_logits_reference

    results = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for h, kvh, d, m, length, lens in ((9, 3, 64, 16, 3000, [0, 1, 100, 300]),
                                           (32, 8, 64, 64, 700, [5, 128, 129, 0]),
                                           (16, 4, 128, 3, 5000, [1, 2, 3, 1000])):
            pool = length + sum(lens) + 11
            k = torch.randn(pool, kvh, d, generator=g).to("cuda", dtype)
            v = torch.randn(pool, kvh, d, generator=g).to("cuda", dtype)
            perm = torch.randperm(pool, generator=g).int().cuda()
            q = torch.randn(m, h, d, generator=g).to("cuda", dtype)
            slots = perm[:length]
            o, lse = at.segment_attention_triton(q, k, v, slots, d ** -0.5)
            ro, rl = attention_lse_reference(q.float(), k[slots.long()].float(),
                                             v[slots.long()].float(), d ** -0.5)
            err_seg = max((o - ro).abs().max().item(), (lse - rl).abs().max().item())
            b = len(lens)
            table = torch.full((b, max(lens)), 0, dtype=torch.int32, device="cuda")
            start = length
            for i, n in enumerate(lens):
                table[i, :n] = perm[start:start + n]
                start += n
            lengths = torch.tensor(lens, dtype=torch.int32, device="cuda")
            qb = torch.randn(b, h, d, generator=g).to("cuda", dtype)
            ol, ll = at.leaf_attention_triton(qb, k, v, table, lengths, d ** -0.5)
            op, lp = at.segment_attention_triton(qb, k, v, slots, d ** -0.5)
            out, _ = merge_attention(op, lp, ol, ll)
            err_step = 0.0
            for i, n in enumerate(lens):
                idx = torch.cat([slots, table[i, :n]]).long()
                r, _ = attention_lse_reference(qb[i:i + 1].float(), k[idx].float(),
                                               v[idx].float(), d ** -0.5)
                err_step = max(err_step, (out[i] - r[0]).abs().max().item())
            ok = err_seg < 3e-2 and err_step < 3e-2 and bool(torch.isneginf(ll[lengths == 0]).all())
            results.append({"check": "attention", "dtype": str(dtype), "heads": [h, kvh, d],
                            "m": m, "prefix": length, "leaves": lens, "max_err_segment": err_seg,
                            "max_err_step": err_step, "ok": ok})
    # sampling: token for token against the host recomputation of the kernel's noise
    bsz, vocab = 512, 2000
    logits = (torch.randn(bsz, vocab, generator=g) * 2).cuda()
    pick = lambda vals: torch.tensor(vals)[torch.randint(0, len(vals), (bsz,), generator=g)]
    temp, tk = pick([0.0, 0.7, 1.0, 1.3]).cuda(), pick([0, 1, 5, 50]).int().cuda()
    tp, mp = pick([1.0, 0.5, 0.9]).cuda(), pick([0.0, 0.05]).cuda()
    seeds = torch.randint(0, 2 ** 62, (bsz,), generator=g)
    tokens = st.sample_triton(logits.clone(), temp, tk, tp, mp, seeds.cuda()).cpu()
    lc = logits.cpu()
    kept = torch.isfinite(filter_logits_reference(lc, temp.cpu(), tk.cpu(), tp.cpu(), mp.cpu()))
    greedy = temp.cpu() <= 1e-5
    x = lc / torch.where(greedy, torch.ones_like(temp.cpu()), temp.cpu())[:, None]
    noise = torch.stack([torch.from_numpy(st.kernel_gumbel_numpy(int(s), vocab)) for s in seeds])
    want = torch.where(greedy, x.argmax(1),
                       torch.where(kept, x + noise, torch.full_like(x, -math.inf)).argmax(1))
    mismatch = (tokens != want).float().mean().item()
    in_support = bool(kept[torch.arange(bsz), tokens].all())
    results.append({"check": "sampling_exact", "rows": bsz, "vocab": vocab,
                    "mismatch_rate": mismatch, "in_support": in_support,
                    "ok": in_support and mismatch < 0.01})
    # sampling: chi-square of 4000 draws of one small-vocabulary row
    n, vocab = 4000, 32
    row = torch.randn(1, vocab, generator=g) * 1.5
    t, k_, p_, m_ = (torch.full((n,), 0.8), torch.full((n,), 12, dtype=torch.int32),
                     torch.full((n,), 0.9), torch.full((n,), 0.02))
    toks = st.sample_triton(row.expand(n, vocab).contiguous().cuda(), t.cuda(), k_.cuda(),
                            p_.cuda(), m_.cuda(), torch.arange(n).cuda()).cpu()
    probs = sampling_probs_reference(row, t[:1], k_[:1], p_[:1], m_[:1])[0].double()
    counts = torch.bincount(toks, minlength=vocab).double()
    support = probs > 0
    exp = probs[support] * n
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    pval = float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))
    results.append({"check": "sampling_chi_square", "draws": n, "df": df, "stat": stat,
                    "p_value": pval, "outside_support": int(counts[~support].sum()),
                    "ok": pval > 1e-3 and int(counts[~support].sum()) == 0})
    return results


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

def _sdpa(q, k, v, scale):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def _attention_case(name: str, h: int, kvh: int, d: int, b: int, p: int, suffix: int,
                    copy_bw: float) -> dict:
    from alignserve.kernels import dispatch

    dtype, esize, scale = torch.bfloat16, 2, d ** -0.5
    slots = p + b * suffix
    k_pool = torch.randn(slots, kvh, d, device="cuda", dtype=dtype)
    v_pool = torch.randn(slots, kvh, d, device="cuda", dtype=dtype)
    pre = torch.arange(p, dtype=torch.int32, device="cuda")
    table = (p + torch.arange(b * suffix, dtype=torch.int32, device="cuda")).view(b, suffix)
    lengths = torch.full((b,), suffix, dtype=torch.int32, device="cuda")
    q = torch.randn(b, h, d, device="cuda", dtype=dtype)

    def ours():
        o_p, l_p = dispatch.segment_attention(q, k_pool, v_pool, pre, scale)
        o_l, l_l = dispatch.leaf_attention(q, k_pool, v_pool, table, lengths, scale,
                                           max_length=suffix)
        return dispatch.merge_attention(o_p, l_p, o_l, l_l)[0]

    # per-sequence KV: [B, KVH, P + S, D], every sequence with its own copy of the prefix
    kv_idx = torch.cat([pre.long().expand(b, p), table.long()], dim=1)
    k_seq = k_pool[kv_idx].permute(0, 2, 1, 3).contiguous()
    v_seq = v_pool[kv_idx].permute(0, 2, 1, 3).contiguous()
    q4 = q.view(b, h, 1, d)

    def per_seq():
        return _sdpa(q4, k_seq, v_seq, scale)

    # the prefix as one block of B queries, then the suffixes (no merge)
    k_pre = k_pool[:p].permute(1, 0, 2).unsqueeze(0).contiguous()
    v_pre = v_pool[:p].permute(1, 0, 2).unsqueeze(0).contiguous()
    k_suf = k_seq[:, :, p:].contiguous()
    v_suf = v_seq[:, :, p:].contiguous()
    q_blk = q.permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, H, B, D]

    def block():
        _sdpa(q_blk, k_pre, v_pre, scale)
        return _sdpa(q4, k_suf, v_suf, scale)

    ref = per_seq().view(b, h, d).float()
    err = (ours() - ref).abs().max().item()
    t_ours = _ms(ours)
    t_graph = _ms(ours, graph=True)
    t_seq = _ms(per_seq)
    t_blk = _ms(block)
    need = (p + b * suffix) * kvh * d * 2 * esize + b * h * d * esize
    floor_ms = need / copy_bw * 1e3
    best = min(t_ours, t_graph)
    return {
        "kernel": "attention", "heads": name, "H": h, "KVH": kvh, "D": d, "batch": b,
        "prefix": p, "suffix": suffix, "dtype": "bf16", "ours_ms": t_ours,
        "ours_cudagraph_ms": t_graph, "sdpa_per_sequence_ms": t_seq,
        "sdpa_prefix_block_ms": t_blk, "bytes_needed": need, "floor_ms": floor_ms,
        "ours_vs_floor": best / floor_ms, "achieved_fraction_of_copy_bw": floor_ms / best,
        "speedup_vs_per_sequence": t_seq / best, "speedup_vs_prefix_block": t_blk / best,
        "max_abs_err_vs_sdpa": err,
    }


def bench_attention(copy_bw: float, quick: bool) -> list[dict]:
    rows = []
    for name, (h, kvh, d) in HEADS.items():
        for b in (16, 64) if not quick else (64,):
            for p in (1024, 4096, 16384) if not quick else (4096,):
                row = _attention_case(name, h, kvh, d, b, p, 128, copy_bw)
                torch.cuda.empty_cache()
                rows.append(row)
                print(f"attn {name:13s} B={b:3d} P={p:6d}: ours {row['ours_ms'] * 1e3:8.1f} us "
                      f"(graph {row['ours_cudagraph_ms'] * 1e3:8.1f})  per-seq "
                      f"{row['sdpa_per_sequence_ms'] * 1e3:8.1f}  block "
                      f"{row['sdpa_prefix_block_ms'] * 1e3:8.1f}  floor "
                      f"{row['floor_ms'] * 1e3:7.1f}  x{row['speedup_vs_per_sequence']:.1f} vs "
                      f"per-seq, {row['ours_vs_floor']:.2f}x floor, "
                      f"err {row['max_abs_err_vs_sdpa']:.1e}", flush=True)
    return rows


def sweep_attention(copy_bw: float) -> list[dict]:
    """segment_attention alone at batch 64 over a range of split-K chunk sizes and tile configs
    (the spill-free ones), to check the launch heuristics on this GPU."""
    from alignserve.kernels import attention_triton as at

    rows = []
    for name, (h, kvh, d) in HEADS.items():
        for p in (4096, 16384):
            b = 64
            k = torch.randn(p, kvh, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            pre = torch.arange(p, dtype=torch.int32, device="cuda")
            q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
            need = p * kvh * d * 2 * 2
            auto = at.segment_config(b * (h // kvh), d)
            for chunk in (None, 128, 256, 512, 1024, 2048):
                for bn, nw in ((auto[1], auto[2]), (32, 8), (128, 8)):
                    def run(q=q, k=k, v=v, pre=pre, scale=d ** -0.5, chunk=chunk, bn=bn,
                            nw=nw):
                        return at.segment_attention_triton(q, k, v, pre, scale, chunk_size=chunk,
                                                           block_n=bn, num_warps=nw)
                    t = _ms(run, graph=True)
                    rows.append({"heads": name, "batch": b, "prefix": p, "chunk": chunk or "auto",
                                 "block_n": bn, "num_warps": nw, "ms": t,
                                 "floor_ms": need / copy_bw * 1e3})
                    print(f"sweep {name:13s} P={p:6d} chunk={chunk or 'auto'!s:5s} bn={bn:3d} "
                          f"w={nw}: {t * 1e3:7.1f} us (floor {need / copy_bw * 1e6:6.1f} us)",
                          flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# logits
# ----------------------------------------------------------------------------------------------

def _unfused(logits, temp, tk, tp, mp):
    from alignserve.kernels.sampling import filter_logits_reference

    probs = torch.softmax(filter_logits_reference(logits, temp, tk, tp, mp), dim=1)
    return torch.argmax(probs / torch.empty_like(probs).exponential_(), dim=1)


SCENARIOS = {
    "top_p": {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "min_p": 0.0},
    "mixed": {"temperature": 0.7, "top_k": 50, "top_p": 0.95, "min_p": 0.05},
    "plain": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
}


def _logits_case(vname: str, v: int, b: int, sname: str, sc: dict, copy_bw: float) -> dict:
    from alignserve.kernels import dispatch
    from alignserve.kernels.sampling import filter_logits_reference

    # logits shaped like a language model's: a few tokens well above a wide bulk
    logits = torch.randn(b, v, device="cuda") * 2.5
    logits[:, :: max(1, v // 64)] += 6.0
    logits = logits.to(torch.bfloat16)
    seeds = torch.randint(0, 2 ** 62, (b,), device="cuda")
    temp = torch.full((b,), sc["temperature"], device="cuda")
    tk = torch.full((b,), sc["top_k"], device="cuda", dtype=torch.int32)
    tp = torch.full((b,), sc["top_p"], device="cuda")
    mp = torch.full((b,), sc["min_p"], device="cuda")

    def fused():
        return dispatch.sample(logits, temp, tk, tp, mp, seeds)

    def unfused():
        return _unfused(logits, temp, tk, tp, mp)

    toks = fused()
    probs = torch.softmax(filter_logits_reference(logits, temp, tk, tp, mp), dim=1)
    in_support = bool((probs[torch.arange(b, device="cuda"), toks] > 0).all())
    t_f = _ms(fused)
    t_fg = _ms(fused, graph=True)
    t_u = _ms(unfused)
    read_ms = b * v * 2 / copy_bw * 1e3
    best = min(t_f, t_fg)
    return {"kernel": "sampling", "vocab": v, "vocab_name": vname, "batch": b,
            "scenario": sname, **sc, "fused_ms": t_f, "fused_cudagraph_ms": t_fg,
            "unfused_torch_ms": t_u, "one_read_ms": read_ms, "speedup_vs_unfused": t_u / best,
            "fused_vs_one_read": best / read_ms, "tokens_in_support": in_support}


def bench_logits(copy_bw: float, quick: bool) -> list[dict]:
    rows = []
    vocabs = VOCABS if not quick else {"llama3": VOCABS["llama3"]}
    for vname, v in vocabs.items():
        for b in (1, 4, 16, 64, 256) if not quick else (1, 64, 256):
            for sname, sc in SCENARIOS.items():
                row = _logits_case(vname, v, b, sname, sc, copy_bw)
                rows.append(row)
                print(f"logits V={v:6d} B={b:3d} {sname:6s}: fused {row['fused_ms'] * 1e3:8.1f} "
                      f"us (graph {row['fused_cudagraph_ms'] * 1e3:8.1f})  unfused "
                      f"{row['unfused_torch_ms'] * 1e3:8.1f} us  read "
                      f"{row['one_read_ms'] * 1e3:6.1f} us  x{row['speedup_vs_unfused']:.1f}, "
                      f"{row['fused_vs_one_read']:.1f}x read, support "
                      f"{row['tokens_in_support']}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--check", action="store_true", help="only the GPU correctness checks")
    ap.add_argument("--sweep", action="store_true",
                    help="also time segment_attention over chunk sizes and tile configs")
    ap.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernel_sweep.py: no CUDA device here; these benchmarks need the GPU machine.")
        return 0
    try:
        import triton
    except ImportError:
        print("bench/kernel_sweep.py: triton is not installed; nothing to compare.")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    checks = run_checks()
    for c in checks:
        print("check:", json.dumps(c), flush=True)
    ok = all(c["ok"] for c in checks)
    if args.check:
        return 0 if ok else 1
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    sweep = sweep_attention(bw) if args.sweep else []
    attention = bench_attention(bw, args.quick)
    sampling = bench_logits(bw, args.quick)
    now = dt.datetime.now(dt.UTC)
    result = {
        "device": dev, "commit": _commit(), "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "copy_bandwidth_bytes_per_s": bw,
        "quick": args.quick, "checks": checks, "attention": attention, "sampling": sampling,
        "attention_sweep": sweep,
    }
    out = args.out or ROOT / "bench" / "results" / f"kernels-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
