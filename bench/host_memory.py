"""Prefill with glibc's freed memory kept in the process against given back
(engine/native/host_memory.py): issue 14's 1,447-token prompt prefilled `--prefills` times per
process after a warm-up, in processes that take turns (`kept`: the engine's setting; `returned`:
glibc's defaults), all tensor work on the compute thread as in the server.

    .venv/bin/python bench/host_memory.py [--rounds 2] [--prefills 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate_children, provenance, write_result
from native_cpu import PROMPT_TOKENS, TEXT, cpu_info


def prefills(kept: bool, count: int) -> list[float]:
    import torch

    from alignserve.engine.native import engine as engine_module
    from alignserve.engine.native.attention import ExtendPlan
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.engine.native.kv_cache import Segment

    if not kept:  # the engine sets them on load: make that a no-op here
        engine_module.keep_freed_memory = lambda: False
    engine = NativeEngine.load(device="cpu")
    model, kv = engine.model, engine.kv
    prompt = engine.encode(TEXT * (PROMPT_TOKENS // 10 + 2))[:PROMPT_TOKENS]

    def once() -> float:
        t0 = time.perf_counter()
        chain = kv.new_chain(1)
        slots = kv.append_slots(chain, len(prompt))
        plan = ExtendPlan(kv, [[Segment()]], [len(prompt)], slots, engine.scale, dtype=torch.bfloat16)
        model.head(model.hidden_states(torch.tensor(prompt), torch.arange(len(prompt)), plan)[-1:])
        kv.release(chain, 1, {1: chain})
        return time.perf_counter() - t0

    with torch.inference_mode():
        once()
        return [once() for _ in range(count)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefills", type=int, default=6)
    ap.add_argument("--child", choices=("kept", "returned"))
    args = ap.parse_args()
    if args.child:
        from alignserve.engine import compute_thread

        print(json.dumps(compute_thread.call(prefills, args.child == "kept", args.prefills)))
        return 0
    runs: dict[str, list[float]] = {"kept": [], "returned": []}
    for r, kind, times in alternate_children(__file__, list(runs), args.rounds,
                                             ["--prefills", str(args.prefills)]):
        runs[kind] += times
        print(r, kind, [round(t, 3) for t in times], flush=True)
    summary = {k: {"median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3),
                   "max_s": round(max(v), 3)} for k, v in runs.items()}
    payload = {**provenance(), "cpu": cpu_info(), "args": vars(args),
               "what": "1,447-token prefill, s: glibc's freed memory kept vs returned",
               "summary": summary, "runs": runs}
    print(json.dumps(summary))
    print("wrote", write_result("host_memory", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
