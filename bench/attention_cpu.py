"""CPU attention: torch's fused flash attention (with log-sum-exp) against the plain reference,
side by side in one run, and what it does to the embedded engine's best_of_n.

1. Kernels: the shapes a CPU decode step and prefill meet with SmolLM2-135M's heads (9 query,
   3 KV, head_dim 64, fp32): a group's queries over a shared prefix, one query per sequence over
   its own ragged leaf, and a causal prefill chunk. Median of --iters.
2. The engine: best_of_n with --candidates candidates, --new-tokens tokens (ignore_eos) on a
   --prompt-token prompt through the strategy code the server uses, with the real embedded
   model; the two attention paths alternate (dispatch.FORCE) for --repeats rounds.
Writes bench/results/attention_cpu-*.json.

    .venv/bin/python bench/attention_cpu.py [--repeats 2] [--prompt 1024] [--candidates 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bon_cpu import prompt_of, run_strategy
from common import median_ms, provenance, write_result

from alignserve.engine.native.engine import NativeEngine
from alignserve.kernels import attention_fused, dispatch
from alignserve.kernels.attention import attention_lse_reference, padded_attention_lse_reference

H, KVH, D = 9, 3, 64


def kernel_rows(iters: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for m, length in ((1, 1024), (16, 1024), (16, 2048), (64, 2048)):
        q = torch.randn(m, H, D, generator=g)
        k, v = torch.randn(2, length, KVH, D, generator=g).unbind(0)
        rows.append({"case": "prefix", "queries": m, "keys": length,
                     "reference_ms": median_ms(partial(attention_lse_reference, q, k, v, 0.125), iters),
                     "fused_ms": median_ms(partial(attention_fused.attention_lse, q, k, v, 0.125), iters)})
    for b, lmax in ((16, 64), (64, 64), (64, 128)):
        q = torch.randn(b, H, D, generator=g)
        k, v = torch.randn(2, b, lmax, KVH, D, generator=g).unbind(0)
        lengths = torch.randint(1, lmax + 1, (b,), generator=g)
        rows.append({"case": "leaf", "queries": b, "keys": lmax,
                     "reference_ms": median_ms(partial(padded_attention_lse_reference, q, k, v, lengths, 0.125), iters),
                     "fused_ms": median_ms(partial(attention_fused.padded_attention_lse, q, k, v, lengths, 0.125), iters)})
    for n in (256, 512):
        q = torch.randn(n, H, D, generator=g)
        k, v = torch.randn(2, n, KVH, D, generator=g).unbind(0)
        rows.append({"case": "causal", "queries": n, "keys": n,
                     "reference_ms": median_ms(partial(attention_lse_reference, q, k, v, 0.125, 0), iters),
                     "fused_ms": median_ms(partial(attention_fused.attention_lse, q, k, v, 0.125, causal=True), iters)})
    for r in rows:
        r["reference_ms"], r["fused_ms"] = round(r["reference_ms"], 3), round(r["fused_ms"], 3)
        r["speedup"] = round(r["reference_ms"] / r["fused_ms"], 2)
        print(r, flush=True)
    return rows


async def engine_rows(args) -> dict:
    engine = NativeEngine.load(device="cpu")
    await engine.start()
    try:
        prompt = prompt_of(engine, args.prompt)
        await run_strategy(engine, "best_of_n", prompt[:64], 4, 2)  # warm-up
        times: dict[str, list[float]] = {"reference": [], "fused": []}
        for _ in range(args.repeats):
            for path in ("reference", "fused"):
                dispatch.FORCE = "reference" if path == "reference" else None
                seconds, _ = await run_strategy(engine, "best_of_n", prompt, args.new_tokens, args.candidates)
                times[path].append(seconds)
                print(path, round(seconds, 2), "s", flush=True)
    finally:
        dispatch.FORCE = None
        await engine.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"strategy": "best_of_n", "candidates": args.candidates, "prompt": args.prompt,
            "new_tokens": args.new_tokens, "seconds": times,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "speedup": round(med["reference"] / med["fused"], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-engine", action="store_true", help="only the kernel timings")
    args = ap.parse_args()
    kernels = kernel_rows(args.iters)
    engine = None if args.no_engine else asyncio.run(engine_rows(args))
    if engine:
        print(engine)
    payload = {**provenance(), "torch": torch.__version__, "args": vars(args),
               "what": "CPU attention: torch's fused flash attention vs the reference",
               "kernels": kernels, "engine": engine}
    print("wrote", write_result("attention_cpu", payload))
    return 0


if __name__ == "__main__":
    from alignserve.engine import compute_thread

    # as the server runs it: every tensor op on one thread (engine/compute_thread.py)
    sys.exit(compute_thread.call(main))
