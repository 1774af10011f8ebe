"""Decode step time of the native engine on GPU: eager vs piecewise vs whole-step CUDA graphs (issue 4).

    python bench/decode_gpu.py                    # SmolLM2-135M shape, batch 1, 16, 64
    python bench/decode_gpu.py --models smollm2-135m llama-3.2-1b --prompt 4096

Random weights (bf16), a shared random prompt of --prompt tokens already in the KV cache and a
leaf of --leaf tokens per sequence, so attention takes the Hydragen path it takes when serving
n candidates. One step = the forward pass of one new token per sequence (dense parts, attention
with its KV write, final norm, lm_head); the plan is built once and reused (rewriting the same
slots), so every path times the same work. Host time per step, synchronised, median of --iters.
Paths: eager (the model's plain forward), piecewise (dense pieces replayed, attention eagerly
between them) and whole (the step's layout recorded as one graph, attention included; what the
engine runs once a layout repeats). Also recorded: each path's largest logit difference from
eager, and how long the captures took. Results: bench/results/decode_gpu-<stamp>.json.

Without a CUDA device it prints a message and exits 0; `--device cpu --models tiny` runs the
same paths uncaptured (a smoke test of this script, not a measurement).
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
from alignserve.engine.native.cuda_graphs import DecodeGraphRunner
from alignserve.engine.native.kv_cache import KVCache
from alignserve.engine.native.model import CausalLM


def build_step(model: CausalLM, batch: int, prompt: int, leaf: int, device: torch.device):
    """(tokens, positions, plan, graph plan) of one decode step over `batch` sequences sharing a
    prompt; the graph plan is the same step laid out for a whole-step graph."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    slots = prompt + batch * (leaf + 32) + 64
    cache = KVCache(cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    cache.k.normal_()
    cache.v.normal_()
    root = cache.new_chain(0)
    cache.append_slots(root, prompt)
    chains = cache.fork(root, 0, list(range(1, batch + 1)))
    for c in chains:
        cache.append_slots(c, leaf)
    new = [cache.append_slots(c, 1)[0] for c in chains]
    plan = DecodePlan(cache, chains, new, cfg.head_dim ** -0.5)
    graph_plan = DecodePlan(cache, chains, new, cfg.head_dim ** -0.5, for_graphs=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device=device)
    positions = torch.full((batch,), prompt + leaf, device=device)
    return tokens, positions, plan, graph_plan


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.inference_mode()
def bench_shape(shape: str, batches: list[int], prompt: int, leaf: int, iters: int,
                device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    model = build_model(shape, device, torch.bfloat16 if cuda else torch.float32)
    pieces = DecodeGraphRunner(model, capture=cuda, whole=False)
    whole = DecodeGraphRunner(model, capture=cuda, whole_after=1)
    rows = []
    for b in batches:
        tokens, positions, plan, graph_plan = build_step(model, b, prompt, leaf, device)

        def eager(tokens=tokens, positions=positions, plan=plan):
            return model.head(model.hidden_states(tokens, positions, plan))[1]

        def piecewise(tokens=tokens, positions=positions, plan=plan):
            return pieces.run(tokens, positions, plan)[1]

        def whole_step(tokens=tokens, positions=positions, plan=graph_plan):
            return whole.run(tokens, positions, plan)[1]

        t0 = time.perf_counter()
        assert pieces.prepare(b), pieces.failed
        sync()
        capture_ms = 1000 * (time.perf_counter() - t0)
        assert whole.prepare(b), whole.failed
        t0 = time.perf_counter()
        whole_step()  # records the layout (whole_after=1)
        sync()
        whole_capture_ms = 1000 * (time.perf_counter() - t0)
        assert whole.whole_failed is None and whole.whole_built == len(rows) + 1, whole.whole_failed

        ref = eager()
        diff = float((ref - piecewise()).abs().max())
        whole_diff = float((ref - whole_step()).abs().max())
        e_ms, g_ms, w_ms = (time_ms(eager, iters), time_ms(piecewise, iters),
                            time_ms(whole_step, iters))
        row = {"model": shape, "batch": b, "bucket": pieces.bucket_for(b), "prompt": prompt,
               "leaf": leaf, "eager_ms": round(e_ms, 4), "graphs_ms": round(g_ms, 4),
               "whole_ms": round(w_ms, 4), "speedup": round(e_ms / g_ms, 2),
               "whole_speedup": round(e_ms / w_ms, 2), "whole_over_piecewise": round(g_ms / w_ms, 2),
               "whole_tok_per_s": round(b / w_ms * 1000),
               "graphs_tok_per_s": round(b / g_ms * 1000),
               "eager_tok_per_s": round(b / e_ms * 1000), "capture_ms": round(capture_ms, 1),
               "whole_capture_ms": round(whole_capture_ms, 1),
               "max_abs_logit_diff": diff, "whole_max_abs_logit_diff": whole_diff,
               "pieces": model.cfg.num_layers + 1}
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=sorted(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, default=1024, help="shared prompt tokens in the KV cache")
    ap.add_argument("--leaf", type=int, default=32, help="tokens of each sequence's own")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/decode_gpu.py: no CUDA device here; this benchmark needs the GPU machine.")
        return 0
    from common import provenance, write_result

    rows = []
    for shape in args.models:
        rows.extend(bench_shape(shape, args.batches, args.prompt, args.leaf, args.iters,
                                torch.device(args.device)))
    payload = {**provenance(), "torch": torch.__version__,
               "dtype": "bfloat16" if args.device == "cuda" else "float32",
               "what": "native decode step: eager vs piecewise vs whole-step CUDA graphs (random weights)",
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": rows}
    print("wrote", write_result("decode_gpu", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
