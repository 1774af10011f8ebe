"""The GPU benchmarks run only where a GPU is lent, so their code paths are smoke-run here on
a CPU with a tiny random model: a broken benchmark is found now, not when device time is spent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_gpu_bench_runs_native_and_hf_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "e2e_gpu.py"), "--device", "cpu", "--shapes", "tiny",
           "--ns", "2", "5", "--prompt", "24", "--gen", "6", "--reps", "1",
           "--engines", "native", "native-piecewise", "native-eager", "hf", "vllm", "--kv-gib", "0.01",
           "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (result,) = tmp_path.glob("e2e_gpu-*.json")
    payload = json.loads(result.read_text())
    rows = {(row["engine"], row["n"]): row for row in payload["results"]}
    engines = ("native", "native-piecewise", "native-eager", "hf")
    assert set(rows) == {(e, n) for e in engines for n in (2, 5)}
    for row in rows.values():
        assert row["seconds"] > 0
        assert abs(row["tok_s"] - row["n"] * 6 / row["seconds"]) <= 0.01 * row["tok_s"] + 1
    assert rows[("native", 5)]["steps_per_request"] >= 6  # a step per new token, at least
    # the graph paths ran (uncaptured on a CPU): whole steps only where they are allowed
    graphs = rows[("native", 5)]["cuda_graphs"]
    assert graphs["whole_steps"] > 0 and graphs["whole_failed"] is None and not graphs["captured"]
    assert rows[("native-piecewise", 5)]["cuda_graphs"]["whole_steps"] == 0
    assert rows[("native-piecewise", 5)]["cuda_graphs"]["steps"] > 0
    assert rows[("native-eager", 5)]["cuda_graphs"] is None
    assert {(x["n"], x["against"]) for x in payload["ratios"]} == {
        (n, e) for n in (2, 5) for e in ("hf", "native-eager", "native-piecewise")}
    # the GPU bench's vLLM rows need CUDA: said, not hidden
    assert "CUDA only" in payload["skipped"]["vllm/tiny"]
    assert payload["device"] and payload["commit"] and payload["date"]


def test_decode_gpu_bench_runs_every_path_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "decode_gpu.py"), "--device", "cpu", "--models", "tiny",
           "--batches", "1", "3", "--prompt", "40", "--leaf", "5", "--iters", "2", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (result,) = tmp_path.glob("decode_gpu-*.json")
    payload = json.loads(result.read_text())
    assert [row["batch"] for row in payload["results"]] == [1, 3]
    for row in payload["results"]:
        assert row["eager_ms"] > 0 and row["graphs_ms"] > 0 and row["whole_ms"] > 0
        # the three paths compute the same step
        assert row["max_abs_logit_diff"] < 1e-4 and row["whole_max_abs_logit_diff"] < 1e-4
    assert payload["dtype"] == "float32" and payload["device"] and payload["commit"]


def test_host_step_bench_splits_the_step(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "host_step.py"), "--n", "4", "--gen", "8", "--reps", "1",
           "--plan-iters", "3", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (result,) = tmp_path.glob("host_step-*.json")
    (row,) = json.loads(result.read_text())["results"]
    assert row["steps"] >= 8  # a prefill step, then a step per token
    assert row["plan_graphs_us"] > 0 and row["plan_eager_us"] > 0
    assert row["forward_ms"] > 0 and row["sample_ms"] > 0 and row["in_step_ms"] > 0
    total = row["in_step_ms"] + row["outside_ms"] + row["forward_ms"] + row["sample_ms"]
    assert abs(total - row["wall_per_step_ms"]) < 0.01 * row["wall_per_step_ms"] + 0.01


def test_vllm_gpu_bench_client_reads_a_real_server(live_server, monkeypatch):
    """bench/vllm_gpu.py's client side (requests, response checks, timings, /metrics checks),
    run against the live native server: its vLLM run is then only about vLLM."""
    import httpx

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import vllm_gpu

    r = vllm_gpu.Runner(live_server.base_url, live_server.model)
    rows = [
        r.timed("sample n=2", prompt=12, gen=3, n=2, alignment={"strategy": "sample"}, reps=1),
        r.timed("best_of_n 3 +reward", prompt=12, gen=3, n=1, reps=1, alignment={
            "strategy": "best_of_n", "candidates": 3,
            "rewards": [{"name": "keywords", "keywords": ["the"]}]}),
        r.timed("deal", prompt=12, gen=3, n=1, reps=1, exact_tokens=False, alignment={
            "strategy": "deal", "top_k": 2, "lookahead": 2, "beam": 1}),
    ]
    for row in rows:
        assert row["ok"], row
        assert 0 < row["before_reward_s"] <= row["server_s"] and row["wall_s"] > 0
        assert row["model_tokens"] > 0
    assert all(c["ok"] for c in r.checks), [c for c in r.checks if not c["ok"]]
    # /metrics: ours are there; vLLM's are not on the native engine, and the check says so
    names = vllm_gpu.check_metrics(r, httpx.get(live_server.base_url + "/metrics").text)
    assert "alignserve_model_tokens_total" in names
    failed = [c["check"] for c in r.checks if not c["ok"]]
    assert failed == ["/metrics has vLLM's vllm:* metrics"]
