"""Host time per decode step of the native engine: what a GPU step costs besides its kernels.

    .venv/bin/python bench/host_step.py [--n 64] [--gen 128] [--reps 3]

With CUDA graphs a GPU decode step's model forward is one replay and its sampling one kernel;
what is left is the engine's Python: KV slot bookkeeping, the attention plan, stacking and
reading back the sampled tokens, committing them, and the event loop around the worker thread.
For a 135M model on an H100 that is most of a step (the GPU work of 64 rows is ~0.2 ms), so it
decides best-of-N's speed there. Measured on this machine's CPU with a tiny random model and a
short prompt (so the model itself is cheap), best-of-N as the bench e2e_gpu.py runs it (prefill,
fork N, generate, release): per decode step, the worker's step time minus the model's forward
and the sampling call ("in the step"), and the wall time outside the worker's steps ("outside":
the event loop, delivering events to `generate`'s consumer). The split is taken by wrapping
`NativeEngine._step`, `CausalLM.hidden_states` / `head` and the sampler's `dispatch.sample`.
Also timed alone: building one step's `DecodePlan` for N sequences that share a 4096-token prompt
and own 60 tokens each (median of --plan-iters), laid out for graphs and not.
Results: bench/results/host_step-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from common import provenance, write_result
from e2e_gpu import IdsTokenizer
from shapes import build_model, random_prompt

from alignserve.engine.native import sampler
from alignserve.engine.native.engine import NativeEngine
from alignserve.engine.protocol import SamplingParams


class Clock:
    """Seconds spent in wrapped callables, by name."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, name: str, fn):
        self.spent.setdefault(name, 0.0)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - t0

        return timed


class _Sampling:
    """The sampler module's view of `dispatch`, with `sample` timed."""

    def __init__(self, dispatch, clock: Clock):
        self._dispatch = dispatch
        self.sample = clock.wrap("sample", dispatch.sample)

    def __getattr__(self, name):
        return getattr(self._dispatch, name)


def measure(args) -> dict:
    torch.manual_seed(0)
    model = build_model("tiny", torch.device("cpu"), torch.float32)
    engine = NativeEngine(model, IdsTokenizer(), "tiny", torch.device("cpu"), kv_cache_gib=0.05,
                          cuda_graphs=False)
    clock = Clock()
    engine._step = clock.wrap("step", engine._step)
    model.hidden_states = clock.wrap("forward", model.hidden_states)
    model.head = clock.wrap("forward", model.head)
    sampler.dispatch = _Sampling(sampler.dispatch, clock)
    params = SamplingParams(temperature=1.0, max_tokens=args.gen, ignore_eos=True, detokenize=False)
    rng = random.Random(0)

    async def request() -> None:
        root = await engine.prefill(random_prompt(rng, "tiny", args.prompt))
        seqs = await engine.fork(root, args.n)
        await engine.release([root])
        async for _ in engine.generate(seqs, params):
            pass
        await engine.release(seqs)

    async def run() -> tuple[float, int]:
        await engine.start()
        try:
            await request()  # warm-up
            for k in clock.spent:
                clock.spent[k] = 0.0
            steps0 = engine.stats().steps
            t0 = time.perf_counter()
            for _ in range(args.reps):
                await request()
            return time.perf_counter() - t0, engine.stats().steps - steps0
        finally:
            await engine.close()

    try:
        wall, steps = asyncio.run(run())
    finally:
        sampler.dispatch = sampler.dispatch._dispatch
    ms = {k: 1000 * v / steps for k, v in clock.spent.items()}
    return {
        "in_step_ms": round(ms["step"] - ms["forward"] - ms["sample"], 3),
        "outside_ms": round(1000 * wall / steps - ms["step"], 3),
        "host_ms": round(1000 * wall / steps - ms["forward"] - ms["sample"], 3),
        "forward_ms": round(ms["forward"], 3), "sample_ms": round(ms["sample"], 3),
        "wall_per_step_ms": round(1000 * wall / steps, 3), "steps": steps,
    }


def plan_build_us(n: int, iters: int) -> dict:
    """Microseconds to build one decode step's plan for n sequences sharing a 4096-token prompt."""
    from common import median_ms

    from alignserve.engine.native.attention import DecodePlan
    from alignserve.engine.native.kv_cache import KVCache

    cache = KVCache(1, 4096 + n * 80 + 64, 1, 16, torch.float32, torch.device("cpu"))
    root = cache.new_chain(0)
    cache.append_slots(root, 4096)
    chains = cache.fork(root, 0, list(range(1, n + 1)))
    new = [cache.append_slots(c, 60)[-1] for c in chains]
    return {f"plan_{name}_us": round(1000 * median_ms(
        lambda g=graphs: DecodePlan(cache, chains, new, 0.125, for_graphs=g), iters), 1)
        for name, graphs in (("graphs", True), ("eager", False))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="candidates (rows per step)")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plan-iters", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    row = {"n": args.n, **measure(args), **plan_build_us(args.n, args.plan_iters)}
    print(row, flush=True)
    payload = {**provenance(), "torch": torch.__version__,
               "what": "native engine: host time per decode step besides the model and sampling "
                       "(tiny random model, CPU)",
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": [row]}
    print("wrote", write_result("host_step", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
