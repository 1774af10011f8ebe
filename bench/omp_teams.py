"""Why the native engine runs all tensor work on one thread (engine/compute_thread.py): decode
steps of the embedded model on issue 14's 1,447-token prompt, 1 and 16 rows sharing it, timed
in two kinds of process that take turns:

- `one`: every tensor op on the compute thread (loading included), as the server runs now;
- `two`: the model loaded on the main thread and stepped on another, as the server ran before
  (and as a reward scored on a thread of its own would do): two OpenMP teams in one process.

Each process times `--steps` steps after a warm-up; rounds alternate the kinds so that a busy
machine weighs on both alike.

    .venv/bin/python bench/omp_teams.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate_children, write_step_ratio
from native_cpu import PROMPT_TOKENS, TEXT, cpu_info

ROWS = (1, 16)


def load():
    """The embedded engine with the prompt prefilled: (engine, the prompt's chain, its length)."""
    import torch

    from alignserve.engine.native.attention import ExtendPlan
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.engine.native.kv_cache import Segment

    engine = NativeEngine.load.__wrapped__(NativeEngine, device="cpu")  # on this very thread
    kv = engine.kv
    prompt = engine.encode(TEXT * (PROMPT_TOKENS // 10 + 2))[:PROMPT_TOKENS]
    with torch.inference_mode():
        chain = kv.new_chain(1)
        slots = kv.append_slots(chain, len(prompt))
        plan = ExtendPlan(kv, [[Segment()]], [len(prompt)], slots, engine.scale, dtype=torch.bfloat16)
        engine.model.hidden_states(torch.tensor(prompt), torch.arange(len(prompt)), plan)
        kv.seal(chain, 1)
    return engine, chain, len(prompt)


def measure(loaded, steps: int) -> dict[int, float]:
    """Median ms per decode step for each row count (after one warm-up step)."""
    import torch

    from alignserve.engine.native.attention import DecodePlan

    engine, chain, length = loaded
    model, kv = engine.model, engine.kv
    out = {}
    with torch.inference_mode():
        for n in ROWS:
            ids = list(range(100, 100 + n))
            chains = kv.fork(chain, 1, ids)
            times = []
            for s in range(steps + 1):
                t0 = time.perf_counter()
                new = [kv.append_slots(c, 1)[0] for c in chains]
                step = DecodePlan(kv, chains, new, engine.scale)
                model.head(model.hidden_states(torch.zeros(n, dtype=torch.long),
                                               torch.full((n,), length + s), step))
                if s:
                    times.append(1000 * (time.perf_counter() - t0))
            out[n] = statistics.median(times)
            everyone = {1: chain} | dict(zip(ids, chains))
            for sid, c in zip(ids, chains):
                kv.release(c, sid, everyone)
    return out


def child(kind: str, steps: int) -> None:
    with ThreadPoolExecutor(1) as pool:
        if kind == "one":  # loaded and stepped on one thread
            result = pool.submit(lambda: measure(load(), steps)).result()
        else:  # loaded (and stepped once) on the main thread, stepped on another
            loaded = load()
            measure(loaded, 1)
            result = pool.submit(measure, loaded, steps).result()
    print(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", choices=("one", "two"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps)
        return 0
    runs: dict[str, list[dict]] = {"one": [], "two": []}
    for r, kind, result in alternate_children(__file__, list(runs), args.rounds,
                                              ["--steps", str(args.steps)]):
        runs[kind].append(result)
        print(r, kind, result, flush=True)
    write_step_ratio("omp_teams", "ms per decode step (1,447-token prompt): one OpenMP team vs two",
                     {"cpu": cpu_info(), "args": vars(args)}, runs, ROWS, "one", "two")
    return 0


if __name__ == "__main__":
    sys.exit(main())
