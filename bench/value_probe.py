"""Does the model's hidden state say which partial keyword answers will finish with more
keywords? A probe, replayed as speculative rejection's ranking.

Keyword coverage so far is the only partial signal speculative_rejection has on the keyword
task, and early on most particles tie on it (bench/prune_sim.py: hand-made signals order tied
pairs no better than chance). This samples `--candidates` answers per keyword item (items the
evaluation does not report on), keeping each step's final normalized hidden state (what the
engine's observers get as StepInputs.hidden), then:

1. fits a probe (ridge regression, or with --mlp a one-hidden-layer network) from [hidden
   state, coverage, 1/keywords, t/40] to the final coverage on half of the items and scores the
   other half with it, and the other way round (cross-fitted: no item is scored by a probe that
   saw it);
2. reports, per t, the share of pairs tied on coverage at t (but not on final coverage) that
   the probe orders correctly (0.5: no information);
3. replays speculative rejection on random draws of 16 per item, ranking by coverage alone,
   by coverage then the probe (tie), or by the probe alone (value); tokens counted as twin
   rows cost them.

At a segment boundary t the t-th token has been sampled but not fed (segments.py), so the
hidden state the server has is the one after t-1 tokens: `--shift 1` (the default) fits and
ranks on that one; `--shift 0` on the state after t tokens, which would cost one more fed
token per pruned particle.

    .venv/bin/python bench/value_probe.py [--items 12:56] [--candidates 48] [--draws 8]
        [--shift 1] [--mlp]

Writes bench/results/value-probe-STAMP.json (device, commit, date). The pool (hidden states
in fp16, about 60 MB for 44 items) stays in memory. bench/value_mc.py replays the same rules
with a Monte-Carlo value, the bound any such probe is measured against.
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


async def sample(args, engine=None) -> list[dict]:
    """`args.candidates` answers per item with each step's hidden state, on `engine` (None: one
    loaded here and closed at the end)."""
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.engine.protocol import SamplingParams
    from alignserve.evaluation.tasks import load_task

    own = engine is None
    if own:
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
    if own:
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


def features(sample: dict, cov: Coverage, t: int, shift: int) -> torch.Tensor:
    k = len(sample["keywords"])
    return torch.cat([sample["hidden"][max(0, t - shift)].float(),
                      torch.tensor([cov.at(sample, t), 1.0 / k, t / 40])])


def fit_probe(samples: list[dict], covs: dict, args):
    """Final coverage from standardized features: ridge regression, or (--mlp) a network with
    one hidden layer, trained with weight decay for a fixed number of epochs."""
    rows, targets = [], []
    for s in samples:
        cov = covs[s["item"]]
        for t in range(1, min(len(s["tokens"]), FIT_STEPS)):
            rows.append(features(s, cov, t, args.shift))
            targets.append(cov.final(s))
    x = torch.stack(rows).double()
    y = torch.tensor(targets, dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    if args.mlp:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(z.shape[1], 128), torch.nn.GELU(),
                                  torch.nn.Dropout(0.2), torch.nn.Linear(128, 1)).double()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
        for _ in range(10):
            for idx in torch.randperm(len(z)).split(256):
                loss = (net(z[idx]).squeeze(-1) - y[idx]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()

        def predict(f: torch.Tensor) -> float:
            with torch.no_grad():
                return float(net(f[None])[0, 0])
    else:
        z1 = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
        eye = torch.eye(z1.shape[1], dtype=torch.float64)
        eye[-1, -1] = 0  # no penalty on the intercept
        w = torch.linalg.solve(z1.T @ z1 + args.ridge * len(z1) * eye, z1.T @ y)

        def predict(f: torch.Tensor) -> float:
            return float(f @ w[:-1] + w[-1])

    memo: dict = {}

    def probe(sample: dict, t: int) -> float:
        key = (id(sample), t)
        if key not in memo:
            f = (features(sample, covs[sample["item"]], t, args.shift).double() - mu) / sd
            memo[key] = predict(f)
        return memo[key]
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


def replay(samples: list[dict], cov: Coverage, rank, segment: int,
           keep: float) -> tuple[float, int]:
    """speculative_rejection on `samples` (segments.py's rounds, settling on the keywords'
    floor), particles ranked at a pruning by `rank(going, t)` (a sortable key each; the sort is
    stable, so ties keep the draw's random order), tokens as twin rows cost them: (final
    coverage of the pick, model tokens)."""
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
            keys = rank(going, t)
            order = sorted(range(len(going)), key=keys.__getitem__, reverse=True)
            going = [going[i] for i in order[: max(1, math.ceil(len(going) * keep))]]
    return max(cov.final(s) for s in finished), tokens


def by_coverage(cov: Coverage):
    """The server's ranking: coverage so far (ties keep the draw's order)."""
    return lambda going, t: [(cov.at(s, t),) for s in going]


def rankings(cov: Coverage, probe) -> dict:
    """The ranking keys a replay compares: coverage alone, coverage then the probe, the probe."""
    return {"coverage": by_coverage(cov),
            "tie": lambda going, t: [(cov.at(s, t), probe(s, t)) for s in going],
            "value": lambda going, t: [(probe(s, t),) for s in going]}


def replay_rules(items: list[str], draws: dict, covs: dict, rank_of, specs: str,
                 modes: tuple[str, ...]) -> list[dict]:
    """Every rule of `specs` ("segment:keep;...") under every ranking mode, beside best_of_16
    (the rule that never prunes); rank_of(item) -> {mode: rank function of (going, t)}."""
    def run(segment: int, keep: float, mode: str) -> tuple[float, float]:
        res = [replay(d, covs[it], rank_of(it)[mode], segment, keep)
               for it in items for d in draws[it]]
        return sum(r for r, _ in res) / len(res), sum(t for _, t in res) / len(res)

    base_reward, base_tokens = run(10 ** 6, 1.0, "coverage")
    print(f"best_of_16: coverage {base_reward:.3f} at {base_tokens:.1f} tokens", flush=True)
    rows = [{"rule": "best_of_16", "reward": base_reward, "model_tokens": base_tokens}]
    for spec in specs.split(";"):
        segment, keep = spec.split(":")
        for mode in modes:
            reward, tokens = run(int(segment), float(keep), mode)
            row = {"rule": f"segment={segment},keep={keep},rank={mode}", "reward": reward,
                   "model_tokens": tokens, "gap": base_reward - reward,
                   "token_share": tokens / base_tokens}
            rows.append(row)
            print(f"{row['rule']:36s} coverage {reward:.3f} (gap {row['gap']:+.3f}) "
                  f"at {row['token_share']:.3f}x best_of_16's tokens", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="12:56", help="keyword items lo:hi (not the report's)")
    p.add_argument("--candidates", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--draws", type=int, default=8, help="random 16s per item in the replay")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--rules", default="3:0.7;3:0.65;3:0.6;2:0.75;4:0.6", help="segment:keep;...")
    p.add_argument("--shift", type=int, default=1, choices=(0, 1),
                   help="1: the state after t-1 tokens (what the server has at a boundary)")
    p.add_argument("--mlp", action="store_true", help="a one-hidden-layer network, not ridge")
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
        probe = fit_probe([s for it in halves[1 - k] for s in by_item[it]], covs, args)
        for it in halves[k]:
            probe_of[it] = probe
    pairs = {}
    for t in PAIR_STEPS:
        acc, n = tied_pair_accuracy(samples, covs, probe_of, t)
        pairs[t] = {"accuracy": acc, "pairs": n}
        print(f"t={t:2d}: the probe orders {acc:.3f} of {n} coverage-tied pairs", flush=True)
    rng = random.Random(0)
    draws = {it: [rng.sample(by_item[it], 16) for _ in range(args.draws)] for it in items}
    rows = replay_rules(items, draws, covs, lambda it: rankings(covs[it], probe_of[it]),
                        args.rules, ("coverage", "tie", "value"))
    out = write_result("value-probe", {**provenance(), "settings": vars(args),
                                       "tied_pairs": pairs, "replay": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
