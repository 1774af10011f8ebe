"""What the structured-output mask costs per decode step on this CPU, beside a native decode
step of the embedded model, in one run: for 1 and 16 rows, each row's matcher advanced by one
token, its bitmask filled and read by the fused sampling pass, against the wall time
between two steps of `NativeEngine.generate` with the same number of rows. The issue's goal:
the mask costs <= 5% of a decode step.

    .venv/bin/python bench/grammar_cpu.py [--rows 1 16] [--decode-tokens 24]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import provenance, write_result

from alignserve.engine import compute_thread
from alignserve.engine.grammar import (
    GrammarSpec,
    TokenizerGrammars,
    ToolDef,
    canonical_json,
    new_bitmask,
)
from alignserve.engine.native.engine import NativeEngine
from alignserve.engine.protocol import SamplingParams
from alignserve.kernels import dispatch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["city"]},
    },
    "required": ["name", "age", "color"],
}
DOC = {"name": "Ada Lovelace of the Analytical Engine", "age": 36, "color": "blue",
       "tags": ["math", "poetry", "engines", "notes"],
       "address": {"city": "London", "zip": "W1"}}
TOOL = ToolDef("get_weather", canonical_json({
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}))
CALL = ('Let me look that up. <tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "days": 3}}\n</tool_call>')


def cpu_description() -> dict:
    model, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split()
                         if f.startswith(("avx512", "amx", "avx2"))]
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": flags, "torch_threads": torch.get_num_threads()}


def _sample(logits: torch.Tensor, allowed: torch.Tensor | None) -> float:
    """Wall ms of one fused sampling pass over `logits` (temperature 1, no other knobs)."""
    b = logits.shape[0]
    t0 = time.perf_counter()
    dispatch.sample(logits, torch.ones(b), torch.zeros(b, dtype=torch.int64), torch.ones(b),
                    torch.zeros(b), list(range(b)), allowed=allowed)
    return 1000 * (time.perf_counter() - t0)


def mask_step_ms(compiled, tokens: list[int], rows: int, vocab: int) -> dict:
    """Per step, as the native sampler does it: each row accepts its next token (rows staggered
    through the document so they sit in different grammar states) and the bitmask is filled
    once; the fused pass then reads it beside each logit. The mask's cost is the accept and
    fill plus the fused pass with the bitmask minus the same pass without it, both timed in
    the same step (alternating order, so drift hits both)."""
    starts = [(3 * r) % 12 for r in range(rows)]  # staggered by up to 9 tokens
    states = [compiled.new_state() for _ in range(rows)]
    for st, start in zip(states, starts):
        st.sync(tokens[:start])
    buffer = new_bitmask(rows, vocab)
    logits = torch.randn(rows, vocab)
    times, fill_only, pass_extra = [], [], []
    for step in range(len(tokens) - max(starts) - 1):
        t0 = time.perf_counter()
        for st, start in zip(states, starts):
            st.accept(tokens[start + step])
        t1 = time.perf_counter()
        buffer.fill_(-1)
        for i, st in enumerate(states):
            if not st.terminated:
                st.fill(buffer, i)
        t2 = time.perf_counter()
        if step % 2:
            plain, masked = _sample(logits.clone(), None), _sample(logits.clone(), buffer)
        else:
            masked, plain = _sample(logits.clone(), buffer), _sample(logits.clone(), None)
        extra = masked - plain
        times.append(1000 * (t2 - t0) + extra)
        fill_only.append(1000 * (t2 - t1))
        pass_extra.append(extra)
    return {"steps": len(times), "median_ms": round(statistics.median(times), 4),
            "mean_ms": round(statistics.fmean(times), 4), "max_ms": round(max(times), 4),
            "fill_only_median_ms": round(statistics.median(fill_only), 4),
            "fused_pass_extra_median_ms": round(statistics.median(pass_extra), 4)}


def decode_step_ms(engine: NativeEngine, rows: int, new_tokens: int) -> float:
    """Median wall time between consecutive observer calls of one generate (one whole step:
    forward, sampling, bookkeeping) with `rows` sequences forked from one prompt."""
    prompt = engine.encode_chat([{"role": "user", "content": "Tell me about the ocean."}])[1]
    stamps: list[float] = []

    def stamp(seqs, logits, inputs):
        stamps.append(time.perf_counter())

    async def go():
        await engine.start()
        root = await engine.prefill(prompt)
        seqs = await engine.fork(root, rows)
        params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0)
        async for _ in engine.generate(seqs, params, observer=stamp):
            pass
        await engine.release(seqs + [root])

    asyncio.run_coroutine_threadsafe(go(), engine.loop).result(600)
    gaps = [1000 * (b - a) for a, b in itertools.pairwise(stamps)][2:]  # first steps warm up
    return statistics.median(gaps)


def start_engine() -> NativeEngine:
    """The engine on an event loop of its own thread (as the server runs it)."""
    import threading

    engine = NativeEngine.load()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(engine.start(), loop).result(60)
    return engine


def stop_engine(engine: NativeEngine) -> None:
    asyncio.run_coroutine_threadsafe(engine.close(), engine.loop).result(60)
    engine.loop.call_soon_threadsafe(engine.loop.stop)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--decode-tokens", type=int, default=24)
    args = ap.parse_args()
    engine = start_engine()
    tok, vocab = engine.tokenizer, engine.vocab_size
    grammars = TokenizerGrammars(tok, vocab)
    cases = {
        "json_schema": (GrammarSpec(response="json_schema", schema=canonical_json(SCHEMA)),
                        json.dumps(DOC)),
        "tools_auto": (GrammarSpec(tools=(TOOL,), tool_mode="auto"), CALL),
    }
    compile_ms = {}
    results = []
    for rows in args.rows:
        step = decode_step_ms(engine, rows, args.decode_tokens)
        entry = {"rows": rows, "decode_step_ms": round(step, 3), "grammars": {}}
        for name, (spec, text) in cases.items():
            t0 = time.perf_counter()
            compiled = grammars.compile(spec)
            compile_ms.setdefault(name, round(1000 * (time.perf_counter() - t0), 2))
            tokens = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
            # on the compute thread, as the engine applies masks: tensor work from this thread
            # would give the process a second OpenMP team and slow every step (omp_teams.py)
            cost = compute_thread.call(mask_step_ms, compiled, tokens, rows, vocab)
            cost["percent_of_decode_step"] = round(100 * cost["median_ms"] / step, 2)
            # the mean carries the rare costly steps (a string near its maxLength: xgrammar
            # computes those masks at run time, milliseconds each)
            cost["mean_percent_of_decode_step"] = round(100 * cost["mean_ms"] / step, 2)
            entry["grammars"][name] = cost
        results.append(entry)
        print(json.dumps(entry))
    grammars.close()
    stop_engine(engine)
    payload = {**provenance(), **cpu_description(), "args": vars(args),
               "compile_ms_first": compile_ms, "results": results,
               "goal": "mask median <= 5% of a native decode step"}
    print("wrote", write_result("grammar_cpu", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
