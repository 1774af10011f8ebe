"""Speculative rejection's pruning rules, compared offline on one pool of samples.

Speculative rejection's candidates are independent samples until they are pruned, so a pool of
`--candidates` complete samples per item (one prefill, forked, sampled to the end, each
token's log-prob kept) shows what any pruning rule would have kept: a rule is replayed on the
pool's prefixes (score the prefixes of the particles still going at each pruning point, keep
the best, charge the tokens each one was decoded for), and its reward and model tokens come
out without decoding again. Best-of-N is the rule that never prunes. The pool is drawn on items
the evaluation's report does not use (the report takes each task's first --limit items; this
skips --skip of them).

    .venv/bin/python bench/prune_sim.py sample [--keywords 12:44] [--sentiment 12:24]
        [--candidates 16] [--max-tokens 40] [--pool pool.json]
    .venv/bin/python bench/prune_sim.py replay --pool pool.json [--rules "..."]

`sample` writes the pool (a JSON file, not a result); for keyword items it also keeps, per
sample and step, the model's probability of each keyword's first token and of the tokens that
end a sentence (signals a rule may rank by). `replay` prints, per task and rule, the mean
reward and the mean model tokens per request with their ratios to best-of-N's (counted the
same way: with `dedup=1`, twin rows computed once, as engine/native/twins.py does), and writes
bench/results/prune-sim-STAMP.json (device, commit, date).
A rule is `segment=4,keep=0.5[,tie=lp|none|keep|prop_max|...][,dedup=1]...`: see `replay_one`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

DEFAULT_RULES = ("segment=4,keep=0.5;segment=4,keep=0.5,tie=none;"
                 "segment=4,keep=0.5,hold=1;segment=4,keep=0.5,hold=2;"
                 "segment=6,keep=0.5;segment=8,keep=0.4;segment=4,keep=0.6")


# ---- sampling the pool ----------------------------------------------------------------------
async def sample_item(engine, item, k: int, max_tokens: int, temperature: float) -> dict:
    from alignserve.engine.protocol import SamplingParams

    text, ids = engine.encode_chat([{"role": "user", "content": item.prompt}])
    root = await engine.prefill(ids)
    seqs = await engine.fork(root, k)
    await engine.release([root])
    sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=item.seed,
                        logprobs=0, detokenize=False)
    watch = keyword_watch(engine.tokenizer, item.rewards)
    seen: dict = {s.key: [] for s in seqs}

    def observer(handles, logits, inputs):
        # each step's probability of each keyword's first token (any casing, with or
        # without a leading space): what the model was ready to say
        if not watch:
            return
        probs = torch.softmax(logits.float(), dim=-1)
        per_kw = torch.stack([probs[:, ids_].sum(-1) for ids_ in watch], dim=-1)
        for h, row in zip(handles, per_kw.tolist()):
            seen[h.key].append(row)

    async for _ in engine.generate(seqs, sp, observer=observer):
        pass
    out = {"item": item.id, "prompt_text": text, "prompt_tokens": len(ids),
           "rewards": item.rewards,
           "samples": [{"tokens": s.output_ids, "lps": [e["logprob"] for e in s.logprobs],
                        "finish": s.finish_reason, "watch": seen[s.key],
                        # every prefix's text, so that a replay needs no tokenizer
                        "prefixes": [engine.tokenizer.decode(s.output_ids[:t],
                                                             skip_special_tokens=True)
                                     for t in range(s.num_output + 1)]}
                       for s in seqs]}
    await engine.release(seqs)
    return out


def keyword_watch(tokenizer, rewards) -> list[list[int]]:
    """Per keyword of the item's `keywords` reward, the first token ids of its spellings."""
    words = next((r["keywords"] for r in rewards or () if r["name"] == "keywords"), [])
    if not words:
        return []
    # the last column: tokens that end the sentence or the answer
    ends = {tokenizer.encode(v, add_special_tokens=False)[0] for v in (".", "!", "?", ".\n")}
    ends |= {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
             if isinstance(t, int) and t >= 0}
    out = []
    for w in words:
        ids = {tokenizer.encode(v, add_special_tokens=False)[0]
               for v in (w, " " + w, w.capitalize(), " " + w.capitalize())}
        out.append(sorted(ids))
    return out + [sorted(ends)]


async def sample_pool(args) -> dict:
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.evaluation.tasks import load_task

    engine = NativeEngine.load()
    await engine.start()
    pool: dict = {"candidates": args.candidates, "max_tokens": args.max_tokens,
                  "temperature": args.temperature, "tasks": {}}
    for task, span in (("keywords", args.keywords), ("sentiment", args.sentiment)):
        if not span:
            continue
        lo, hi = (int(x) for x in span.split(":"))
        items = load_task(task).items[lo:hi]
        done = []
        for i in range(0, len(items), args.batch):
            done += await asyncio.gather(*(sample_item(engine, it, args.candidates,
                                                       args.max_tokens, args.temperature)
                                           for it in items[i:i + args.batch]))
            print(f"{task}: {len(done)}/{len(items)} items", flush=True)
        pool["tasks"][task] = done
    await engine.close()
    return pool


# ---- replaying a rule -----------------------------------------------------------------------
def parse_rule(spec: str) -> dict:
    rule = {"segment": 4, "keep": 0.5, "tie": "lp", "hold": 0, "first": 0, "stop": 0,
            "cap": 1.0, "top": 0, "settle": 0, "soft": 0.0, "sig": "last",
            "round": "ceil", "grow": 0.0, "decay": 1.0, "behind": 0.0,
            "fin": 0, "dedup": 0, "floor": 0, "pause": 0}
    for kv in filter(None, spec.split(",")):
        k, _, v = kv.partition("=")
        rule[k] = v if k in ("tie", "sig", "round") else (float(v) if "." in v else int(v))
    return rule


class Scorer:
    """Scores (and caches) prefixes of one item's samples with the item's composed reward."""

    def __init__(self, entry: dict, max_tokens: int) -> None:
        from alignserve.rewardmodels.compose import RewardRegistry

        self.entry, self.max_tokens = entry, max_tokens
        self.reward = RewardRegistry.default().build(entry["rewards"])
        self.cache: dict[tuple[int, int, bool], object] = {}

    def score(self, i: int, length: int, final: bool):
        """The RewardScore of sample i's first `length` tokens (final or partial)."""
        key = (i, length, final)
        if key not in self.cache:
            prefixes = self.entry["samples"][i]["prefixes"]
            text = prefixes[min(length, len(prefixes) - 1)]
            prompt = self.entry["prompt_text"]
            self.cache[key] = (self.reward.score([text], prompt)[0] if final else
                               self.reward.score_partial([text], prompt,
                                                         [self.max_tokens - length])[0])
        return self.cache[key]

    def __call__(self, i: int, length: int, final: bool) -> float:
        return float(self.score(i, length, final).total)

    def propensity(self, i: int, length: int, how: str) -> float:
        """How ready the model was to write the keywords sample i's first `length` tokens
        still miss: their first tokens' probability at the last step ("last"), summed over the
        steps ("sum") or its maximum ("max"), summed over the missing keywords."""
        import re

        words = next((r["keywords"] for r in self.entry["rewards"] if r["name"] == "keywords"),
                     [])
        watch = self.entry["samples"][i].get("watch") or []
        if not words or not watch or length == 0:
            return 0.0
        text = self.entry["samples"][i]["prefixes"][min(length, len(watch))]
        steps = watch[:length]
        if how.startswith("end"):  # the sentence's end coming: the last column, negated
            col = [row[-1] for row in steps]
            return -{"endlast": col[-1], "endsum": sum(col), "endmax": max(col)}[how]
        total = 0.0
        for k, w in enumerate(words):
            if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.IGNORECASE):
                continue
            col = [row[k] for row in steps]
            total += {"last": col[-1], "sum": sum(col), "max": max(col)}[how]
        return total


def replay_one(entry: dict, scorer: Scorer, rule: dict, members: list[int]) -> tuple[float, int]:
    """(reward of the pick, model tokens) of one request under `rule` on the samples `members`.

    Every `segment` tokens the particles still going (not finished by then) are ranked by the
    partial score of their prefix, then (tie "lp") mean token log-prob, and the best `keep`
    fraction (rounded up) goes on; tie "keep" keeps every particle tied with the last one kept.
    hold=h: a pruning where every going particle's partial score is equal to the best (nothing
    separates them) keeps all of them, at most h times. first=f: the first pruning comes after
    f tokens (0: `segment`). stop=1: the search ends once a finished particle's reward reaches
    1 (the rewards here cannot exceed it). When one particle is left going and no finished one
    competes, it runs to its end. tie "keep" keeps at most a `cap` fraction. top=1: once a
    going particle's partial score is 1 (keywords: all present, it cannot fall), the particles
    below 1 are pruned. settle=1: the server's rule (decoding/segments.py, ComposedReward's
    ceiling): a finished particle at the ceiling ends the search; else the going particles
    sure of it leave only the likeliest of them going.
    tie "prop_max" / "prop_sum" / "prop_last": ties broken by the model's readiness to write
    the missing keywords (Scorer.propensity), "prop_endsum" ... by its readiness to end the
    sentence (negated); soft=w adds w times the signal `sig` to the partial score instead.
    behind=b: also drop particles b or more below the leader (fin=1: the leader may be a
    finished particle). round=floor|near: how the kept count rounds; floor=m: drop one when
    rounding up would keep everyone and more than m are going. grow=g: segments lengthen by
    g tokens a round; decay=d: keep is multiplied by d each round. dedup=1: tokens counted as
    twin rows cost (each distinct prefix once a step).
    pause=1: the server's pause_ties (see replay_pausing), which takes only segment, keep and
    dedup besides.
    The pick is the best finished particle by final reward (ties: mean log-prob)."""
    if rule["pause"]:
        return replay_pausing(entry, scorer, rule, members)
    samples = entry["samples"]
    seg, keep = float(rule["segment"]), float(rule["keep"])
    going = list(members)
    tokens = entry["prompt_tokens"]
    t, holds = 0, 0
    finished: list[int] = []
    while going:
        if rule["stop"] and finished and max(scorer(i, len(samples[i]["tokens"]), True)
                                             for i in finished) >= 1.0:
            break
        t_next = t + (rule["first"] if t == 0 and rule["first"] else round(seg))
        seg += rule["grow"]
        if len(going) == 1 and not finished:
            t_next = 10 ** 9
        if rule["dedup"]:  # twins (equal prefixes stepping together) computed once
            for pos in range(t + 1, min(t_next, max(len(samples[i]["tokens"]) for i in going)) + 1):
                tokens += len({tuple(samples[i]["tokens"][:pos]) for i in going
                               if len(samples[i]["tokens"]) >= pos})
        else:
            for i in going:
                tokens += min(len(samples[i]["tokens"]), t_next) - t
        still = []
        for i in going:
            (finished if len(samples[i]["tokens"]) <= t_next else still).append(i)
        going, t = still, t_next
        if rule["settle"]:
            reward = scorer.reward
            if any(reward.reaches_ceiling(scorer.score(i, len(samples[i]["tokens"]), True))
                   for i in finished):
                break
            prefixes = [samples[i]["prefixes"][min(t, len(samples[i]["prefixes"]) - 1)]
                        for i in going]
            sure = [i for i, ok in zip(going, reward.sure_of_ceiling(prefixes)) if ok]
            if sure:
                going = [max(sure, key=lambda i: sum(samples[i]["lps"][:t]) / t)]
                continue
        if len(going) <= 1:
            continue
        scores = {i: scorer(i, t, False) + (rule["soft"] * scorer.propensity(i, t, rule["sig"])
                                            if rule["soft"] else 0.0) for i in going}
        if rule["hold"] and holds < rule["hold"] and len(set(scores.values())) == 1:
            holds += 1
            continue

        def key(i: int, scores=scores, t=t) -> tuple[float, float]:  # bound: used at once
            lp = samples[i]["lps"][:t]
            mean_lp = sum(lp) / max(1, len(lp))
            if rule["tie"].startswith("prop"):  # prop_last, prop_sum, prop_max
                return (scores[i], scorer.propensity(i, t, rule["tie"][5:]))
            return (scores[i], {"lp": mean_lp, "lplow": -mean_lp}.get(rule["tie"], 0.0))

        ranked = sorted(going, key=key, reverse=True)
        k = max(1, {"ceil": math.ceil, "floor": math.floor, "near": round}[rule["round"]](
            len(going) * keep))
        keep = min(1.0, keep * rule["decay"])
        if rule["floor"] and k >= len(going) > rule["floor"]:  # rounding up would keep all
            k = len(going) - 1
        if rule["tie"] == "keep":
            cap = max(k, math.ceil(len(going) * rule["cap"]))
            while k < cap and scores[ranked[k]] == scores[ranked[k - 1]]:
                k += 1
        if rule["top"] and scores[ranked[0]] >= 1.0:  # the best can only stay at the maximum
            k = min(k, sum(1 for i in ranked if scores[i] >= 1.0))
        if rule["behind"]:  # also drop whatever trails the leader by `behind` or more
            lead = scores[ranked[0]]
            if rule["fin"] and finished:  # the leader may be a finished particle
                lead = max(lead, max(scorer(i, len(samples[i]["tokens"]), True) for i in finished))
            k = max(1, min(k, sum(1 for i in ranked if scores[i] > lead - rule["behind"] - 1e-9)))
        going = ranked[:k]

    def final_key(i: int) -> tuple[float, float]:
        lp = samples[i]["lps"]
        return (scorer(i, len(samples[i]["tokens"]), True), sum(lp) / max(1, len(lp)))

    best = max(finished, key=final_key)
    return final_key(best)[0], tokens


def replay_pausing(entry: dict, scorer: Scorer, rule: dict,
                   members: list[int]) -> tuple[float, int]:
    """replay_one for speculative_rejection with pause_ties, as decoding/segments.py runs it:
    those a pruning drops only by the tie-break (partial score equal to the last one kept)
    pause; once none is going and no finished particle is at the ceiling, the paused ones go
    on from where each stopped. A finished particle at the ceiling ends the search; going ones
    sure of it leave the likeliest of them going, alone. Tokens: each step's distinct prefixes
    (twin rows) with dedup=1, else every particle's own."""
    samples, reward = entry["samples"], scorer.reward
    seg, keep = int(rule["segment"]), float(rule["keep"])

    def length(i: int) -> int:
        return len(samples[i]["tokens"])

    pos = {i: 0 for i in members}
    going, paused, finished = list(members), [], []
    tokens = entry["prompt_tokens"]
    while going:
        step = 10 ** 9 if len(going) == 1 else seg  # nothing to compare: run to the end
        rows = [tuple(samples[i]["tokens"][:t]) for i in going
                for t in range(pos[i] + 1, min(pos[i] + step, length(i)) + 1)]
        tokens += len(set(rows)) if rule["dedup"] else len(rows)
        for i in going:
            pos[i] = min(pos[i] + step, length(i))
        finished += [i for i in going if pos[i] == length(i)]
        going = [i for i in going if pos[i] < length(i)]
        if any(reward.reaches_ceiling(scorer.score(i, length(i), True)) for i in finished):
            break
        texts = [samples[i]["prefixes"][pos[i]] for i in going]
        sure = [i for i, ok in zip(going, reward.sure_of_ceiling(texts)) if ok]
        if sure:
            going, paused = [max(sure, key=lambda i: sum(samples[i]["lps"][:pos[i]]) / pos[i])], []
        elif len(going) > 1:
            ranked = sorted(going, key=lambda i: scorer(i, pos[i], False), reverse=True)
            k = min(len(going), max(1, math.ceil(len(going) * keep)))
            cut = scorer(ranked[k - 1], pos[ranked[k - 1]], False)
            paused += [i for i in ranked[k:] if scorer(i, pos[i], False) >= cut - 1e-9]
            going = ranked[:k]
        if not going:
            going, paused = paused, []
    best = max(finished, key=lambda i: (scorer(i, length(i), True),
                                        sum(samples[i]["lps"]) / max(1, length(i))))
    return scorer(best, length(best), True), tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--keywords", default="12:44", help="keyword items lo:hi")
    s.add_argument("--sentiment", default="12:24", help="sentiment items lo:hi")
    s.add_argument("--candidates", type=int, default=16)
    s.add_argument("--max-tokens", type=int, default=40)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--batch", type=int, default=4, help="items in flight")
    s.add_argument("--pool", default="prune-pool.json")
    r = sub.add_parser("replay")
    r.add_argument("--pool", default="prune-pool.json")
    r.add_argument("--rules", default=DEFAULT_RULES)
    r.add_argument("--draws", type=int, default=1,
                   help="random subsets of --subset samples per item (1: the whole pool)")
    r.add_argument("--subset", type=int, default=16)
    args = p.parse_args()
    if args.cmd == "sample":
        pool = asyncio.run(sample_pool(args))
        Path(args.pool).write_text(json.dumps(pool))
        print(f"wrote {args.pool}")
        return 0
    return run_replay(args)


def run_replay(args) -> int:
    pool = json.loads(Path(args.pool).read_text())
    rules = [(spec, parse_rule(spec)) for spec in filter(None, (x.strip() for x in
                                                                args.rules.split(";")))]
    rows = []
    for task, entries in pool["tasks"].items():
        scorers = [Scorer(e, pool["max_tokens"]) for e in entries]
        rng = random.Random(0)
        subsets = [[list(range(len(e["samples"])))] if args.draws == 1 else
                   [rng.sample(range(len(e["samples"])), args.subset) for _ in range(args.draws)]
                   for e in entries]
        # best-of-N with every row computed, and with twin rows computed once: a rule's
        # tokens are compared with the baseline that counts them the same way
        bases = [("best_of_n", parse_rule("segment=1000000,keep=1.0"))]
        if any(rule["dedup"] for _, rule in rules):
            bases.append(("best_of_n,dedup=1", parse_rule("segment=1000000,keep=1.0,dedup=1")))
        base: dict[int, tuple[float, float]] = {}
        for spec, rule in bases + rules:
            res = [replay_one(e, sc, rule, m) for e, sc, ms in zip(entries, scorers, subsets)
                   for m in ms]
            reward = sum(r for r, _ in res) / len(res)
            tokens = sum(t for _, t in res) / len(res)
            ref = base.setdefault(rule["dedup"], (reward, tokens))
            rows.append({"task": task, "rule": spec, "reward": reward, "model_tokens": tokens,
                         "token_share": tokens / ref[1], "gap": ref[0] - reward})
            print(f"{task:10s} {spec:50s} reward {reward:.3f} (gap {ref[0] - reward:+.3f})  "
                  f"tokens {tokens:6.1f} ({tokens / ref[1]:.3f}x)", flush=True)
    out = write_result("prune-sim", {**provenance(), "settings": vars(args),
                                     "pool": {k: pool[k] for k in ("candidates", "max_tokens",
                                                                   "temperature")},
                                     "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
