"""Decode steps over an fp32 KV pool against a bf16 one, side by side in one process (the
engine's bf16 pool on CPUs with bf16 units): issue 14's 1,447-token prompt prefilled into each
pool, then 1 and 16 rows sharing it, the pools taking turns `--rounds` times; the model's
linears as this CPU's default runs them, everything on the compute thread.

    .venv/bin/python bench/kv_dtype.py [--rounds 2] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_step_ratio
from native_cpu import PROMPT_TOKENS, TEXT, cpu_info

from alignserve.engine import compute_thread
from alignserve.engine.native.attention import DecodePlan, ExtendPlan
from alignserve.engine.native.engine import NativeEngine
from alignserve.engine.native.kv_cache import KVCache, Segment

ROWS = (1, 16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def steps_ms(engine: NativeEngine, dtype: torch.dtype, prompt: list[int], steps: int) -> dict:
    """Median ms per decode step for each row count over a fresh pool of `dtype`."""
    model, cfg = engine.model, engine.cfg
    kv = KVCache(cfg.num_layers, 8192, cfg.num_kv_heads, cfg.head_dim, dtype, engine.device)
    out = {}
    with torch.inference_mode():
        chain = kv.new_chain(1)
        slots = kv.append_slots(chain, len(prompt))
        plan = ExtendPlan(kv, [[Segment()]], [len(prompt)], slots, engine.scale, dtype=torch.bfloat16)
        model.hidden_states(torch.tensor(prompt), torch.arange(len(prompt)), plan)
        kv.seal(chain, 1)
        for n in ROWS:
            ids = list(range(100, 100 + n))
            chains = kv.fork(chain, 1, ids)
            times = []
            for s in range(steps + 1):
                t0 = time.perf_counter()
                new = [kv.append_slots(c, 1)[0] for c in chains]
                step = DecodePlan(kv, chains, new, engine.scale)
                model.head(model.hidden_states(torch.zeros(n, dtype=torch.long),
                                               torch.full((n,), len(prompt) + s), step))
                if s:  # the first step warms up
                    times.append(1000 * (time.perf_counter() - t0))
            out[n] = statistics.median(times)
            everyone = {1: chain} | dict(zip(ids, chains))
            for sid, c in zip(ids, chains):
                kv.release(c, sid, everyone)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    engine = NativeEngine.load(device="cpu", kv_cache_gib=0.1)
    prompt = engine.encode(TEXT * (PROMPT_TOKENS // 10 + 2))[:PROMPT_TOKENS]
    runs: dict[str, list[dict]] = {name: [] for name in DTYPES}
    for r in range(args.rounds):
        for name, dtype in DTYPES.items():
            runs[name].append(steps_ms(engine, dtype, prompt, args.steps))
            print(r, name, {n: round(ms, 1) for n, ms in runs[name][-1].items()}, flush=True)
    write_step_ratio("kv_dtype", "ms per decode step (1,447-token prompt): fp32 vs bf16 KV pool",
                     {"cpu": cpu_info(), "args": vars(args)}, runs, ROWS, "fp32", "bf16")
    return 0


if __name__ == "__main__":
    # as the server runs it: every tensor op on one thread (engine/compute_thread.py)
    sys.exit(compute_thread.call(main))
