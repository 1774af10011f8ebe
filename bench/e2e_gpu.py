"""End to end (issue 4): the native engine's best-of-N sampling against vLLM n=N and Hugging Face
`generate`, on the same GPU in the same run.

    python bench/e2e_gpu.py                       # GPU: both shapes, N = 16 and 64, prompt 4096, 128 tokens
    PYTHONPATH=/tmp/site:. python bench/e2e_gpu.py   # with vLLM 0.25 installed there (vllm-gpu-wheels.sh)
    python bench/e2e_gpu.py --device cpu --shapes tiny --ns 4 --prompt 32 --gen 8 --reps 1   # smoke

What one timing is, for every engine: a request from prompt token ids to N x G sampled tokens
(temperature 1, ignore_eos), on a fresh random prompt each time (no prefix-cache hit across
repeats), the best of --reps after one warm-up; random bf16 weights (speed does not depend on
them; fp32 on a CPU).
- native: engine.prefill -> fork(N) -> generate -> release, the engine calls best_of_n makes
  before it scores (with detokenize=False, as best_of_n asks; the bench has no tokenizer for
  random weights, so the one decode per candidate at the end is a join of ids). CUDA graphs on
  (the engine's default on CUDA: piecewise, and whole steps once a layout repeats);
  "native-piecewise" keeps to piecewise graphs and "native-eager" turns graphs off, to show
  what each buys. On a CPU (the smoke run) "native" takes the same graph paths uncaptured.
- vllm: vllm.LLM.generate with n=N (dummy weights, prefix caching on, detokenize off), in a child
  process so that its GPU memory is gone before the native engine starts.
  VLLM_USE_FLASHINFER_SAMPLER=0, as ../shared/FACTS.md advises.
- hf: LlamaForCausalLM.generate(num_return_sequences=N, do_sample=True), SDPA attention.
Goal (issue 4): native tokens/s at least 2x vLLM's at N=64 on both shapes.
Writes bench/results/e2e_gpu-<stamp>.json (or under --out): device, commit, date, every row, ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch
from shapes import SHAPES, build_model, hf_config_kwargs, random_prompt


def best_time(run, reps: int) -> float:
    """Min over `reps` timed calls after one warm-up; run(i) does call i (0 = the warm-up)."""
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def row(engine: str, shape: str, n: int, args, seconds: float, **extra) -> dict:
    r = {"engine": engine, "model": shape, "n": n, "prompt": args.prompt, "gen": args.gen,
         "seconds": round(seconds, 4), "tok_s": round(n * args.gen / seconds), **extra}
    print(json.dumps(r), flush=True)
    return r


# ---- native -----------------------------------------------------------------------------------

class IdsTokenizer:
    """What the engine asks of a tokenizer, for random weights: no EOS, ids joined as text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def bench_native(shape: str, args, dtype: torch.dtype, variant: str = "native") -> list[dict]:
    """The native engine's rows; `variant`: "native" (the engine's defaults, graphs forced on a
    CPU so the smoke run takes their paths), "native-piecewise" (no whole-step graphs) or
    "native-eager" (no CUDA graphs)."""
    from alignserve.engine.native.engine import NativeEngine
    from alignserve.engine.protocol import SamplingParams

    device = torch.device(args.device)
    model = build_model(shape, device, dtype)
    engine = NativeEngine(model, IdsTokenizer(), shape, device, kv_cache_gib=args.kv_gib,
                          cuda_graphs=variant != "native-eager")
    if variant == "native-piecewise":
        engine.decode_runner.whole = False
    params = SamplingParams(temperature=1.0, max_tokens=args.gen, ignore_eos=True, detokenize=False)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    rng = random.Random(0)

    async def request(n: int) -> None:
        root = await engine.prefill(random_prompt(rng, shape, args.prompt))
        seqs = await engine.fork(root, n)
        await engine.release([root])
        try:
            async for _ in engine.generate(seqs, params):
                pass
            assert all(s.num_output == args.gen for s in seqs), "a candidate stopped early"
        finally:
            await engine.release(seqs)

    rows = []
    try:
        for n in args.ns:
            steps0 = engine.stats().steps
            seconds = best_time(lambda i, n=n: loop.run_until_complete(request(n)), args.reps)
            runner = engine.decode_runner
            graphs = None if runner is None else {
                "captured": runner.capture, "buckets": runner.captured, "failed": runner.failed,
                "whole_steps": runner.whole_steps, "steps": runner.steps,
                "whole_layouts": runner.whole_built, "whole_failed": runner.whole_failed}
            rows.append(row(variant, shape, n, args, seconds,
                            steps_per_request=(engine.stats().steps - steps0) // (args.reps + 1),
                            cuda_graphs=graphs))
    finally:
        loop.run_until_complete(engine.close())
        loop.close()
    return rows


# ---- Hugging Face generate ------------------------------------------------------------------

def bench_hf(shape: str, args, dtype: torch.dtype) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf_config_kwargs(shape))).to(args.device, dtype).eval()
    rng = random.Random(1)
    rows = []
    for n in args.ns:
        def run(_, n=n):
            ids = torch.tensor([random_prompt(rng, shape, args.prompt)], device=args.device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     max_new_tokens=args.gen, min_new_tokens=args.gen,
                                     num_return_sequences=n, pad_token_id=0)
            if args.device == "cuda":
                torch.cuda.synchronize()
            assert out.shape == (n, args.prompt + args.gen)

        rows.append(row("hf", shape, n, args, best_time(run, args.reps)))
    return rows


def in_process(bench, *args) -> list[dict]:
    """One in-process bench's rows; its model and engine (and their GPU memory) are gone after,
    so the next one has the GPU to itself."""
    rows = bench(*args)
    gc.collect()  # the engine's loop and closures hold cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


# ---- vLLM (a child process) -----------------------------------------------------------------

def vllm_child(shape: str, args) -> list[dict]:
    """Runs inside the child: vLLM alone, nothing of alignserve's."""
    from transformers import LlamaConfig
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir = tempfile.mkdtemp(prefix=f"e2e-{shape}-")
    LlamaConfig(**hf_config_kwargs(shape), torch_dtype="bfloat16",
                architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              gpu_memory_utilization=args.vllm_memory, max_model_len=8192,
              enable_prefix_caching=True, seed=0)
    rng = random.Random(2)
    rows = []
    for n in args.ns:
        sp = SamplingParams(n=n, max_tokens=args.gen, min_tokens=args.gen, ignore_eos=True,
                            temperature=1.0, detokenize=False)

        def run(_, sp=sp, n=n):
            prompt = TokensPrompt(prompt_token_ids=random_prompt(rng, shape, args.prompt))
            out = llm.generate([prompt], sp, use_tqdm=False)
            assert len(out[0].outputs) == n and all(len(o.token_ids) == args.gen for o in out[0].outputs)

        rows.append(row("vllm", shape, n, args, best_time(run, args.reps)))
    return rows


def bench_vllm(shape: str, args) -> list[dict] | str:
    """vLLM's rows, or why there are none."""
    if args.device != "cuda":  # this bench's child runs vLLM's GPU build
        return "vllm runs here on CUDA only (bench/vllm_cpu.py compares with vLLM on a CPU)"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (see ../shared/tools/vllm-gpu-wheels.sh)"
    cmd = [sys.executable, __file__, "--vllm-child", shape, "--ns", *map(str, args.ns),
           "--prompt", str(args.prompt), "--gen", str(args.gen), "--reps", str(args.reps),
           "--vllm-memory", str(args.vllm_memory)]
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    rows = [json.loads(line) for line in proc.stdout.splitlines()
            if line.startswith("{") and '"engine": "vllm"' in line]
    if proc.returncode != 0 or len(rows) != len(args.ns):
        return f"vLLM child failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return rows


# ---- the run --------------------------------------------------------------------------------

def ratios(rows: list[dict]) -> list[dict]:
    """native tok/s over each other engine's, per shape and N."""
    out = []
    by = {(r["engine"], r["model"], r["n"]): r for r in rows}
    for (engine, shape, n), r in by.items():
        if engine == "native":  # against native-piecewise/-eager too: what the graphs buy
            continue
        ours = by.get(("native", shape, n))
        if ours is not None:
            out.append({"model": shape, "n": n, "against": engine,
                        "native_speedup": round(ours["tok_s"] / r["tok_s"], 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.2-1b"], choices=sorted(SHAPES))
    ap.add_argument("--ns", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    engines = ["vllm", "native", "native-piecewise", "native-eager", "hf"]
    ap.add_argument("--engines", nargs="+", default=engines, choices=engines)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kv-gib", type=float, default=None, help="the native engine's KV cache")
    ap.add_argument("--vllm-memory", type=float, default=0.6, help="vLLM's gpu_memory_utilization")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--vllm-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vllm_child:
        vllm_child(args.vllm_child, args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/e2e_gpu.py: no CUDA device here; run it on the GPU machine (or --device cpu).")
        return 0
    from common import provenance, write_result

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for shape in args.shapes:
        if "vllm" in args.engines:  # first: its child process must find the GPU free
            got = bench_vllm(shape, args)
            if isinstance(got, str):
                skipped[f"vllm/{shape}"] = got
                print("vllm skipped:", got[:300], flush=True)
            else:
                rows += got
        for variant in ("native", "native-piecewise", "native-eager"):
            if variant in args.engines:
                rows += in_process(bench_native, shape, args, dtype, variant)
        if "hf" in args.engines:
            rows += in_process(bench_hf, shape, args, dtype)
    payload = {**provenance(), "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
               "what": "best-of-N sampling end to end: native engine vs vLLM n=N vs HF generate",
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k != "vllm_child"},
               "results": rows, "ratios": ratios(rows), "skipped": skipped}
    for r in payload["ratios"]:
        print(json.dumps(r), flush=True)
    print("wrote", write_result("e2e_gpu", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
