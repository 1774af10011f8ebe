"""How much could any value model help speculative rejection on keywords? A Monte-Carlo bound.

bench/value_probe.py ranks partial answers by a probe of the hidden state; this ranks them by
an estimate of what the probe tries to learn: each partial answer's expected final keyword
coverage, the mean over `--rollouts` continuations sampled from it by the served model (same
temperature and max_tokens; the rollouts are not counted as the search's tokens: a value model
would not spend them). A ranking that knew it exactly is the best any value of the prefix can
do; the Monte-Carlo estimate is a noisy version of it, so it bounds from below what such a
value could reach. The final coverage of each particle (an oracle that sees the future) is
replayed too.

Same pool, draws and replay as value_probe.py (items the evaluation does not report on):

    .venv/bin/python bench/value_mc.py [--items 12:56] [--draws 2] [--rollouts 8]
        [--rules "3:0.7;3:0.6;3:0.5"]

Writes bench/results/value-mc-STAMP.json (device, commit, date). About 20 minutes on 2 CPU
cores with the defaults (most of it in the rollouts).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result
from value_probe import Coverage, by_coverage, replay_rules, sample


class RolloutValue:
    """Mean final coverage of `k` sampled continuations of a partial answer, memoized by
    (item, prefix); evaluated on the engine's event loop, which runs in its own thread so the
    replay (plain code) can wait on it."""

    def __init__(self, engine, loop, prompts: dict, k: int, max_tokens: int,
                 temperature: float) -> None:
        self.engine, self.loop, self.prompts, self.k = engine, loop, prompts, k
        self.max_tokens, self.temperature = max_tokens, temperature
        self.memo: dict = {}
        self.rollout_tokens = 0

    async def _one(self, sample: dict, cov: Coverage, t: int) -> float:
        from alignserve.engine.protocol import SamplingParams

        prefix = sample["tokens"][:t]
        root = await self.engine.prefill(list(self.prompts[sample["item"]]) + prefix)
        seqs = await self.engine.fork(root, self.k)
        await self.engine.release([root])
        seed = hash((sample["item"], tuple(prefix))) % (2 ** 31)
        sp = SamplingParams(max_tokens=self.max_tokens - t, temperature=self.temperature,
                            seed=seed, detokenize=False)
        async for _ in self.engine.generate(seqs, sp):
            pass
        texts = [self.engine.tokenizer.decode(prefix + s.output_ids, skip_special_tokens=True)
                 for s in seqs]
        self.rollout_tokens += sum(len(s.output_ids) for s in seqs)
        await self.engine.release(seqs)
        return sum(cov.reward.score(texts)) / len(texts)

    async def _many(self, going: list[dict], cov: Coverage, t: int) -> list[float]:
        todo = {}
        for s in going:
            key = (s["item"], tuple(s["tokens"][:t]))
            if key not in self.memo and key not in todo:
                todo[key] = s
        values = await asyncio.gather(*(self._one(s, cov, t) for s in todo.values()))
        self.memo.update(zip(todo, values))
        return [self.memo[(s["item"], tuple(s["tokens"][:t]))] for s in going]

    def rank(self, cov: Coverage):
        def keys(going: list[dict], t: int) -> list[tuple[float]]:
            done = asyncio.run_coroutine_threadsafe(self._many(going, cov, t), self.loop)
            return [(v,) for v in done.result()]
        return keys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="12:56", help="keyword items lo:hi (not the report's)")
    p.add_argument("--candidates", type=int, default=48, help="pool samples per item")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--draws", type=int, default=2, help="random 16s per item")
    p.add_argument("--rollouts", type=int, default=8, help="continuations per value estimate")
    p.add_argument("--rules", default="3:0.7;3:0.6;3:0.5", help="segment:keep;...")
    args = p.parse_args()

    from alignserve.engine.native.engine import NativeEngine
    from alignserve.evaluation.tasks import load_task

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    engine = NativeEngine.load()
    on_loop(engine.start())
    samples = on_loop(sample(args, engine))
    by_item: dict = {}
    for s in samples:
        by_item.setdefault(s["item"], []).append(s)
    items = sorted(by_item)
    covs = {it: Coverage(by_item[it][0]["keywords"]) for it in items}
    prompts = {it.id: engine.encode_chat([{"role": "user", "content": it.prompt}])[1]
               for it in load_task("keywords").items if it.id in by_item}
    value = RolloutValue(engine, loop, prompts, args.rollouts, args.max_tokens, args.temperature)
    rng = random.Random(0)
    draws = {it: [rng.sample(by_item[it], 16) for _ in range(args.draws)] for it in items}

    def rank_of(it: str) -> dict:
        cov = covs[it]
        return {"coverage": by_coverage(cov),
                "rollouts": value.rank(cov),
                "oracle": lambda going, t: [(cov.final(s),) for s in going]}

    rows = replay_rules(items, draws, covs, rank_of, args.rules,
                        ("coverage", "rollouts", "oracle"))
    on_loop(engine.close())
    out = write_result("value-mc", {**provenance(), "settings": vars(args), "replay": rows,
                                    "rollout_tokens": value.rollout_tokens})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
