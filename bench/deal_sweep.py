"""DeAL against best_of_n at equal model tokens on the keyword task, on a slice of items kept
apart from the evaluation's reported slice (the evaluation reports items 0-11; this tunes on
12-27 by default). Each configuration runs the slice through a live server; the table gives
coverage and model tokens per request, and for each DeAL configuration best_of_n's coverage
interpolated (linearly in model tokens) at DeAL's spend.

    .venv/bin/python bench/deal_sweep.py [--base-url URL | (spawns a CPU server)]
        [--items 12:28] [--configs default,b2k2,...]

Writes bench/results/deal-sweep-STAMP.json (device, commit, date, every request).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

from alignserve.evaluation.runner import Pair, Runner, RunSettings, spawned_server
from alignserve.evaluation.strategies import StrategyConfig
from alignserve.evaluation.tasks import load_task

BASELINES = {f"best_of_{n}": {"strategy": "best_of_n", "candidates": n} for n in (2, 4, 8, 16)}
BASELINES["sample"] = {"strategy": "sample"}
DEAL = {  # label -> alignment (the server's defaults fill the rest)
    "deal": {"strategy": "deal"},
    "deal_b2k2": {"strategy": "deal", "top_k": 2},
    "deal_b1k3": {"strategy": "deal", "beam": 1},
    "deal_commit4": {"strategy": "deal", "commit": 4},
    "deal_commit1": {"strategy": "deal", "commit": 1, "lookahead": 8, "beam": 1, "top_k": 4},
    "deal_lambda1": {"strategy": "deal", "lambda": 1.0},
    "deal_lambda8": {"strategy": "deal", "lambda": 8.0},
    "deal_k4": {"strategy": "deal", "top_k": 4},
    "deal_k6": {"strategy": "deal", "top_k": 6},
    "deal_b3": {"strategy": "deal", "beam": 3},
    "deal_la12": {"strategy": "deal", "lookahead": 12},
    "deal_la16": {"strategy": "deal", "lookahead": 16},
    "deal_k8": {"strategy": "deal", "top_k": 8},
    "deal_k6_la12": {"strategy": "deal", "top_k": 6, "lookahead": 12},
    "deal_k6_b3": {"strategy": "deal", "top_k": 6, "beam": 3},
    "deal_k4_b3": {"strategy": "deal", "top_k": 4, "beam": 3},
    "deal_sampled": {"strategy": "deal", "rollout": "sample"},
}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through (x, y) points; None outside it."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="a running server (default: spawn one on CPU)")
    p.add_argument("--items", default="12:28", help="slice of the keyword items, lo:hi")
    p.add_argument("--configs", default=",".join(DEAL), help="DeAL labels to run")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="best_of_n / sample labels to run beside (fewer: a cheaper sweep)")
    args = p.parse_args()
    lo, hi = (int(v) for v in args.items.split(":"))
    task = load_task("keywords")
    items = task.items[lo:hi]
    configs = {**{k: BASELINES[k] for k in args.baselines.split(",") if k},
               **{k: DEAL[k] for k in args.configs.split(",") if k}}
    server = (contextlib.nullcontext(args.base_url) if args.base_url
              else spawned_server(["--device", "cpu"]))
    rows, records = {}, []
    with server as url:
        runner = Runner(url, RunSettings(max_tokens=args.max_tokens,
                                         concurrency=args.concurrency, timeout=3000),
                        progress=False)
        try:
            for label, alignment in configs.items():
                decoding = "greedy" if alignment["strategy"] == "deal" else "sampled"
                recs, walls = runner.run([Pair(task, StrategyConfig(label, alignment, decoding),
                                               items)])
                ok = [r for r in recs if "error" not in r]
                rows[label] = {
                    "alignment": alignment, "requests": len(recs), "errors": len(recs) - len(ok),
                    "coverage": statistics.mean(r["metrics"]["coverage"] for r in ok),
                    "model_tokens": statistics.mean(r["model_tokens"] for r in ok),
                    "tokens_out": statistics.mean(r["completion_tokens"] for r in ok),
                    "wall_seconds": walls[0]["wall_seconds"]}
                records.extend(recs)
                print(f"{label:18s} coverage {rows[label]['coverage']:.3f} model tokens "
                      f"{rows[label]['model_tokens']:6.0f}", flush=True)
        finally:
            runner.close()
    curve = [(r["model_tokens"], r["coverage"]) for k, r in rows.items() if k in BASELINES]
    for label, r in rows.items():
        if label in DEAL:
            r["best_of_n_at_equal_tokens"] = interpolate(curve, r["model_tokens"])
    print("\n| configuration | coverage | model tokens/req | best_of_n at equal tokens |")
    print("|---|---:|---:|---:|")
    for label, r in rows.items():
        eq = r.get("best_of_n_at_equal_tokens")
        print(f"| {label} | {r['coverage']:.3f} | {r['model_tokens']:.0f} | "
              f"{'-' if eq is None else f'{eq:.3f}'} |")
    path = write_result("deal-sweep", {**provenance(), "items": args.items,
                                       "max_tokens": args.max_tokens, "rows": rows,
                                       "requests": records})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
