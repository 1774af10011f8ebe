"""Graceful shutdown of a real `alignserve serve` process: on SIGTERM it stops accepting, lets
in-flight requests finish within --shutdown-grace, aborts the rest (a stream gets an error
event and [DONE]), closes the engine and exits 0. Its logs are JSON lines with request ids.

One subprocess (it loads the model again: ~20-40 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

GRACE = 8.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(lines: Any) -> list[Any]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return out


def test_sigterm_drains_aborts_and_exits_zero(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "ALIGNSERVE_LOG_FORMAT": "json", "ALIGNSERVE_KV_CACHE_GIB": "0.25"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alignserve.cli", "serve", "--port", str(port),
             "--shutdown-grace", str(GRACE), "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)

        results: dict[str, Any] = {}
        streaming = threading.Event()

        def long_stream() -> None:
            body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": 3000, "ignore_eos": True, "stream": True}
            lines = []
            with httpx.Client(timeout=120) as c, c.stream(
                    "POST", url + "/v1/chat/completions", json=body,
                    headers={"X-Request-Id": "drain-long"}) as r:
                results["long_status"] = r.status_code
                for line in r.iter_lines():
                    lines.append(line)
                    if '"content":"' in line and '"content":""' not in line:
                        streaming.set()
            results["long_end"] = time.monotonic()
            results["long"] = _events(lines)

        short_started = threading.Event()

        def short() -> None:
            body = {"prompt": "The sea", "max_tokens": 12, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            lines = []
            with httpx.Client(timeout=120) as c, c.stream(
                    "POST", url + "/v1/completions", json=body,
                    headers={"X-Request-Id": "drain-short"}) as r:
                results["short_status"] = r.status_code
                for line in r.iter_lines():
                    lines.append(line)
                    short_started.set()
            results["short"] = _events(lines)

        long_thread = threading.Thread(target=long_stream)
        long_thread.start()
        assert streaming.wait(120), "the long stream never produced text"
        short_thread = threading.Thread(target=short)
        short_thread.start()
        assert short_started.wait(60)  # the short one is in flight
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        # stops accepting: new connections are refused while the old ones drain
        refused_by = sent + 3.0
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
            except httpx.ConnectError:
                break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < refused_by, "still accepting connections"
            time.sleep(0.1)

        assert proc.wait(timeout=GRACE + 60) == 0, log_path.read_text()[-3000:]
        exited = time.monotonic()
        long_thread.join(30)
        short_thread.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # the short request finished within the grace period, normally
    short_events = results["short"]
    assert results["short_status"] == 200 and short_events[-1] == "[DONE]"
    assert not any("error" in e for e in short_events[:-1])
    assert short_events[-2]["usage"]["completion_tokens"] == 12
    # the long stream was aborted at the end of the grace period: error event, then [DONE]
    events = results["long"]
    assert results["long_status"] == 200
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 503 and "shutting down" in events[-2]["error"]["message"]
    assert GRACE - 0.5 <= results["long_end"] - sent <= GRACE + 10
    assert exited - sent <= GRACE + 30

    # JSON logs, with request ids on the access lines; the engine was closed
    records = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert records, "no JSON log lines"
    access = {r["request_id"]: r for r in records if r["logger"] == "alignserve.access"}
    assert access["drain-short"]["status"] == 200
    assert access["drain-short"]["route"] == "/v1/completions"
    assert access["drain-short"]["completion_tokens"] == 12
    assert access["drain-long"]["status"] == 200 and access["drain-long"]["stream"] is True
    assert "shutting down" in access["drain-long"]["error"]
    messages = [r["msg"] for r in records]
    assert any(m.startswith("draining") for m in messages)
    assert any("aborting 1 request" in m for m in messages)
    assert "engine closed" in messages and "shut down cleanly" in messages
    assert all(isinstance(r["ts"], str) and r["level"] for r in records)
