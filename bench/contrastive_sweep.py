"""Choose contrastive's defaults by measurement: 4-gram repetition of greedy continuations
against greedy decoding, with the expert's perplexity of each text beside it (a low
repetition at a perplexity far above greedy's would be gibberish), in process on the native
engine, on the continuation items the evaluation's report does not use (the last --items; the
report uses the first --limit).

    .venv/bin/python bench/contrastive_sweep.py [--items 8] [--max-tokens 64]
        [--configs "beta=0.5;beta=1.0;amateur=self:4,beta=1.0"]

Writes bench/results/contrastive-sweep-STAMP.json (device, commit, date).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

DEFAULT_CONFIGS = "greedy;;beta=1.0;beta=2.0;alpha=0.05,beta=1.0;amateur=self:4,beta=1.0"


def parse(spec: str) -> list[tuple[str, dict | None]]:
    out = []
    for part in spec.split(";"):
        part = part.strip()
        if part == "greedy":
            out.append((part, None))
            continue
        keys: dict = {}
        for kv in filter(None, part.split(",")):
            k, _, v = kv.partition("=")
            keys[k] = float(v) if k in ("alpha", "beta", "repetition_penalty") else v
        out.append((part or "defaults", keys))
    return out


async def one(engine, keys, item, max_tokens):
    from alignserve.decoding.base import STRATEGIES, ChoiceFinal, DecodeContext, DecodeRequest
    from alignserve.engine.protocol import SamplingParams
    from alignserve.evaluation import metrics as m
    from alignserve.rewardmodels.compose import RewardRegistry

    strategy = "sample" if keys is None else "contrastive"
    spec = STRATEGIES[strategy]
    ids = engine.encode(item.prompt)
    req = DecodeRequest("sweep", ids, item.prompt, SamplingParams(max_tokens=max_tokens,
                        temperature=0.0), 1, strategy, spec.params.model_validate(keys or {}),
                        RewardRegistry.default().build(None))
    ctx = DecodeContext(engine=engine, request=req)
    final = None
    async with contextlib.aclosing(spec.run(ctx)) as agen:
        async for ev in agen:
            if isinstance(ev, ChoiceFinal):
                final = ev
    n = max(1, len(final.token_ids))
    return {"item": item.id, "rep4": m.repetition(final.text, 4),
            "expert_ppl": math.exp(-final.cumulative_logprob / n), "text": final.text}


async def sweep(args) -> list[dict]:
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.evaluation.metrics import mean
    from alignserve.evaluation.tasks import load_task

    engine = NativeEngine.load()
    await engine.start()
    items = load_task("continuation").items[-args.items:]
    rows = []
    for label, keys in parse(args.configs):
        res = await asyncio.gather(*(one(engine, keys, it, args.max_tokens) for it in items))
        row = {"config": label, "keys": keys, "items": [r["item"] for r in res],
               "rep4": mean(r["rep4"] for r in res),
               "expert_ppl": mean(r["expert_ppl"] for r in res), "requests": res}
        rows.append(row)
        g = rows[0]["rep4"] if rows[0]["config"] == "greedy" else None
        share = f"({row['rep4'] / g:.2f}x greedy)" if g else ""
        print(f"{label:28s} rep4 {row['rep4']:.3f} {share:18s} expert ppl "
              f"{row['expert_ppl']:.2f}", flush=True)
    await engine.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=12,
                   help="continuation items, from the end (the report uses the first 12 of 24)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="';'-separated: greedy, or contrastive keys k=v,... (empty: defaults)")
    args = p.parse_args()
    rows = asyncio.run(sweep(args))
    out = write_result("contrastive-sweep", {**provenance(), "settings": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
