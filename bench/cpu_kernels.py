"""The C++ CPU kernels against the torch ops they replace, side by side in one process.

On the embedded model's shapes (9 query heads, 3 KV heads of 64, a bf16 pool), issue 14's
1,447-token prompt:
- `decode_1`: one layer's attention of a lone sequence (the prompt, then 64 answer tokens
  after a page gap): `DecodePlan.attend`, the kernel against torch's masked window op;
- `decode_16`: 16 samples of the prompt, 64 tokens each: the kernel against the grouped path
  (the shared prompt once for all rows, each leaf, the merge);
- `prefill`: the prompt's causal attention over itself (`ExtendPlan.attend`): the kernel
  against torch's SDPA in bf16 (what the engine passes on a CPU with bf16 units);
- `sample_16`: `dispatch.sample` of 16 rows of 49,152 logits, temperature 1, no filter: the
  kernel against the reference (a seeded generator per row, softmax, argmax).
The two sides take turns round by round (ALIGNSERVE_CPU_ATTENTION / ALIGNSERVE_CPU_SAMPLING
off and on), so a busy machine weighs on both alike; each case's ratio is kernel / torch of
the medians. Writes bench/results/cpu_kernels-*.json (device, commit, date).

    .venv/bin/python bench/cpu_kernels.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result
from native_cpu import cpu_info

from alignserve.engine.native.attention import DecodePlan, ExtendPlan
from alignserve.engine.native.kv_cache import KVCache
from alignserve.kernels import attention_cpu, dispatch, sampling_cpu

HEADS, KV_HEADS, DIM, PROMPT, ANSWER, VOCAB = 9, 3, 64, 1447, 64, 49152
SWITCH = {"attention": "ALIGNSERVE_CPU_ATTENTION", "sampling": "ALIGNSERVE_CPU_SAMPLING"}


def decode_case(rows: int, gen: torch.Generator):
    """A function that runs one layer's attention of a decode step with `rows` samples."""
    cache = KVCache(1, 16384, KV_HEADS, DIM, torch.bfloat16, torch.device("cpu"))
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    root = cache.new_chain(0)
    cache.append_slots(root, PROMPT)
    chains = cache.fork(root, 0, list(range(1, rows + 1)))
    for chain in chains:
        cache.append_slots(chain, ANSWER - 1)
    new = [cache.append_slots(c, 1)[0] for c in chains]
    q = torch.randn(rows, HEADS, DIM, generator=gen)
    kv = torch.randn(rows, KV_HEADS, DIM, generator=gen)

    def run():
        plan = DecodePlan(cache, chains, new, DIM**-0.5)
        plan.attend(0, q, kv, kv)  # the step's one-time work, as the engine's first layer
        start = time.perf_counter()
        plan.attend(0, q, kv, kv)
        return time.perf_counter() - start

    return run


def prefill_case(gen: torch.Generator):
    cache = KVCache(1, 4096, KV_HEADS, DIM, torch.bfloat16, torch.device("cpu"))
    chain = cache.new_chain(0)
    slots = cache.append_slots(chain, PROMPT)
    q = torch.randn(PROMPT, HEADS, DIM, generator=gen)
    kv = torch.randn(PROMPT, KV_HEADS, DIM, generator=gen)

    def run():
        plan = ExtendPlan(cache, [[]], [PROMPT], slots, DIM**-0.5, dtype=torch.bfloat16)
        start = time.perf_counter()
        plan.attend(0, q, kv, kv)
        return time.perf_counter() - start

    return run


def sample_case(gen: torch.Generator):
    logits = torch.randn(16, VOCAB, generator=gen) * 3
    args = (torch.ones(16), torch.zeros(16, dtype=torch.int64), torch.ones(16), torch.zeros(16),
            list(range(16)))

    def run():
        scratch = logits.clone()
        start = time.perf_counter()
        dispatch.sample(scratch, *args)
        return time.perf_counter() - start

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    if not (attention_cpu.library() and sampling_cpu.library()):
        print("the C++ kernels could not be built here (see the log): nothing to compare")
        return 1
    gen = torch.Generator().manual_seed(0)
    cases = {"decode_1": ("attention", decode_case(1, gen)),
             "decode_16": ("attention", decode_case(16, gen)),
             "prefill": ("attention", prefill_case(gen)),
             "sample_16": ("sampling", sample_case(gen))}
    times: dict[str, dict[str, list[float]]] = {c: {"torch": [], "kernel": []} for c in cases}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (kind, run) in cases.items():
                for side, value in (("torch", "off"), ("kernel", "on")):
                    os.environ[SWITCH[kind]] = value
                    reps = 3 if name == "prefill" else 20
                    run()  # warm
                    times[name][side].append(min(run() for _ in range(reps)) * 1e3)
    for kind in SWITCH.values():
        os.environ.pop(kind, None)
    results = {}
    for name, sides in times.items():
        med = {side: statistics.median(v) for side, v in sides.items()}
        results[name] = {"torch_ms": round(med["torch"], 4), "kernel_ms": round(med["kernel"], 4),
                         "kernel_over_torch": round(med["kernel"] / med["torch"], 3),
                         "spread_ms": {s: [round(min(v), 4), round(max(v), 4)]
                                       for s, v in sides.items()}}
        print(name, results[name], flush=True)
    payload = {**provenance(), "cpu": cpu_info(), "torch": torch.__version__, "args": vars(args),
               "what": "C++ CPU kernels against the torch ops they replace: one layer's "
                       "attention (decode 1 and 16 rows, 1,447-token prefill), sampling 16 x "
                       "49,152; per round the best of several calls, medians over rounds",
               "results": results}
    print("wrote", write_result("cpu_kernels", payload))
    return 0


if __name__ == "__main__":
    from alignserve.engine import compute_thread

    sys.exit(compute_thread.call(main))  # as the server runs its tensor ops: one thread
