"""Every strategy on the vLLM engine, end to end on the lent GPU, timed against vLLM's own
n-sampling in the same run.

Needs a CUDA GPU, vLLM 0.25 (offline wheel set: ../shared/tools/vllm-gpu-wheels.sh) and the
server's `--engine vllm`; it installs nothing and exits with a message when any is missing.

1. The model: SmolLM2-135M's shape with random weights. `prepare` (any machine with the
   embedded model) writes its config and tokenizer files to a small folder that travels to the
   GPU; `run` adds seeded random weights there (safetensors in /tmp), so that vLLM and the side
   models of alignserve's logits processor (contrastive's `self:L` amateur, the token matrix VAS
   recovers hidden states with) read the same weights. `--load-format dummy` lets vLLM draw its
   own random weights instead (then those side models see other weights: a plumbing check).
2. Baseline: vLLM alone (vllm.LLM in a child process, no alignserve code) samples n = 1, 16, 64
   sequences of G tokens (ignore_eos) on a shared P-token random prompt, fresh each repeat.
3. The server: `python -m alignserve.cli serve --engine vllm --load-format auto|dummy
   --gpu-memory-utilization F --max-model-len L` in a child process (the other engine arguments,
   dtype and seed, through ALIGNSERVE_VLLM_ENGINE_ARGS); every strategy through the official
   openai client (/v1/completions, token-id prompts), each response checked (choices, finish
   reasons, token counts, the alignment report), and /metrics (alignserve_* and vLLM's vllm:*).
4. Ratios from the same run: sample n=16 and best_of_n with 16 and 64 candidates against vLLM's
   n=16 and n=64 (server-side seconds minus reward seconds, the goal being < 1.10), deal against
   a plain sample of the same length (goal <= 3), vas and contrastive against a plain sample.
Writes bench/results/vllm_gpu-*.json (and a copy to $OUT when set): device, commit, date,
versions, every timing and check.

    python bench/vllm_gpu.py prepare      # here: carry/vllm-bench (git-ignored, ~4 MB)
    # on the GPU machine, from the repository root, vLLM installed in /tmp/site:
    PYTHONPATH=/tmp/site:. python3 bench/vllm_gpu.py run --model-dir carry/vllm-bench
    PYTHONPATH=/tmp/site:. python3 bench/vllm_gpu.py run --load-format dummy   # no weights written
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import hf_config_kwargs, random_prompt

MODEL = "smollm2-135m"
SHAPE = hf_config_kwargs(MODEL)
ENGINE_ARGS = {"gpu_memory_utilization": 0.55, "max_model_len": 8192, "dtype": "bfloat16",
               "seed": 0, "enable_prefix_caching": True}


def _httpx():
    try:
        import httpx
    except ImportError:  # the GPU image's openai client ships httpx2
        import httpx2 as httpx
    return httpx


def fail(msg: str, code: int = 2) -> None:
    print(f"vllm_gpu: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# ---- 1. the model ---------------------------------------------------------------------------

def prepare(out: Path) -> None:
    """Config and tokenizer of a SmolLM2-135M-shaped model (no weights), from the embedded one."""
    from transformers import LlamaConfig

    from alignserve.engine.native.loader import load_tokenizer, resolve

    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(*resolve(None)[:2])
    tok.save_pretrained(out)
    LlamaConfig(**SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                torch_dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(out)
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) // 1024} KiB); carry it "
          f"to the GPU and run: python3 bench/vllm_gpu.py run --model-dir {out}")


def with_weights(src: Path, dst: Path, seed: int = 0) -> Path:
    """A copy of `src` with seeded random bf16 weights (written once)."""
    if any(dst.glob("*.safetensors")):
        return dst
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(src))
    model.to(torch.bfloat16).save_pretrained(dst, safe_serialization=True)
    print(f"random weights in {dst}", flush=True)
    return dst


# ---- 2. the baseline: vLLM alone ----------------------------------------------------------------

def baseline(model: str, engine_args: dict, prompt: int, gen: int, ns: list[int], reps: int) -> list[dict]:
    """Runs in a child process (so its GPU memory is gone before the server starts)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, **engine_args)
    rng = random.Random(1)
    rows = []
    for n in ns:
        sp = SamplingParams(n=n, max_tokens=gen, min_tokens=gen, ignore_eos=True, temperature=1.0)
        times = []
        for _ in range(reps + 1):  # the first is a warm-up
            ids = random_prompt(rng, MODEL, prompt)
            t = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
            assert len(out[0].outputs) == n and all(len(o.token_ids) == gen for o in out[0].outputs)
        rows.append({"n": n, "prompt": prompt, "gen": gen, "seconds": round(min(times[1:]), 4)})
        print(json.dumps({"baseline": rows[-1]}), flush=True)
    return rows


# ---- 3. the server ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_flags() -> str:
    out = subprocess.run([sys.executable, "-m", "alignserve.cli", "serve", "--help"],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    return out.stdout + out.stderr


# engine arguments `alignserve serve` has flags for; the others travel in the environment
SERVE_FLAGS = {"gpu_memory_utilization": "--gpu-memory-utilization",
               "max_model_len": "--max-model-len", "load_format": "--load-format",
               "tensor_parallel_size": "--tensor-parallel-size"}


def start_server(model: Path, port: int, engine_args: dict, extra: list[str], log: Path):
    flags = [x for k, flag in SERVE_FLAGS.items() if k in engine_args
             for x in (flag, str(engine_args[k]))]
    rest = {k: v for k, v in engine_args.items() if k not in SERVE_FLAGS}
    env = dict(os.environ, ALIGNSERVE_VLLM_ENGINE_ARGS=json.dumps(rest),
               VLLM_USE_FLASHINFER_SAMPLER="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "alignserve.cli", "serve", "--engine", "vllm", "--model", str(model),
           *flags, "--port", str(port), "--max-n", "64", "--max-candidates", "64", *extra]
    print("starting:", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_healthy(proc, url: str, log: Path, timeout: float = 900) -> float:
    httpx = _httpx()

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            fail(f"the server exited ({proc.returncode}); its log ends with:\n"
                 + log.read_text()[-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    fail("the server did not become healthy in time; log:\n" + log.read_text()[-4000:])
    return 0.0


class Runner:
    def __init__(self, url: str, model_name: str):
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        self.model = model_name
        self.rng = random.Random(2)
        self.checks: list[dict] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        if not ok:
            print(f"CHECK FAILED: {name}: {detail}", flush=True)
        return ok

    def once(self, prompt: int, gen: int, n: int, alignment: dict, ignore_eos: bool = True):
        ids = random_prompt(self.rng, MODEL, prompt)
        t = time.perf_counter()
        r = self.client.completions.create(
            model=self.model, prompt=ids, max_tokens=gen, n=n, temperature=1.0,
            extra_body={"alignment": alignment, "ignore_eos": ignore_eos})
        wall = time.perf_counter() - t
        return r, wall

    def timed(self, label: str, prompt: int, gen: int, n: int, alignment: dict, reps: int,
              exact_tokens: bool = True) -> dict:
        row = {"label": label, "prompt": prompt, "gen": gen, "n": n, "alignment": alignment}
        try:
            walls, server, strategy = [], [], []
            for i in range(reps + 1):
                r, wall = self.once(prompt, gen, n, alignment)
                rep = r.model_extra.get("alignment") or {}
                ok = self.check(f"{label}: {n} choices", len(r.choices) == n,
                                f"got {len(r.choices)}")
                for c in r.choices:
                    ok &= self.check(f"{label}: choice report", "alignment" in (c.model_extra or {}),
                                     str(c.model_extra))
                    ok &= self.check(f"{label}: finish reason", c.finish_reason in ("length", "stop"),
                                     str(c.finish_reason))
                if exact_tokens:
                    self.check(f"{label}: completion tokens", r.usage.completion_tokens == n * gen,
                               f"{r.usage.completion_tokens} != {n * gen}")
                self.check(f"{label}: report", rep.get("strategy") == alignment["strategy"]
                           and rep.get("model_tokens", 0) > 0, json.dumps(rep))
                if i:  # the first is a warm-up
                    walls.append(wall)
                    server.append(rep.get("seconds", wall))
                    strategy.append(rep.get("seconds", wall) - rep.get("reward_seconds", 0.0))
                    row["model_tokens"] = rep.get("model_tokens")
                    row["text"] = r.choices[0].text[:80]
            row.update(wall_s=round(min(walls), 4), server_s=round(min(server), 4),
                       before_reward_s=round(min(strategy), 4), ok=True)
        except Exception as e:  # noqa: BLE001  (recorded; the other strategies still run)
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
            self.check(f"{label}: request", False, row["error"])
        print(json.dumps({k: v for k, v in row.items() if k != "text"}), flush=True)
        return row


def check_metrics(r: Runner, text: str) -> list[str]:
    """/metrics must carry ours and vLLM's; returns the metric names it has."""
    for name in ("alignserve_prefill_tokens_total", "alignserve_model_tokens_total",
                 "alignserve_strategy_requests_total", "alignserve_num_requests_running"):
        r.check(f"/metrics has {name}", name in text)
    r.check("/metrics has vLLM's vllm:* metrics", "vllm:" in text,
            "append engine.metrics_text() to /metrics" if "vllm:" not in text else "")
    return sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines()
                   if line and not line.startswith("#")})


def value_model_dir(model: Path, dst: Path) -> Path:
    """A random value head for the served model's shape (when no shipped one applies)."""
    import torch

    from alignserve.rewardmodels.value.model import ValueHead, ValueModel, ValueModelConfig

    if (dst / "config.json").is_file():
        return dst
    torch.manual_seed(3)
    head = ValueHead(SHAPE["hidden_size"], rank=16)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.05)
    cfg = ValueModelConfig(base_model=model.name, hidden_size=SHAPE["hidden_size"],
                           vocab_size=SHAPE["vocab_size"], rank=16, description="random (bench)")
    return ValueModel(head, cfg, name="bench-random").save(dst)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("vllm", "torch", "transformers", "fastapi", "uvicorn", "openai",
                           "prometheus_client", "jsonschema", "regex")
               if importlib.util.find_spec(m) is None]
    if not (importlib.util.find_spec("httpx") or importlib.util.find_spec("httpx2")):
        missing.append("httpx")
    if missing:
        fail(f"missing Python packages: {', '.join(missing)}. vLLM 0.25 installs offline from the "
             "wheel set of ../shared/tools/vllm-gpu-wheels.sh; add the others' wheels the same way.")
    import torch

    if not torch.cuda.is_available():
        fail("no CUDA device: this benchmark runs on the lent GPU machine only")
    flags = serve_flags()
    missing_flags = [f for f in ("--engine", "--load-format", *SERVE_FLAGS.values()) if f not in flags]
    if "vllm" not in flags or missing_flags:
        fail("`alignserve serve` lacks `--engine vllm` or " + ", ".join(missing_flags)
             + ": this checkout's CLI does not match the benchmark")
    import vllm
    from common import provenance, write_result

    src = Path(args.model_dir)
    if not (src / "config.json").is_file():
        fail(f"{src} has no config.json: run `python bench/vllm_gpu.py prepare --out {src}` on a "
             "machine with the embedded model and carry the folder")
    engine_args = dict(ENGINE_ARGS)
    if args.load_format == "dummy":  # vLLM draws its weights; so do the side models (seeded)
        model, engine_args["load_format"] = src, "dummy"
    else:
        model, engine_args["load_format"] = with_weights(src, Path(args.work) / "model"), "auto"
    P, G = args.prompt, args.gen
    result: dict = {"bench": "vllm_gpu", **provenance(), "vllm": vllm.__version__,
                    "torch": torch.__version__, "engine_args": engine_args,
                    "load_format": args.load_format, "prompt_tokens": P, "gen_tokens": G}

    # 2. vLLM alone, in a child process
    base_json = Path(args.work) / "baseline.json"
    if not args.skip_baseline:
        t = time.time()
        code = subprocess.run([sys.executable, __file__, "baseline", "--model", str(model),
                               "--engine-args", json.dumps(engine_args), "--prompt", str(P),
                               "--gen", str(G), "--reps", str(args.reps), "--out", str(base_json)],
                              cwd=ROOT, check=False).returncode
        if code:
            fail(f"the vLLM baseline failed ({code})")
        result["baseline_wall_s"] = round(time.time() - t, 1)
    base = {row["n"]: row["seconds"] for row in json.loads(base_json.read_text())}
    result["baseline"] = base

    # 3. the server
    extra = []
    if "--value-model" in flags:
        extra += ["--value-model", f"bench={value_model_dir(model, Path(args.work) / 'value')}"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(args.work) / "server.log"
    proc = start_server(model, port, engine_args, extra, log)
    try:
        result["server_startup_s"] = round(wait_healthy(proc, url, log), 1)
        httpx = _httpx()

        served = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        r = Runner(url, served)
        kw = {"prompt": P, "gen": G, "reps": args.reps}
        rows = [
            r.timed("sample n=1", n=1, alignment={"strategy": "sample"}, **kw),
            r.timed("sample n=16", n=16, alignment={"strategy": "sample"}, **kw),
            r.timed("best_of_n 16", n=1, alignment={"strategy": "best_of_n", "candidates": 16}, **kw),
            r.timed("best_of_n 64", n=1, alignment={"strategy": "best_of_n", "candidates": 64}, **kw),
            r.timed("best_of_n 16 +reward", n=1, alignment={
                "strategy": "best_of_n", "candidates": 16,
                "rewards": [{"name": "keywords", "keywords": ["the", "a"]}]}, **kw),
            r.timed("vas n=1", n=1, alignment={"strategy": "vas"}, **kw),
            r.timed("vas n=16", n=16, alignment={"strategy": "vas"}, **kw),
            r.timed("contrastive self:8 n=1", n=1,
                    alignment={"strategy": "contrastive", "amateur": "self:8"}, **kw),
            r.timed("contrastive self:8 n=16", n=16,
                    alignment={"strategy": "contrastive", "amateur": "self:8"}, **kw),
            r.timed("contrastive lame_prompt n=1", n=1, alignment={
                "strategy": "contrastive", "amateur": "lame_prompt", "lame_prompt": "Hello"}, **kw),
        ]
        dg = args.deal_gen
        dkw = {"prompt": P, "gen": dg, "reps": max(1, args.reps - 1)}
        rows += [
            r.timed(f"sample n=1 ({dg} tokens)", n=1, alignment={"strategy": "sample"}, **dkw),
            r.timed("deal default", n=1, alignment={"strategy": "deal"}, exact_tokens=False, **dkw),
            r.timed("deal top_k=2 lookahead=4 beam=1 commit=4", n=1, exact_tokens=False, alignment={
                "strategy": "deal", "top_k": 2, "lookahead": 4, "beam": 1, "commit": 4}, **dkw),
            r.timed("deal +reward", n=1, exact_tokens=False, alignment={
                "strategy": "deal", "rewards": [{"name": "keywords", "keywords": ["the"]}]}, **dkw),
        ]
        result["strategies"] = rows
        by = {row["label"]: row for row in rows}

        def ratio(label: str, ref: float | None, key: str = "before_reward_s"):
            row = by.get(label)
            if not row or not row.get("ok") or not ref:
                return None
            return round(row[key] / ref, 3)

        ref_deal = by.get(f"sample n=1 ({dg} tokens)", {}).get("server_s")
        ref_s1 = by.get("sample n=1", {}).get("server_s")
        ref_s16 = by.get("sample n=16", {}).get("server_s")
        result["ratios"] = {
            "sample n=1 / vLLM n=1": ratio("sample n=1", base.get(1)),
            "sample n=16 / vLLM n=16": ratio("sample n=16", base.get(16)),
            "best_of_n 16 / vLLM n=16": ratio("best_of_n 16", base.get(16)),
            "best_of_n 64 / vLLM n=64": ratio("best_of_n 64", base.get(64)),
            "best_of_n 16 wall / vLLM n=16": ratio("best_of_n 16", base.get(16), "wall_s"),
            "deal default / sample": ratio("deal default", ref_deal, "server_s"),
            "deal fast / sample": ratio("deal top_k=2 lookahead=4 beam=1 commit=4", ref_deal, "server_s"),
            "vas n=1 / sample n=1": ratio("vas n=1", ref_s1, "server_s"),
            "vas n=16 / sample n=16": ratio("vas n=16", ref_s16, "server_s"),
            "contrastive self:8 n=1 / sample n=1": ratio("contrastive self:8 n=1", ref_s1, "server_s"),
            "contrastive self:8 n=16 / sample n=16": ratio("contrastive self:8 n=16", ref_s16, "server_s"),
        }
        result["goals"] = {
            "best_of_n adds < 10% to vLLM's n-sampling (before rewards)": [
                v is not None and v < 1.10 for v in (result["ratios"]["best_of_n 16 / vLLM n=16"],
                                                     result["ratios"]["best_of_n 64 / vLLM n=64"])],
            "deal <= 3x a plain sample of the same length (fast config)":
                (result["ratios"]["deal fast / sample"] or 99) <= 3.0,
            "deal <= 3x a plain sample of the same length (default config)":
                (result["ratios"]["deal default / sample"] or 99) <= 3.0,
        }
        result["metrics_names"] = check_metrics(r, httpx.get(url + "/metrics").text)
        result["checks"] = r.checks
        result["checks_failed"] = sum(not c["ok"] for c in r.checks)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        result["server_log_tail"] = log.read_text()[-3000:] if log.exists() else ""
    path = write_result("vllm_gpu", result)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
        shutil.copy(log, Path(os.environ["OUT"]) / "server.log")
    print(json.dumps({"ratios": result["ratios"], "goals": result["goals"],
                      "checks_failed": result["checks_failed"]}, indent=1))
    print(f"wrote {path}")
    return 1 if result["checks_failed"] else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="write the model folder's config and tokenizer")
    a.add_argument("--out", default="carry/vllm-bench")
    r = sub.add_parser("run", help="the benchmark (on the GPU machine)")
    r.add_argument("--model-dir", default="carry/vllm-bench")
    r.add_argument("--work", default="/tmp/alignserve-vllm-bench")
    r.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    r.add_argument("--prompt", type=int, default=1024)
    r.add_argument("--gen", type=int, default=128)
    r.add_argument("--deal-gen", type=int, default=32)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--skip-baseline", action="store_true",
                   help="reuse WORK/baseline.json from an earlier call")
    b = sub.add_parser("baseline", help=argparse.SUPPRESS)
    b.add_argument("--model")
    b.add_argument("--engine-args")
    b.add_argument("--prompt", type=int)
    b.add_argument("--gen", type=int)
    b.add_argument("--reps", type=int)
    b.add_argument("--out")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out))
        return 0
    if args.cmd == "baseline":
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        rows = baseline(args.model, json.loads(args.engine_args), args.prompt, args.gen,
                        [1, 16, 64], args.reps)
        Path(args.out).write_text(json.dumps(rows))
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
