"""Does the model's hidden state say which partial keyword answers will finish with more
keywords? A linear probe, replayed as speculative rejection's tie-break.

Keyword coverage so far is the only partial signal speculative_rejection has on the keyword
task, and early on most particles tie on it (bench/prune_sim.py: hand-made signals order tied
pairs no better than chance). This samples `--candidates` answers per keyword item (items the
evaluation does not report on), keeping each step's final normalized hidden state (what the
engine's observers get as StepInputs.hidden), then:

1. fits a linear probe from [hidden state after t tokens, coverage at t] to the final coverage
   on half of the items (ridge regression) and scores the other half with it, and the other
   way round (cross-fitted: no item is scored by a probe that saw it);
2. reports, per t, the share of pairs tied on coverage at t (but not on final coverage) that
   the probe orders correctly (0.5: no information);
3. replays speculative rejection on random draws of 16 per item: coverage alone against
   coverage with the probe as tie-break, tokens counted as twin rows cost.

    .venv/bin/python bench/value_probe.py [--items 12:56] [--candidates 48] [--draws 8]

Writes bench/results/value-probe-STAMP.json (device, commit, date). The pool (hidden states
in fp16, about 60 MB for 44 items) stays in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

PAIR_STEPS = (3, 6, 9, 12)
FIT_STEPS = 24  # the probe learns from the first steps of each answer, where pruning happens


async def sample(args) -> list[dict]:
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.engine.protocol import SamplingParams
    from alignserve.evaluation.tasks import load_task

    engine = NativeEngine.load()
    await engine.start()
    lo, hi = (int(x) for x in args.items.split(":"))
    out = []
    for item in load_task("keywords").items[lo:hi]:
        _, ids = engine.encode_chat([{"role": "user", "content": item.prompt}])
        root = await engine.prefill(ids)
        seqs = await engine.fork(root, args.candidates)
        await engine.release([root])
        hidden: dict = {s.key: [] for s in seqs}

        def observer(handles, logits, inputs, hidden=hidden):
            for h, row in zip(handles, inputs.hidden.half().cpu()):
                hidden[h.key].append(row)

        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                seed=item.seed, detokenize=False)
        async for _ in engine.generate(seqs, params, observer=observer):
            pass
        for s in seqs:
            toks = s.output_ids
            out.append({"item": item.id, "keywords": item.rewards[0]["keywords"],
                        "prompt_tokens": len(ids), "tokens": toks,
                        "prefixes": [engine.tokenizer.decode(toks[:t], skip_special_tokens=True)
                                     for t in range(len(toks) + 1)],
                        "hidden": torch.stack(hidden[s.key])})
        await engine.release(seqs)
        print(f"{item.id}: {args.candidates} answers", flush=True)
    await engine.close()
    return out


class Coverage:
    """Keyword coverage of an answer's prefixes (what ranks) and of the whole (the reward)."""

    def __init__(self, keywords: list[str]) -> None:
        from alignserve.rewardmodels.lexical import KeywordsReward

        self.reward = KeywordsReward(keywords)

    def at(self, sample: dict, t: int) -> float:
        return self.reward.score([sample["prefixes"][min(t, len(sample["prefixes"]) - 1)]])[0]

    def sure(self, sample: dict, t: int) -> bool:
        return self.reward.floor_partial([sample["prefixes"][t]])[0] >= 1.0

    def final(self, sample: dict) -> float:
        return self.reward.score([sample["prefixes"][-1]])[0]


def features(sample: dict, cov: Coverage, t: int) -> torch.Tensor:
    return torch.cat([sample["hidden"][t].float(), torch.tensor([cov.at(sample, t)])])


def fit_probe(samples: list[dict], covs: dict, ridge: float):
    """Ridge regression [hidden, coverage] -> final coverage, on standardized features."""
    rows, targets = [], []
    for s in samples:
        cov = covs[s["item"]]
        for t in range(1, min(len(s["tokens"]), FIT_STEPS)):
            rows.append(features(s, cov, t))
            targets.append(cov.final(s))
    x = torch.stack(rows).double()
    y = torch.tensor(targets, dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    eye[-1, -1] = 0  # no penalty on the intercept
    w = torch.linalg.solve(z.T @ z + ridge * len(x) * eye, z.T @ y)

    def probe(sample: dict, t: int) -> float:
        f = (features(sample, covs[sample["item"]], t).double() - mu) / sd
        return float(f @ w[:-1] + w[-1])
    return probe


def tied_pair_accuracy(samples: list[dict], covs: dict, probe_of: dict, t: int) -> tuple[float, int]:
    """Share of pairs (same item, same coverage at t, different final coverage) the probe
    orders like their final coverage."""
    by: dict = {}
    for s in samples:
        if len(s["tokens"]) > t:
            by.setdefault((s["item"], covs[s["item"]].at(s, t)), []).append(s)
    right = total = 0.0
    for group in by.values():
        for a, b in itertools.combinations(group, 2):
            fa, fb = covs[a["item"]].final(a), covs[b["item"]].final(b)
            if fa == fb:
                continue
            pa, pb = probe_of[a["item"]](a, t), probe_of[b["item"]](b, t)
            total += 1
            right += 0.5 if pa == pb else float((pa > pb) == (fa > fb))
    return (right / total if total else float("nan")), int(total)


def replay(samples: list[dict], cov: Coverage, probe, segment: int, keep: float,
           tie: str) -> tuple[float, int]:
    """speculative_rejection on `samples` (segments.py's rounds, settling on the keywords'
    floor), tokens as twin rows cost them: (final coverage of the pick, model tokens)."""
    going, finished, t = list(samples), [], 0
    tokens = samples[0]["prompt_tokens"]
    while going:
        stop = t + segment if len(going) > 1 or finished else 10 ** 9
        last = min(stop, max(len(s["tokens"]) for s in going))
        for pos in range(t + 1, last + 1):
            tokens += len({tuple(s["tokens"][:pos]) for s in going if len(s["tokens"]) >= pos})
        finished += [s for s in going if len(s["tokens"]) <= stop]
        going, t = [s for s in going if len(s["tokens"]) > stop], stop
        if any(cov.final(s) >= 1.0 for s in finished):
            break
        sure = [s for s in going if cov.sure(s, t)]
        if sure:
            going = sure[:1]
            continue
        if len(going) > 1:
            def key(s, t=t):
                return (cov.at(s, t), probe(s, t) if tie == "probe" else 0.0)
            going = sorted(going, key=key, reverse=True)[: max(1, math.ceil(len(going) * keep))]
    return max(cov.final(s) for s in finished), tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="12:56", help="keyword items lo:hi (not the report's)")
    p.add_argument("--candidates", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--draws", type=int, default=8, help="random 16s per item in the replay")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--rules", default="3:0.7;3:0.6;2:0.75", help="segment:keep;...")
    args = p.parse_args()
    samples = asyncio.run(sample(args))
    by_item: dict = {}
    for s in samples:
        by_item.setdefault(s["item"], []).append(s)
    items = sorted(by_item)
    covs = {it: Coverage(by_item[it][0]["keywords"]) for it in items}
    halves = [items[::2], items[1::2]]
    probe_of = {}
    for k in (0, 1):
        probe = fit_probe([s for it in halves[1 - k] for s in by_item[it]], covs, args.ridge)
        for it in halves[k]:
            probe_of[it] = probe
    pairs = {}
    for t in PAIR_STEPS:
        acc, n = tied_pair_accuracy(samples, covs, probe_of, t)
        pairs[t] = {"accuracy": acc, "pairs": n}
        print(f"t={t:2d}: the probe orders {acc:.3f} of {n} coverage-tied pairs", flush=True)
    rng = random.Random(0)
    draws = {it: [rng.sample(by_item[it], 16) for _ in range(args.draws)] for it in items}
    rows = []

    def run(label, segment, keep, tie):
        res = [replay(d, covs[it], probe_of[it], segment, keep, tie)
               for it in items for d in draws[it]]
        row = {"rule": label, "reward": sum(r for r, _ in res) / len(res),
               "model_tokens": sum(t for _, t in res) / len(res)}
        rows.append(row)
        return row

    base = run("best_of_16", 10 ** 6, 1.0, "none")
    print(f"best_of_16: coverage {base['reward']:.3f} at {base['model_tokens']:.1f} tokens")
    for spec in args.rules.split(";"):
        segment, keep = spec.split(":")
        for tie in ("none", "probe"):
            row = run(f"segment={segment},keep={keep},tie={tie}", int(segment), float(keep), tie)
            row["gap"] = base["reward"] - row["reward"]
            row["token_share"] = row["model_tokens"] / base["model_tokens"]
            print(f"{row['rule']:32s} coverage {row['reward']:.3f} (gap {row['gap']:+.3f}) "
                  f"at {row['token_share']:.3f}x best_of_16's tokens", flush=True)
    out = write_result("value-probe", {**provenance(), "settings": vars(args),
                                       "tied_pairs": pairs, "replay": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
