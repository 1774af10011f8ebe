"""Per-token detokenization (IncrementalText) against one decode at the end (DeferredText, what
best_of_n candidates and deal rollouts ask for with SamplingParams.detokenize=False), with the
embedded model's tokenizer, side by side in one run: host time per generated token.

    .venv/bin/python bench/detok_cpu.py [--sequences 64] [--tokens 128]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

from alignserve.engine.native.loader import load_tokenizer, resolve
from alignserve.engine.text import DeferredText, IncrementalText


def per_token_us(make, rows: list[list[int]]) -> float:
    start = time.perf_counter()
    for ids in rows:
        text = make()
        for j, tok in enumerate(ids):
            text.push(tok)
            text.delta(final=j == len(ids) - 1)
    return 1e6 * (time.perf_counter() - start) / sum(map(len, rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tok = load_tokenizer(*resolve(None)[:2])
    rng = random.Random(0)
    rows = [[rng.randrange(200, 40000) for _ in range(args.tokens)] for _ in range(args.sequences)]
    prompt = tok.encode("Write a short story.", add_special_tokens=False)
    incremental, deferred = [], []
    for _ in range(args.rounds):
        incremental.append(per_token_us(lambda: IncrementalText(tok, prompt), rows))
        deferred.append(per_token_us(lambda: DeferredText(tok), rows))
    result = {"incremental_us_per_token": round(min(incremental), 2),
              "deferred_us_per_token": round(min(deferred), 2),
              "speedup": round(min(incremental) / min(deferred), 1)}
    print(result)
    print("wrote", write_result("detok_cpu", {**provenance(), "args": vars(args), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
