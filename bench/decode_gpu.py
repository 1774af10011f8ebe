"""Decode step time of the native engine on GPU: eager vs piecewise CUDA graphs (issue 4).

    python bench/decode_gpu.py                    # SmolLM2-135M shape, batch 1, 16, 64
    python bench/decode_gpu.py --models smollm2-135m llama-3.2-1b --prompt 4096

Random weights (bf16), a shared random prompt of --prompt tokens already in the KV cache and a
leaf of --leaf tokens per sequence, so attention takes the Hydragen path it takes when serving
n candidates. One step = the forward pass of one new token per sequence (dense parts, attention
with its KV write, final norm, lm_head); the plan is built once and reused (rewriting the same
slots), so both paths time the same work. Host time per step, synchronised, median of --iters.
Also recorded: the logits' largest difference between the two paths, and how long capturing a
bucket took. Results: bench/results/decode_gpu-<stamp>.json.

Without a CUDA device it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from shapes import SHAPES, build_model

from alignserve.engine.native.attention import DecodePlan
from alignserve.engine.native.cuda_graphs import PiecewiseDecodeRunner
from alignserve.engine.native.kv_cache import KVCache
from alignserve.engine.native.model import CausalLM


def build_step(model: CausalLM, batch: int, prompt: int, leaf: int):
    """(tokens, positions, plan) of one decode step over `batch` sequences sharing a prompt."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    slots = prompt + batch * (leaf + 32) + 64
    cache = KVCache(cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim, dtype, torch.device("cuda"))
    cache.k.normal_()
    cache.v.normal_()
    root = cache.new_chain(0)
    cache.append_slots(root, prompt)
    chains = cache.fork(root, 0, list(range(1, batch + 1)))
    for c in chains:
        cache.append_slots(c, leaf)
    new = [cache.append_slots(c, 1)[0] for c in chains]
    plan = DecodePlan(cache, chains, new, cfg.head_dim ** -0.5)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    positions = torch.full((batch,), prompt + leaf, device="cuda")
    return tokens, positions, plan


def time_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.inference_mode()
def bench_shape(shape: str, batches: list[int], prompt: int, leaf: int, iters: int) -> list[dict]:
    model = build_model(shape, "cuda", torch.bfloat16)
    runner = PiecewiseDecodeRunner(model, capture=True)
    rows = []
    for b in batches:
        tokens, positions, plan = build_step(model, b, prompt, leaf)

        def eager(tokens=tokens, positions=positions, plan=plan):
            return model.head(model.hidden_states(tokens, positions, plan))[1]

        t0 = time.perf_counter()
        assert runner.prepare(b), runner.failed
        torch.cuda.synchronize()
        capture_ms = 1000 * (time.perf_counter() - t0)

        def graphs(tokens=tokens, positions=positions, plan=plan):
            return runner.run(tokens, positions, plan)[1]

        diff = float((eager() - graphs()).abs().max())
        e_ms, g_ms = time_ms(eager, iters), time_ms(graphs, iters)
        row = {"model": shape, "batch": b, "bucket": runner.bucket_for(b), "prompt": prompt,
               "leaf": leaf, "eager_ms": round(e_ms, 4), "graphs_ms": round(g_ms, 4),
               "speedup": round(e_ms / g_ms, 2), "graphs_tok_per_s": round(b / g_ms * 1000),
               "eager_tok_per_s": round(b / e_ms * 1000), "capture_ms": round(capture_ms, 1),
               "max_abs_logit_diff": diff, "pieces": model.cfg.num_layers + 1}
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=sorted(set(SHAPES) - {"tiny"}))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, default=1024, help="shared prompt tokens in the KV cache")
    ap.add_argument("--leaf", type=int, default=32, help="tokens of each sequence's own")
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/decode_gpu.py: no CUDA device here; this benchmark needs the GPU machine.")
        return 0
    from common import provenance, write_result

    rows = []
    for shape in args.models:
        rows.extend(bench_shape(shape, args.batches, args.prompt, args.leaf, args.iters))
    payload = {**provenance(), "torch": torch.__version__, "dtype": "bfloat16",
               "what": "native decode step: eager vs piecewise CUDA graphs (random weights)",
               "args": vars(args), "results": rows}
    print("wrote", write_result("decode_gpu", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
