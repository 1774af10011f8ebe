"""A client that goes away cancels its decode: the engine's sequences are freed, the server
records an abort and goes on serving."""

from __future__ import annotations

import time

import httpx
import pytest


def _wait_idle(engine, kv_baseline: int | None = None, timeout: float = 20.0) -> int:
    """Wait until nothing runs (and the KV cache is back to its baseline); returns KV use."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running_sequences == 0 and s.waiting_requests == 0 and (
                kv_baseline is None or s.kv_used_slots <= kv_baseline):
            return s.kv_used_slots
        time.sleep(0.05)
    s = engine.stats()
    raise AssertionError(f"engine still busy: {s.running_sequences} running, "
                         f"{s.kv_used_slots} KV slots used (baseline {kv_baseline})")


def _aborts(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('alignserve_request_success_total{finished_reason="abort"}'):
            return float(line.split()[-1])
    return 0.0


# Long enough that the decode is still running when the client leaves (~16 tok/s on CPU).
LONG = {"prompt": "Write a very long story about the sea.", "max_tokens": 2000,
        "ignore_eos": True, "n": 2}


def test_streaming_client_disconnect_cancels(live_server, http, model_name):
    kv = _wait_idle(live_server.engine)
    aborts = _aborts(http)
    body = {"model": model_name, "stream": True, **LONG}
    with httpx.Client(base_url=live_server.base_url, timeout=60) as c, \
            c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") or line == "" for line in got)
        assert live_server.engine.stats().running_sequences == 2
    # leaving the block closed the connection mid-stream
    _wait_idle(live_server.engine, kv)
    assert _aborts(http) == aborts + 1


def test_non_streaming_client_disconnect_cancels(live_server, http, model_name):
    kv = _wait_idle(live_server.engine)
    aborts = _aborts(http)
    with httpx.Client(base_url=live_server.base_url, timeout=1.5) as c, \
            pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={"model": model_name, **LONG})
    _wait_idle(live_server.engine, kv)
    deadline = time.monotonic() + 5
    while _aborts(http) < aborts + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborts(http) == aborts + 1
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
