"""vLLM's CPU build against alignserve, in one run on this CPU: vLLM's own OpenAI server,
`alignserve serve --engine vllm` and the native engine, one after the other (never two at
once), on the same Hugging Face folder (`alignserve model-path`) and the same vLLM settings
(eager, VLLM_CPU_KVCACHE_SPACE, threads bound to this process's cores).

One ~1.4K-token prompt (token ids, the same for every server), 64 tokens (ignore_eos,
temperature 1), over HTTP with the official openai client: plain samples n = 1, 8, 16 on every
server; best_of_n with 8 and 16 candidates and deal at its defaults on both alignserve engines.
`prefill` sends a prompt of the same length that no server has seen (its first token differs
per repeat), max_tokens 1: the prompt's prefill alone, with no prefix cache to hit; every other
case repeats one prompt, which vLLM's prefix cache and the native engine's `--prompt-cache`
(both on, as each server would run in production) serve without a prefill after the first.
All servers stay up and take turns (never two requests at once): for each case and repeat each
server answers the same request in turn, after one untimed warm-up each, so a busy machine
weighs on all of them alike; ratios between servers are medians of those back-to-back pairs.
While one server answers, the others' processes are stopped (SIGSTOP, `--no-pause` leaves them
idling): vLLM's OpenMP workers spin for a while after each of its requests, on the cores the
next server's request needs.
Each server's time to /health 200 is recorded from its launch (started one at a time). Goals (issue 13): `--engine vllm` best_of_n with 16
candidates <= 1.05x vLLM's own n=16; deal at defaults <= 2.5x a plain sample on --engine vllm;
`--engine vllm` healthy within 40 s of its start. Goals (issue 14, native against vLLM's own
server): n=1 at least vLLM's tokens/s, n=16 at least twice, prefill no slower, native
best_of_n 16 within 1.1x of native n=16.

Writes bench/results/vllm_cpu-*.json: device (CPU model and flags), commit, date, versions,
every timing, the ratios. The machine may be shared: the ratios come from one run, and the
spread of each timing (min, max) is kept beside its median.

    .venv/bin/python bench/vllm_cpu.py                 # ~10-15 min on 2 cores
    .venv/bin/python bench/vllm_cpu.py --reps 1 --servers alignserve-vllm   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

TOKENS = 64
SERVED = "SmolLM2-135M-Instruct"
TEXT = ("The history of the lighthouse begins with fires lit on hilltops to guide ships home. "
        "Over centuries, keepers tended lamps of oil and wick, then lenses that bent the light "
        "into beams seen far out at sea. Each coast had its own stories of storms and rescues, "
        "of keepers who rowed out through the surf, and of ships that found harbour because a "
        "light still burned. ")
SERVERS = ("vllm", "alignserve-vllm", "native")


def cpu_device() -> str:
    name, flags = "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "cpu":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    cores = len(os.sched_getaffinity(0))
    return f"{name}, {cores} cores, flags {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_ids(folder: str, target: int = 1400) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids: list[int] = []
    while len(ids) < target:
        ids += tok.encode(TEXT, add_special_tokens=False)
    return ids[:target] + tok.encode(" Tell the next part of the story:", add_special_tokens=False)


def launch(kind: str, folder: str, port: int, kv_gib: int, log: Path,
           block_size: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    py = sys.executable
    if kind == "vllm":  # vLLM alone, set up as alignserve sets it up on CPU
        from alignserve.engine.vllm.placement import cores, thread_binding

        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", thread_binding(cores(), 1))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
        cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
               "--served-model-name", SERVED, "--port", str(port), "--host", "127.0.0.1",
               "--enforce-eager", "--enable-prefix-caching"]
        if block_size:
            cmd += ["--block-size", str(block_size)]
    else:
        engine = "vllm" if kind == "alignserve-vllm" else "native"
        cmd = [py, "-m", "alignserve.cli", "serve", "--engine", engine, "--port", str(port),
               "--kv-cache-gib", str(kv_gib), "--log-level", "warning"]
        if engine == "native":  # vLLM's servers run with their prefix cache on
            cmd.append("--prompt-cache")
        if block_size and engine == "vllm":
            env["ALIGNSERVE_VLLM_ENGINE_ARGS"] = json.dumps({"block_size": block_size})
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"vllm_cpu: the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"vllm_cpu: not healthy after {timeout} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CASES = {  # label: (n, alignment or None for a plain sample)
    "prefill": (1, None),
    "sample_n1": (1, None), "sample_n8": (8, None), "sample_n16": (16, None),
    "best_of_n_8": (1, {"strategy": "best_of_n", "candidates": 8}),
    "best_of_n_16": (1, {"strategy": "best_of_n", "candidates": 16}),
    "deal_defaults": (1, {"strategy": "deal"}),
}


def cases(kind: str) -> list[str]:
    return [c for c, (_, a) in CASES.items() if kind != "vllm" or a is None]


def once(client, ids: list[int], label: str, rep: int = -1) -> tuple[float, object]:
    """One request; `prefill` with a prompt new to every server (its first token set by
    `rep`: each repeat's prompt is the same for every server, the warm-up's (-1) another)."""
    n, alignment = CASES[label]
    extra: dict = {"ignore_eos": True}
    if alignment:
        extra["alignment"] = alignment
    tokens = TOKENS
    if label == "prefill":
        ids, tokens = [1000 + rep + 1] + ids[1:], 1
    t0 = time.perf_counter()
    r = client.completions.create(model=SERVED, prompt=ids, max_tokens=tokens, n=n,
                                  temperature=1.0, extra_body=extra)
    return time.perf_counter() - t0, r


def summary(times: list[float], last) -> dict:
    row = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
           "max_s": round(max(times), 3), "reps": len(times), "times_s": [round(t, 3) for t in times],
           "completion_tokens": last.usage.completion_tokens,
           "prompt_tokens": last.usage.prompt_tokens}
    report = (last.model_extra or {}).get("alignment")
    if report:
        row["model_tokens"] = report.get("model_tokens")
        row["candidates_scored"] = report.get("candidates_scored")
    return row


@contextlib.contextmanager
def alone(procs: dict, kind: str):
    """The other servers' processes (with their children) stopped while `kind` answers: an
    idle server's threads must not spin on the cores (vLLM's OpenMP workers keep spinning
    for a while after each request) or take them between requests."""
    import psutil

    others = []
    for k, proc in procs.items():
        if k != kind:
            root = psutil.Process(proc.pid)
            others += [root, *root.children(recursive=True)]
    for p in others:
        p.suspend()
    try:
        yield
    finally:
        for p in others:
            p.resume()


def measure(clients: dict, ids: list[int], reps: int, procs: dict | None = None) -> dict:
    """Every case on every server, interleaved: for each repeat, each server in turn answers
    the same request (never two at once), so that a busy machine weighs on all of them alike;
    with `procs`, the others are stopped meanwhile (`alone`). One untimed warm-up request per
    server and case first."""
    times: dict = {k: {c: [] for c in cases(k)} for k in clients}
    last: dict = {k: {} for k in clients}

    def turn(k: str):
        return contextlib.nullcontext() if procs is None else alone(procs, k)

    for label in CASES:
        kinds = [k for k in clients if label in times[k]]
        for k in kinds:
            with turn(k):
                once(clients[k], ids, label)  # warm-up
        for r in range(reps):
            for k in kinds:
                with turn(k):
                    t, last[k][label] = once(clients[k], ids, label, r)
                times[k][label].append(t)
        for k in kinds:
            print(k, label, [round(t, 2) for t in times[k][label]], flush=True)
    return {k: {c: summary(times[k][c], last[k][c]) for c in times[k]} for k in clients}


def paired(results: dict, a: str, ca: str, b: str, cb: str) -> float:
    """Median over repeats of time(a, ca) / time(b, cb), each pair measured back to back."""
    ta, tb = results[a][ca]["times_s"], results[b][cb]["times_s"]
    return round(statistics.median(x / y for x, y in zip(ta, tb)), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    ap.add_argument("--block-size", type=int, default=None,
                    help="vLLM's KV block size for both vLLM servers (default: vLLM's own)")
    ap.add_argument("--no-pause", action="store_true",
                    help="leave the other servers running while one answers (they idle)")
    args = ap.parse_args()
    # a SIGTERM unwinds through `finally`, so the server being measured is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import openai

    from alignserve.engine.native.loader import model_folder

    folder, _ = model_folder(None)
    ids = prompt_ids(folder)
    logs = Path(tempfile.mkdtemp(prefix="vllm_cpu-logs-"))  # the servers' logs, not kept
    print("server logs in", logs, flush=True)
    procs, clients, ready = {}, {}, {}
    try:
        for kind in args.servers:  # one at a time: each start is timed on its own
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = logs / f"vllm_cpu-{kind}.log"
            procs[kind] = launch(kind, folder, port, args.kv_cache_gib, log, args.block_size)
            ready[kind] = round(wait_healthy(procs[kind], url, log), 1)
            print(kind, "healthy after", ready[kind], "s", flush=True)
            clients[kind] = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                          timeout=900)
        results = measure(clients, ids, args.reps, None if args.no_pause else procs)
    finally:
        for proc in procs.values():
            stop(proc)
    for kind in results:
        results[kind]["healthy_s"] = ready[kind]
    ratios = {}
    own, ours = results.get("vllm", {}), results.get("alignserve-vllm", {})
    if own and ours:
        ratios["bon16_vs_vllm_n16"] = paired(results, "alignserve-vllm", "best_of_n_16", "vllm",
                                             "sample_n16")
        ratios["sample_n16_vs_vllm_n16"] = paired(results, "alignserve-vllm", "sample_n16",
                                                  "vllm", "sample_n16")
        ratios["sample_n1_vs_vllm_n1"] = paired(results, "alignserve-vllm", "sample_n1", "vllm",
                                                "sample_n1")
    if ours:
        ratios["deal_vs_sample_n1"] = round(ours["deal_defaults"]["median_s"]
                                            / ours["sample_n1"]["median_s"], 3)
    if ours and results.get("native"):
        for label in ("sample_n1", "sample_n16", "best_of_n_16", "deal_defaults"):
            ratios[f"native_vs_vllm_{label}"] = paired(results, "native", label,
                                                       "alignserve-vllm", label)
    if own and results.get("native"):
        for label in ("prefill", "sample_n1", "sample_n8", "sample_n16"):
            ratios[f"native_vs_vllm_own_{label}"] = paired(results, "native", label, "vllm", label)
    if results.get("native"):
        ratios["native_bon16_vs_native_n16"] = paired(results, "native", "best_of_n_16", "native",
                                                      "sample_n16")
    goals = {}
    if "native_vs_vllm_own_sample_n1" in ratios:  # times: a ratio <= 1 is >= 1x the tokens/s
        goals["native_n1_at_least_vllm_tokps"] = ratios["native_vs_vllm_own_sample_n1"] <= 1.0
        goals["native_n16_at_least_2x_vllm_tokps"] = ratios["native_vs_vllm_own_sample_n16"] <= 0.5
        goals["native_prefill_no_slower"] = ratios["native_vs_vllm_own_prefill"] <= 1.0
    if "native_bon16_vs_native_n16" in ratios:
        goals["native_bon16_within_1.1x_of_n16"] = ratios["native_bon16_vs_native_n16"] <= 1.1
    if "bon16_vs_vllm_n16" in ratios:
        goals["bon16_within_1.05x_of_vllm_n16"] = ratios["bon16_vs_vllm_n16"] <= 1.05
    if ours:
        goals["deal_within_2.5x_of_sample"] = ratios["deal_vs_sample_n1"] <= 2.5
        goals["healthy_within_40s"] = ours["healthy_s"] <= 40
    import torch
    import vllm

    payload = {**provenance(cpu_device()), "versions": {"vllm": vllm.__version__,
                                                        "torch": torch.__version__},
               "prompt_tokens": len(ids), "max_tokens": TOKENS, "kv_cache_gib": args.kv_cache_gib,
               "block_size": args.block_size, "servers": args.servers,
               "others_paused": not args.no_pause, "results": results, "ratios": ratios, "goals": goals}
    path = write_result("vllm_cpu", payload)
    print("ratios", ratios, "goals", goals)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
