"""The native engine on CPU with the request shape of issue 14, variants side by side in one run.

One 1,447-token prompt, 64 new tokens (ignore_eos, temperature 1): prefill alone, `sample` with
n = 1, 8, 16 and `best_of_n` with 8 and 16 candidates, each through the strategy code the server
uses (no HTTP). Per case: median seconds; for `sample`, seconds per decode step ((total -
prefill) / new tokens). Variants switch the engine's CPU settings at run time on one loaded
engine and alternate within every repeat, so drift on this shared machine hits each alike:

  fp32      exact fp32 everywhere (what the `exact_engine` test fixture uses)
  few_row   bf16 weight copies for steps of at most 4 rows (the default before issue 14)
  bf16      bf16 weight copies for every row count where the CPU has bf16 units (the default)

Writes bench/results/native_cpu-<stamp>.json with the CPU's model and flags, torch's thread
count, commit and date. vLLM's numbers come from bench/vllm_cpu.py; the issue's are quoted
beside ours for reference only (another run, another load on this machine).

    .venv/bin/python bench/native_cpu.py [--repeats 3] [--variants fp32,few_row,bf16]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

from alignserve.decoding import STRATEGIES, DecodeContext, DecodeRequest
from alignserve.engine.native import cpu_linear
from alignserve.engine.native.engine import NativeEngine
from alignserve.engine.protocol import SamplingParams
from alignserve.rewardmodels.compose import RewardRegistry

PROMPT_TOKENS = 1447
TEXT = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps and "
        "listening to the sea. ")
CASES = (("prefill", 1), ("sample", 1), ("sample", 8), ("sample", 16), ("best_of_n", 8),
         ("best_of_n", 16))
VARIANTS = {"fp32": 0, "few_row": cpu_linear.FEW_ROWS, "bf16": None}  # None: the CPU's default
# Issue 14's vLLM 0.32 CPU numbers (own server, HTTP, median of 3; another run).
VLLM_ISSUE = {"sample/1": 3.26, "sample/8": 4.51, "sample/16": 5.85}


def cpu_info() -> dict:
    flags, model = [], platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return {"model": model, "flags": [f for f in wanted if f in flags],
            "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "bf16_units": cpu_linear.cpu_has_bf16_units()}


async def run_case(engine: NativeEngine, strategy: str, n: int, prompt: list[int],
                   new_tokens: int) -> float:
    if strategy == "prefill":
        start = time.perf_counter()
        seq = await engine.prefill(prompt)
        seconds = time.perf_counter() - start
        await engine.release([seq])
        return seconds
    reward = RewardRegistry.default().build([{"name": "keywords", "keywords": ["sea", "light"]}])
    is_bon = strategy == "best_of_n"
    params = STRATEGIES[strategy].params.model_validate({"candidates": n} if is_bon else {})
    req = DecodeRequest(
        request_id="bench", prompt_ids=prompt, prompt_text="", n=1 if is_bon else n,
        strategy=strategy, params=params, reward=reward,
        sampling=SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0),
    )
    ctx = DecodeContext(engine=engine, request=req)
    start = time.perf_counter()
    async for _ in STRATEGIES[strategy].run(ctx):
        pass
    return time.perf_counter() - start


async def measure(args) -> dict:
    engine = NativeEngine.load(device="cpu")
    await engine.start()
    times: dict[str, dict[str, list[float]]] = {}
    try:
        prompt = (engine.encode(TEXT * (PROMPT_TOKENS // 10 + 2)))[:PROMPT_TOKENS]
        for variant in args.variants:  # warm-up: first calls of each path, allocations
            cpu_linear.set_few_rows(engine.model, VARIANTS[variant])
            await run_case(engine, "sample", 2, prompt[:600], 4)
        for rep in range(args.repeats):
            for strategy, n in CASES:
                for variant in args.variants:
                    cpu_linear.set_few_rows(engine.model, VARIANTS[variant])
                    seconds = await run_case(engine, strategy, n, prompt, args.new_tokens)
                    times.setdefault(f"{strategy}/{n}", {}).setdefault(variant, []).append(seconds)
                    print(f"rep {rep} {strategy}/{n} {variant}: {seconds:.2f} s", flush=True)
    finally:
        await engine.close()
    table = {}
    for case, by_variant in times.items():
        med = {v: statistics.median(t) for v, t in by_variant.items()}
        row = {"median_s": {v: round(s, 3) for v, s in med.items()},
               "all_s": {v: [round(s, 3) for s in t] for v, t in by_variant.items()},
               "spread": {v: round((max(t) - min(t)) / statistics.median(t), 2)
                          for v, t in by_variant.items()}}
        if case.startswith("sample/"):
            pre = {v: statistics.median(times["prefill/1"][v]) for v in med}
            row["decode_ms_per_step"] = {v: round(1000 * (med[v] - pre[v]) / args.new_tokens, 1)
                                         for v in med}
        if case in VLLM_ISSUE:
            row["vllm_issue_s"] = VLLM_ISSUE[case]
        table[case] = row
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default="few_row,bf16",
                    type=lambda s: [v for v in s.split(",") if v])
    args = ap.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    table = asyncio.run(measure(args))
    print(f"{'case':<14}" + "".join(f"{v:>12}" for v in args.variants))
    for case, row in table.items():
        print(f"{case:<14}" + "".join(f"{row['median_s'][v]:>11.2f}s" for v in args.variants))
    payload = {**provenance(), "cpu": cpu_info(), "torch": torch.__version__, "args": vars(args),
               "prompt_tokens": PROMPT_TOKENS,
               "what": "native engine, issue 14's request shape, CPU variants side by side",
               "results": table}
    print("wrote", write_result("native_cpu", payload))
    return 0


if __name__ == "__main__":
    from alignserve.engine import compute_thread

    # as the server runs it: every tensor op on one thread (engine/compute_thread.py)
    sys.exit(compute_thread.call(main))
