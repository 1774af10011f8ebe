"""Twin rows (engine/native/twins.py) off and on, side by side in one run on the embedded model.

Each keyword prompt of the evaluation (its chat prompt and reward) is answered by every
strategy configuration with the engine's twin rows off, then on, with the same seed, through
the strategy code the server runs. Per configuration: the mean model tokens and seconds per
request both ways, their ratios, and how many answers came out the same (they may differ
where a smaller batch rounds a logit differently: bf16 linears). Writes
bench/results/twins_cpu-*.json.

    .venv/bin/python bench/twins_cpu.py [--items 0:12] [--max-tokens 40]
        [--configs best_of_16,sr_16,pf_16]
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
from alignserve.decoding.base import ChoiceFinal
from alignserve.engine.native.engine import NativeEngine
from alignserve.engine.protocol import SamplingParams
from alignserve.evaluation.strategies import CONFIGS
from alignserve.evaluation.tasks import load_task
from alignserve.rewardmodels.compose import RewardRegistry


async def answer(engine, config, item, max_tokens: int) -> dict:
    text, ids = engine.encode_chat([{"role": "user", "content": item.prompt}])
    strategy = STRATEGIES[config.strategy]
    req = DecodeRequest(
        request_id="bench", prompt_ids=ids, prompt_text=text, n=1, strategy=config.strategy,
        params=strategy.params.model_validate(
            {k: v for k, v in config.alignment.items() if k != "strategy"}),
        sampling=SamplingParams(temperature=0.7, max_tokens=max_tokens, seed=item.seed),
        reward=RewardRegistry.default().build(item.rewards))
    ctx = DecodeContext(engine=engine, request=req)
    start = time.perf_counter()
    out = ""
    async for event in strategy.run(ctx):
        if isinstance(event, ChoiceFinal) and event.index == 0:
            out = event.text
    return {"seconds": time.perf_counter() - start, "tokens": ctx.tally.total, "text": out}


async def main(args) -> None:
    engine = NativeEngine.load(device="cpu")
    await engine.start()
    lo, hi = (int(x) for x in args.items.split(":"))
    items = load_task("keywords").items[lo:hi]
    configs = [CONFIGS[name] for name in args.configs.split(",")]
    await answer(engine, configs[0], items[0], 4)  # warm-up
    runs: dict[str, dict[str, list[dict]]] = {}
    for item in items:
        for config in configs:
            for mode in ("off", "on"):  # interleaved so drift hits both alike
                engine.twin_rows = mode == "on"
                got = await answer(engine, config, item, args.max_tokens)
                runs.setdefault(config.label, {}).setdefault(mode, []).append(got)
        print(f"{item.id} done", flush=True)
    await engine.close()
    summary = {}
    for name, by_mode in runs.items():
        tok = {m: statistics.mean(r["tokens"] for r in v) for m, v in by_mode.items()}
        sec = {m: statistics.mean(r["seconds"] for r in v) for m, v in by_mode.items()}
        same = sum(a["text"] == b["text"] for a, b in zip(by_mode["off"], by_mode["on"]))
        summary[name] = {"model_tokens": tok, "seconds": sec,
                         "tokens_on_vs_off": tok["on"] / tok["off"],
                         "seconds_on_vs_off": sec["on"] / sec["off"],
                         "same_answer": f"{same}/{len(by_mode['on'])}"}
        print(f"{name:>12}: model tokens {tok['off']:.1f} -> {tok['on']:.1f} "
              f"({tok['on'] / tok['off']:.2f}x), seconds {sec['off']:.2f} -> {sec['on']:.2f} "
              f"({sec['on'] / sec['off']:.2f}x), same answer {same}/{len(by_mode['on'])}")
    if "best_of_16" in summary:
        bon = summary["best_of_16"]["model_tokens"]
        for name, row in summary.items():
            row["tokens_vs_best_of_16"] = {m: row["model_tokens"][m] / bon[m] for m in bon}
            print(f"{name:>12}: model tokens vs best_of_16, off {row['tokens_vs_best_of_16']['off']:.3f}"
                  f", on {row['tokens_vs_best_of_16']['on']:.3f}")
    result = {**provenance(), "settings": vars(args), "summary": summary, "runs": runs}
    print("wrote", write_result("twins_cpu", result))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="0:12", help="keyword items lo:hi")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--configs", default="best_of_16,sr_16,pf_16")
    asyncio.run(main(p.parse_args()))
