"""best_of_n vs one sample on the embedded model on CPU, side by side in one run.

64 new tokens (ignore_eos) on the same 200-token prompt for `sample` (n=1) and `best_of_n`
with 8 and 16 candidates, each run through the strategy code the server uses. Also the KV
bytes held by best-of-16 on a 2048-token prompt against one sequence. Prints the ratios and
writes bench/results/bon_cpu-*.json.

    .venv/bin/python bench/bon_cpu.py [--repeats 2] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

from alignserve.decoding import STRATEGIES, DecodeContext, DecodeRequest
from alignserve.engine.native.engine import NativeEngine
from alignserve.engine.protocol import SamplingParams
from alignserve.rewardmodels.compose import RewardRegistry

TEXT = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps and "
        "listening to the sea. ")


def prompt_of(engine: NativeEngine, tokens: int) -> list[int]:
    ids = engine.encode(TEXT * (tokens // 10 + 2))
    return ids[:tokens]


async def run_strategy(engine, strategy: str, prompt: list[int], new_tokens: int, candidates: int):
    reward = RewardRegistry.default().build([{"name": "keywords", "keywords": ["sea", "light"]}])
    params = STRATEGIES[strategy].params.model_validate({"candidates": candidates} if strategy == "best_of_n" else {})
    req = DecodeRequest(
        request_id="bench", prompt_ids=prompt, prompt_text="", n=1, strategy=strategy, params=params,
        sampling=SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0),
        reward=reward,
    )
    ctx = DecodeContext(engine=engine, request=req)
    start = time.perf_counter()
    async for _ in STRATEGIES[strategy].run(ctx):
        pass
    return time.perf_counter() - start, ctx.tally.total


async def kv_bytes(engine: NativeEngine, prompt: list[int], branches: int, new_tokens: int) -> int:
    before = engine.stats().kv_used_slots
    root = await engine.prefill(prompt)
    seqs = await engine.fork(root, branches) if branches > 1 else [root]
    if branches > 1:
        await engine.release([root])
    async for _ in engine.generate(seqs, SamplingParams(max_tokens=new_tokens, ignore_eos=True, seed=1)):
        pass
    used = engine.stats().kv_used_slots - before
    await engine.release(seqs)
    cfg = engine.cfg
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.kv.k.element_size()
    return used * per_slot


async def main(args) -> None:
    engine = NativeEngine.load(device=args.device)
    await engine.start()
    prompt = prompt_of(engine, 200)
    await run_strategy(engine, "sample", prompt, 8, 1)  # warm-up
    cases = [("sample", 1), ("best_of_n", 8), ("best_of_n", 16)]
    times: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for strategy, k in cases:  # interleaved so drift hits every case alike
            label = strategy if k == 1 else f"best_of_{k}"
            t, n = await run_strategy(engine, strategy, prompt, args.new_tokens, k)
            times.setdefault(label, []).append(t)
            tokens[label] = n
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: median[k] / median["sample"] for k in median}
    long_prompt = prompt_of(engine, 2048)
    one = await kv_bytes(engine, long_prompt, 1, args.new_tokens)
    sixteen = await kv_bytes(engine, long_prompt, 16, args.new_tokens)
    await engine.close()
    result = {
        **provenance(), "new_tokens": args.new_tokens, "prompt_tokens": len(prompt),
        "seconds_median": median, "seconds_all": times, "model_tokens": tokens,
        "ratio_vs_sample": ratios,
        "kv_bytes": {"one_sequence_2048": one, "best_of_16_2048": sixteen, "ratio": sixteen / one},
        "goals": {"best_of_8": "<= 2x sample", "best_of_16": "<= 3x sample", "kv_ratio": "< 2"},
    }
    for k, seconds in median.items():
        print(f"{k:>12}: {seconds:.2f} s  ({ratios[k]:.2f}x sample, {tokens[k]} model tokens)")
    print(f"KV for best-of-16 on 2048 tokens: {sixteen / 2**20:.1f} MiB vs one sequence "
          f"{one / 2**20:.1f} MiB ({sixteen / one:.2f}x)")
    print("wrote", write_result("bon_cpu", result))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    asyncio.run(main(p.parse_args()))
