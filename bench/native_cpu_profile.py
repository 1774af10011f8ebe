"""Where a native CPU step spends its time: prefill of issue 14's 1,447-token prompt and decode
steps of 1 and 16 sequences sharing it, at the model level (no scheduler), per op
(torch.profiler's self CPU time), per layer, and the rest ("host": Python between the ops).

Each variant runs on one loaded engine (`fp32`: exact; `bf16`: this CPU's default), its steps
timed with the process's CPU time as well as wall time: on this shared machine the wall clock
also counts time the process waited for a core, CPU time does not (with one thread it is the
work done; with more it includes spinning in parallel regions).

    .venv/bin/python bench/native_cpu_profile.py [--steps 4] [--variants fp32,bf16]

The C++ attention kernel (kernels/cpu_attention.cpp, a bf16 pool only: the `bf16` variant) is
not a torch op: its calls are labelled `alignserve::cpu_step_attention` for the profiler.
ALIGNSERVE_CPU_ATTENTION=off profiles torch's ops in its place.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result
from native_cpu import PROMPT_TOKENS, TEXT, VARIANTS, cpu_info

from alignserve.engine.native import cpu_linear
from alignserve.engine.native.attention import DecodePlan, ExtendPlan
from alignserve.engine.native.engine import NativeEngine
from alignserve.engine.native.kv_cache import Segment
from alignserve.kernels import dispatch

_kernel_call = dispatch.cpu_step_attention


def _labelled_kernel_call(*args, **kwargs):
    with torch.profiler.record_function("alignserve::cpu_step_attention"):
        return _kernel_call(*args, **kwargs)


dispatch.cpu_step_attention = _labelled_kernel_call  # the plans call it through the module


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def op_table(prof, per: int, top: int = 12) -> tuple[list[dict], float]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    table = [{"op": e.key, "ms_per_step": round(e.self_cpu_time_total / 1000 / per, 2),
              "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // per}
             for e in rows[:top]]
    return table, total / 1000 / per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--variants", default="fp32,bf16", type=lambda s: s.split(","))
    args = ap.parse_args()
    engine = NativeEngine.load(device="cpu")
    model, kv, cfg = engine.model, engine.kv, engine.cfg
    prompt = engine.encode(TEXT * (PROMPT_TOKENS // 10 + 2))[:PROMPT_TOKENS]
    out: dict = {}

    def prefill(bf16: bool):
        chain = kv.new_chain(1)
        slots = kv.append_slots(chain, len(prompt))
        plan = ExtendPlan(kv, [[Segment()]], [len(prompt)], slots, engine.scale,
                          dtype=torch.bfloat16 if bf16 else None)
        hidden = model.hidden_states(torch.tensor(prompt), torch.arange(len(prompt)), plan)
        model.head(hidden[-1:])
        kv.seal(chain, 1)
        return chain

    with torch.inference_mode():
        for variant in args.variants:
            cpu_linear.set_few_rows(model, VARIANTS[variant])
            bf16 = cpu_linear.bf16_rows(model) >= len(prompt)
            res: dict = {}
            times = []
            for _ in range(3):
                box = {}
                times.append(timed(lambda box=box, bf16=bf16: box.setdefault("chain", prefill(bf16))))
                kv.release(box["chain"], 1, {1: box["chain"]})
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                chain = prefill(bf16)
            ops, op_ms = op_table(prof, 1)
            wall = statistics.median(t[0] for t in times)
            cpu = statistics.median(t[1] for t in times)
            res["prefill"] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                              "per_layer_cpu_ms": round(1000 * cpu / cfg.num_layers, 1),
                              "ops_ms": round(op_ms, 1), "ops": ops}
            for n in (1, 16):
                ids = list(range(100, 100 + n))
                chains = kv.fork(chain, 1, ids)
                length = [len(prompt)]

                def steps(k: int, chains=chains, n=n, length=length) -> None:
                    for _ in range(k):
                        slots = [kv.append_slots(c, 1)[0] for c in chains]
                        plan = DecodePlan(kv, chains, slots, engine.scale)
                        hidden = model.hidden_states(torch.zeros(n, dtype=torch.long),
                                                     torch.full((n,), length[0]), plan)
                        model.head(hidden)
                        length[0] += 1

                steps(1)
                wall, cpu = timed(lambda: steps(args.steps))
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    steps(args.steps)
                ops, op_ms = op_table(prof, args.steps)
                cpu_ms = 1000 * cpu / args.steps
                res[f"decode_{n}"] = {
                    "wall_ms_per_step": round(1000 * wall / args.steps, 1),
                    "cpu_ms_per_step": round(cpu_ms, 1),
                    "per_layer_cpu_ms": round(cpu_ms / cfg.num_layers, 2),
                    "ops_ms_per_step": round(op_ms, 1),
                    "host_ms_per_step": round(max(0.0, cpu_ms - op_ms), 1),
                    "ops": ops}
                everyone = {1: chain} | dict(zip(ids, chains))
                for sid, c in zip(ids, chains):
                    kv.release(c, sid, everyone)
            kv.release(chain, 1, {1: chain})
            out[variant] = res
            print(variant, {k: {m: v for m, v in r.items() if m != "ops"} for k, r in res.items()},
                  flush=True)
    payload = {**provenance(), "cpu": cpu_info(), "torch": torch.__version__, "args": vars(args),
               "what": "native CPU step profile: prefill 1,447 tokens, decode 1 and 16 rows",
               "results": out}
    print("wrote", write_result("native_cpu_profile", payload))
    return 0


if __name__ == "__main__":
    from alignserve.engine import compute_thread

    # as the server runs it: every tensor op on one thread (engine/compute_thread.py)
    sys.exit(compute_thread.call(main))
