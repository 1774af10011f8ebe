"""Few-row bf16 linears on CPU (cpu_linear.py) against exact fp32, side by side in one run:
1. the embedded model's 121 linears of one decode step (weights out of cache, as in serving)
   at 1, 2, 4, 8 and 16 rows, fp32 weights against the bf16 copies: where the row limit lies;
2. `sample` (n=1, the few-row case it is for) and `best_of_n` with 4 candidates (at the row
   limit) through the strategy code the server uses, the two settings alternating for --repeats
   rounds on one engine.
Writes bench/results/cpu_decode-*.json.

    .venv/bin/python bench/cpu_decode.py [--repeats 2] [--new-tokens 48] [--prompt 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bon_cpu import prompt_of, run_strategy
from common import median_ms, provenance, write_result

from alignserve.engine.native.cpu_linear import DEFAULT_MAX_ROWS, FewRowBf16Linear, set_few_rows
from alignserve.engine.native.engine import NativeEngine

CASES = (("sample", 1), ("best_of_n", 4))


def linear_rows(engine: NativeEngine) -> list[dict]:
    """ms per step of the model's linears by row count, fp32 vs the bf16 copies."""
    linears = [m for m in engine.model.modules() if isinstance(m, FewRowBf16Linear)]
    out = []
    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16):
            xs = {n: torch.randn(rows, n) for n in {m.weight.shape[1] for m in linears}}
            xb = {n: x.bfloat16() for n, x in xs.items()}
            ms = {name: round(median_ms(step, 5), 1) for name, step in (
                ("fp32", lambda xs=xs: [F.linear(xs[m.weight.shape[1]], m.weight) for m in linears]),
                ("bf16", lambda xb=xb: [F.linear(xb[m.weight.shape[1]], m.weight_bf16) for m in linears]),
            )}
            out.append({"rows": rows, "fp32_ms": ms["fp32"], "bf16_ms": ms["bf16"],
                        "speedup": round(ms["fp32"] / ms["bf16"], 2)})
            print(out[-1], flush=True)
    return out


async def measure(args) -> tuple[list[dict], dict]:
    engine = NativeEngine.load(device="cpu")  # few-row bf16 on: the CPU default
    linears = linear_rows(engine)
    await engine.start()
    times: dict[str, dict[str, list[float]]] = {f"{s}/{c}": {"fp32": [], "bf16": []} for s, c in CASES}
    try:
        prompt = prompt_of(engine, args.prompt)
        await run_strategy(engine, "sample", prompt[:32], 4, 1)  # warm-up
        for _ in range(args.repeats):
            for setting, rows in (("fp32", 0), ("bf16", DEFAULT_MAX_ROWS)):
                set_few_rows(engine.model, rows)
                for strategy, candidates in CASES:
                    seconds, _ = await run_strategy(engine, strategy, prompt, args.new_tokens, candidates)
                    times[f"{strategy}/{candidates}"][setting].append(seconds)
                    print(setting, strategy, candidates, round(seconds, 2), "s", flush=True)
    finally:
        await engine.close()
    out = {}
    for case, t in times.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        out[case] = {"seconds": t, "median_s": {k: round(v, 3) for k, v in med.items()},
                     "speedup": round(med["fp32"] / med["bf16"], 2)}
    return linears, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    linears, results = asyncio.run(measure(args))
    for case, r in results.items():
        print(case, r["median_s"], f"{r['speedup']}x")
    payload = {**provenance(), "torch": torch.__version__, "args": vars(args),
               "what": "few-row bf16 linears vs fp32 on CPU: the linears alone, and end to end",
               "linears": linears, "results": results}
    print("wrote", write_result("cpu_decode", payload))
    return 0


if __name__ == "__main__":
    from alignserve.engine import compute_thread

    # as the server runs it: every tensor op on one thread (engine/compute_thread.py)
    sys.exit(compute_thread.call(main))
