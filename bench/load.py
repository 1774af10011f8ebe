"""Load: N concurrent streaming clients mixing strategies against a server on loopback.

Starts `alignserve serve` (the embedded model) on a free loopback port unless --url names a
running server, warms it up, then keeps --clients streaming clients busy for --duration
seconds, each sending one request after another and cycling through the strategy mix (chat
and completions, `sample`, `best_of_n`, `deal`, `vas`, `contrastive`). Reports p50/p99 time to
first token (first non-empty text) and latency overall and per strategy, errors (non-200, an
error event, a stream without [DONE], a transport error; goal 0), and the server's RSS after
the warm-up, at its peak and once the load has ended (goal: under 5% growth). Writes
bench/results/load-*.json with device, commit and date.

    .venv/bin/python bench/load.py [--clients 32] [--duration 60] [--max-tokens 32]
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --server-pid PID

A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

from alignserve.server.probe import wait_healthy

PROMPTS = ["Describe the ocean in two sentences.", "Write a short note about whales.",
           "Tell me about a rainy day in the city.", "Explain why the sky is blue.",
           "Give me three tips for a calm morning.", "What makes a good story?"]
REWARDS = [{"name": "keywords", "weight": 1.0, "keywords": ["blue", "sea", "calm"]},
           {"name": "length", "weight": 0.5, "target_words": 20}]

# (label, route, alignment): the mix each client cycles through
MIX: list[tuple[str, str, dict[str, Any]]] = [
    ("sample/chat", "chat", {"strategy": "sample"}),
    ("best_of_n", "chat", {"strategy": "best_of_n", "candidates": 4, "rewards": REWARDS}),
    ("sample/completions", "completions", {"strategy": "sample", "rewards": REWARDS}),
    ("deal", "chat", {"strategy": "deal", "top_k": 3, "lookahead": 4, "beam": 2,
                      "rewards": REWARDS}),
    ("vas", "chat", {"strategy": "vas"}),
    ("contrastive", "chat", {"strategy": "contrastive"}),
]


@dataclass
class Sample:
    label: str
    ok: bool
    ttft: float | None
    latency: float
    tokens: int
    error: str | None = None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return round(values[k], 4)


def _summary(samples: list[Sample]) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    lat = [s.latency for s in ok]
    return {"requests": len(samples), "ok": len(ok), "errors": len(samples) - len(ok),
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
            "latency_p50_s": _pct(lat, 0.5), "latency_p99_s": _pct(lat, 0.99),
            "latency_mean_s": round(statistics.fmean(lat), 4) if lat else None,
            "completion_tokens": sum(s.tokens for s in ok)}


def _body(route: str, alignment: dict[str, Any], prompt: str, max_tokens: int) -> dict:
    common = {"max_tokens": max_tokens, "stream": True, "alignment": alignment,
              "stream_options": {"include_usage": True}, "temperature": 0.8}
    if route == "chat":
        return {"messages": [{"role": "user", "content": prompt}], **common}
    return {"prompt": prompt, **common}


async def one_request(client: httpx.AsyncClient, label: str, route: str,
                      alignment: dict[str, Any], prompt: str, max_tokens: int) -> Sample:
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    start = time.perf_counter()
    ttft: float | None = None
    tokens, done, error = 0, False, None
    try:
        async with client.stream("POST", path, json=_body(route, alignment, prompt,
                                                           max_tokens)) as r:
            if r.status_code != 200:
                await r.aread()
                return Sample(label, False, None, time.perf_counter() - start, 0,
                              f"HTTP {r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = f"error event: {chunk['error'].get('message', '')[:200]}"
                    continue
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content") or choice.get("text")
                    if text and ttft is None:
                        ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    latency = time.perf_counter() - start
    if error is None and not done:
        error = "stream ended without [DONE]"
    return Sample(label, error is None, ttft, latency, tokens, error)


async def client_loop(i: int, client: httpx.AsyncClient, until: float, run: Run,
                      max_tokens: int) -> None:
    n = i
    while time.monotonic() < until:
        label, route, alignment = MIX[n % len(MIX)]
        prompt = PROMPTS[(n * 7 + i) % len(PROMPTS)]
        run.samples.append(await one_request(client, label, route, alignment, prompt,
                                             max_tokens))
        n += 1


async def load(url: str, clients: int, seconds: float, max_tokens: int,
               proc: psutil.Process | None, peak: list[int]) -> Run:
    run = Run()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        until = time.monotonic() + seconds

        async def watch() -> None:
            while time.monotonic() < until:
                if proc is not None:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(client_loop(i, client, until, run, max_tokens)
                               for i in range(clients)))
        watcher.cancel()
    return run


def wait_idle(url: str, timeout: float = 120.0) -> None:
    """Until the server has nothing running or waiting (read from /metrics)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        busy = 0.0
        for line in text.splitlines():
            if line.startswith(("alignserve_num_requests_running ",
                                "alignserve_num_requests_waiting ",
                                "alignserve_server_requests_running ")):
                busy += float(line.split()[-1])
        if busy == 0:
            return
        time.sleep(0.5)


def rss_settled(proc: psutil.Process | None, seconds: float = 5.0) -> int | None:
    if proc is None:
        return None
    time.sleep(seconds)
    return proc.memory_info().rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one on loopback)")
    ap.add_argument("--server-pid", type=int, help="its pid, for RSS (with --url)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of load first")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--serve-args", default="", help="extra `alignserve serve` flags")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    server = None
    url = args.url
    proc = psutil.Process(args.server_pid) if args.server_pid else None
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"alignserve-load-{os.getpid()}.log"
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "alignserve.cli", "serve", "--port", str(port),
               "--log-level", "warning", "--no-access-log", *args.serve_args.split()]
        with open(log_path, "w") as log:
            server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        proc = psutil.Process(server.pid)
        if not wait_healthy(url, lambda: server.poll() is None, timeout=300):
            print(log_path.read_text()[-2000:], file=sys.stderr)
            return 1
            time.sleep(0.5)
    try:
        rss_loaded = proc.memory_info().rss if proc else None
        print(f"server up at {url}; warming up {args.warmup:g} s with {args.clients} clients",
              flush=True)
        peak = [0]
        warm = asyncio.run(load(url, args.clients, args.warmup, args.max_tokens, proc, peak))
        wait_idle(url)
        rss_before = rss_settled(proc)
        print(f"load: {args.clients} streaming clients for {args.duration:g} s", flush=True)
        peak = [rss_before or 0]
        started = time.monotonic()
        run = asyncio.run(load(url, args.clients, args.duration, args.max_tokens, proc, peak))
        wall = time.monotonic() - started
        wait_idle(url)
        rss_after = rss_settled(proc)
        metrics_text = httpx.get(url + "/metrics", timeout=10).text
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)

    overall = _summary(run.samples)
    per = {label: _summary([s for s in run.samples if s.label == label])
           for label, _, _ in MIX}
    errors: dict[str, int] = {}
    for s in run.samples:
        if not s.ok:
            errors[s.error or "?"] = errors.get(s.error or "?", 0) + 1
    growth = (None if not (rss_before and rss_after)
              else round(100.0 * (rss_after - rss_before) / rss_before, 2))
    mib = 1 / 2**20
    payload = {
        **provenance(),
        "bench": "load",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {"clients": args.clients, "duration_s": args.duration,
                   "warmup_s": args.warmup, "max_tokens": args.max_tokens,
                   "mix": [m[0] for m in MIX], "serve_args": args.serve_args},
        "wall_s": round(wall, 2),
        "overall": overall,
        "requests_per_s": round(overall["ok"] / wall, 3),
        "completion_tokens_per_s": round(overall["completion_tokens"] / wall, 2),
        "per_strategy": per,
        "errors": errors,
        "warmup": _summary(warm.samples),
        "rss_mib": {"loaded": rss_loaded and round(rss_loaded * mib, 1),
                    "before_load": rss_before and round(rss_before * mib, 1),
                    "peak": round(peak[0] * mib, 1) if peak[0] else None,
                    "after_load": rss_after and round(rss_after * mib, 1),
                    "growth_percent": growth},
        "server_aborts": [line for line in metrics_text.splitlines()
                          if line.startswith("alignserve_request_aborts_total{")],
    }
    print(json.dumps({k: payload[k] for k in ("overall", "requests_per_s", "rss_mib",
                                               "errors")}, indent=2))
    for label, stats in per.items():
        print(f"  {label:20s} n={stats['requests']:4d} err={stats['errors']} "
              f"ttft p50/p99 {stats['ttft_p50_s']}/{stats['ttft_p99_s']} s  "
              f"latency p50/p99 {stats['latency_p50_s']}/{stats['latency_p99_s']} s")
    if not args.no_write:
        print("wrote", write_result("load", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
