"""Choose the segment searches' defaults by measurement: speculative_rejection and
particle_filter settings against best_of_16 on the evaluation's keyword and sentiment items,
in process on the native engine (no HTTP), on a slice of items the evaluation's report does
not use (the evaluation reports on each task's first --limit items; this takes items from
the end), so the defaults are not tuned on the items they are judged on.

    .venv/bin/python bench/segment_sweep.py [--keywords 12] [--sentiment 6] [--skip 0]
        [--seed-offset 0] [--max-tokens 40]
        [--configs "sr:segment=4,keep=0.5;pf:segment=4,keep=0.5"]

Writes bench/results/segment-sweep-STAMP.json (device, commit, date) and prints, per task and
configuration, the mean reward, the mean model tokens per request and their ratio to
best_of_16's. Requests of one configuration run concurrently (the engine batches them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

NAMES = {"sr": "speculative_rejection", "pf": "particle_filter", "bon": "best_of_n"}
DEFAULT_CONFIGS = ("bon:candidates=16;sr:segment=4,keep=0.5;sr:segment=4,keep=0.25;"
                   "sr:segment=3,keep=0.4;sr:segment=8,keep=0.25;pf:segment=4,keep=0.5;"
                   "pf:segment=4,keep=0.25")


def parse_configs(spec: str) -> list[tuple[str, str, dict]]:
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        short, _, rest = part.partition(":")
        keys: dict = {"candidates": 16}
        for kv in filter(None, rest.split(",")):
            k, _, v = kv.partition("=")
            if v in ("true", "false"):
                keys[k] = v == "true"
            else:
                keys[k] = v if not v.replace(".", "", 1).isdigit() else (float(v) if "." in v
                                                                         else int(v))
        out.append((part, NAMES[short], keys))
    return out


async def one(engine, strategy, keys, item, max_tokens, temperature, seed_offset=0):
    from alignserve.decoding.base import STRATEGIES, ChoiceFinal, DecodeContext, DecodeRequest
    from alignserve.engine.protocol import SamplingParams
    from alignserve.rewardmodels.compose import RewardRegistry

    text, ids = engine.encode_chat([{"role": "user", "content": item.prompt}])
    spec = STRATEGIES[strategy]
    req = DecodeRequest("sweep", ids, text, SamplingParams(max_tokens=max_tokens,
                        temperature=temperature, seed=item.seed + seed_offset), 1, strategy,
                        spec.params.model_validate(keys),
                        RewardRegistry.default().build(item.rewards))
    ctx = DecodeContext(engine=engine, request=req)
    final = None
    async with contextlib.aclosing(spec.run(ctx)) as agen:
        async for ev in agen:
            if isinstance(ev, ChoiceFinal):
                final = ev
    return {"item": item.id, "reward": final.reward, "model_tokens": ctx.tally.total,
            "text": final.text}


async def sweep(args) -> list[dict]:
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.evaluation.tasks import load_task

    engine = NativeEngine.load()
    await engine.start()
    rows = []
    for task, count in (("keywords", args.keywords), ("sentiment", args.sentiment)):
        if not count:
            continue
        every = load_task(task).items
        if count + args.skip > len(every):
            raise SystemExit(f"{task} has {len(every)} items: --{task} {count} with --skip "
                             f"{args.skip} asks for more")
        items = every[len(every) - count - args.skip: len(every) - args.skip]
        for label, strategy, keys in parse_configs(args.configs):
            res = await asyncio.gather(*(one(engine, strategy, keys, it, args.max_tokens,
                                             args.temperature, args.seed_offset)
                                         for it in items))
            row = {"task": task, "config": label, "strategy": strategy, "keys": keys,
                   "items": [r["item"] for r in res],
                   "reward": sum(r["reward"] for r in res) / len(res),
                   "model_tokens": sum(r["model_tokens"] for r in res) / len(res),
                   "requests": res}
            rows.append(row)
            base = next((r for r in rows if r["task"] == task and r["config"].startswith("bon")),
                        None)
            ratio = row["model_tokens"] / base["model_tokens"] if base else float("nan")
            print(f"{task:10s} {label:32s} reward {row['reward']:.3f}  model tokens "
                  f"{row['model_tokens']:6.1f}  ({ratio:.2f}x best_of_16)", flush=True)
    await engine.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keywords", type=int, default=12, help="keyword items, from the end")
    p.add_argument("--sentiment", type=int, default=6, help="sentiment items, from the end")
    p.add_argument("--skip", type=int, default=0,
                   help="items left out at the end (another slice of the same tuning items)")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="added to each item's seed: other samples of the same items")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="';'-separated NAME:key=value,... (NAME: bon, sr, pf); candidates=16 "
                   "unless given; put bon first: ratios are to it")
    args = p.parse_args()
    rows = asyncio.run(sweep(args))
    out = write_result("segment-sweep", {**provenance(), "settings": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
