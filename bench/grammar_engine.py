"""The grammar's cost inside the native engine's own decode path (SamplingParams.grammar:
matcher sync, bitmask fill and apply in the sampler), side by side with the same decode
without it, in one run: for each row count, a constrained generate (JSON schema) and an
unconstrained one producing exactly as many tokens per row (max_tokens = the constrained
run's length, ignore_eos), alternated `--repeats` times so load on a shared machine hits
both alike. Reported: seconds per generated token (row-step) for each and their ratio. With
one row the two runs do the same steps; with several, constrained rows finish at different
lengths while the plain ones all run to the longest, so the plain batch stays fuller for its
last steps: per row-token that favours the plain run (the ratio leans high), per step it
favours the constrained run (leans low); both are reported, the truth lies between.

    .venv/bin/python bench/grammar_engine.py [--rows 1 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result
from grammar_cpu import SCHEMA, cpu_description, start_engine, stop_engine

from alignserve.engine.grammar import GrammarSpec, TokenizerGrammars, canonical_json
from alignserve.engine.protocol import SamplingParams


def timed_generate(engine, prompt, rows: int, params: SamplingParams) -> tuple[float, list[int]]:
    async def go():
        root = await engine.prefill(prompt)
        seqs = await engine.fork(root, rows)
        t0 = time.perf_counter()
        async for _ in engine.generate(seqs, params):
            pass
        took = time.perf_counter() - t0
        lengths = [s.num_output for s in seqs]
        await engine.release(seqs + [root])
        return took, lengths

    return asyncio.run_coroutine_threadsafe(go(), engine.loop).result(600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = start_engine()
    grammars = TokenizerGrammars(engine.tokenizer, engine.vocab_size,
                                 stop_token_ids=sorted(engine.eos_token_ids))
    compiled = grammars.compile(GrammarSpec(response="json_schema",
                                            schema=canonical_json(SCHEMA)))
    prompt = engine.encode_chat([{"role": "user", "content": "A person as JSON."}])[1]
    results = []
    for rows in args.rows:
        with_g, without, step_ratio = [], [], []
        for rep in range(args.repeats):
            params = SamplingParams(temperature=1.0, max_tokens=96, seed=rep, grammar=compiled)
            took, lengths = timed_generate(engine, prompt, rows, params)
            steps = max(lengths)
            with_g.append(took / sum(lengths))
            step_g = took / steps
            plain = SamplingParams(temperature=1.0, max_tokens=steps, seed=rep, ignore_eos=True)
            took, _ = timed_generate(engine, prompt, rows, plain)
            without.append(took / (rows * steps))
            step_ratio.append(step_g / (took / steps))
        entry = {"rows": rows, "s_per_row_token_grammar": [round(x, 5) for x in with_g],
                 "s_per_row_token_plain": [round(x, 5) for x in without],
                 "median_ratio_per_row_token": round(statistics.median(
                     a / b for a, b in zip(with_g, without)), 3),
                 "median_ratio_per_step": round(statistics.median(step_ratio), 3)}
        results.append(entry)
        print(json.dumps(entry))
    grammars.close()
    stop_engine(engine)
    payload = {**provenance(), **cpu_description(), "args": vars(args), "results": results,
               "note": "ratio = constrained / unconstrained seconds per generated row-token; the "
                       "machine is shared (2 cores, other sessions), so single runs are noisy"}
    print("wrote", write_result("grammar_engine", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
