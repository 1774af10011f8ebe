"""vLLM past one engine, on CPU: `serve --engine vllm --data-parallel-size 2` (two engine
replicas, one core each) serves every strategy; then graceful SIGTERM of that server: the
request in flight finishes, the process exits 0 and takes vLLM's engine cores with it.

The SIGTERM test ends this module's server, so it comes last.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest
from test_vllm_live import MESSAGES, STRATEGIES
from vllm_live import require_vllm, start_server


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    require_vllm()
    from alignserve.engine.native.loader import model_folder

    folder, _ = model_folder(None)
    log_path = tmp_path_factory.mktemp("vllm-dp") / "server.log"
    proc = start_server(["--engine", "vllm", "--data-parallel-size", "2", "--amateur",
                         f"small={folder}", "--kv-cache-gib", "1", "--shutdown-grace", "30"],
                        log_path)
    yield proc
    proc.stop()


def test_every_strategy_on_two_data_parallel_replicas(dp_server):
    assert "VLLM_CPU_OMP_THREADS_BIND=0|1" in dp_server.log_tail(10**6)  # one core each
    client = openai.OpenAI(base_url=dp_server.url + "/v1", api_key="x", max_retries=0,
                           timeout=300)
    for name, alignment in STRATEGIES.items():
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                           max_tokens=8, extra_body={"alignment": alignment})
        assert r.choices[0].message.content.strip(), name
        assert r.model_extra["alignment"]["strategy"] == alignment["strategy"]
    # requests spread over both replicas answer together
    results: list = []

    def one(i: int) -> None:
        results.append(client.completions.create(model="SmolLM2-135M-Instruct",
                                                 prompt=f"Fact number {i}:", max_tokens=6))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 4 and all(r.choices[0].text for r in results)
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                                 messages=MESSAGES, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_sigterm_finishes_the_request_in_flight_and_exits_zero(dp_server):
    me = psutil.Process(dp_server.proc.pid)
    cores = [p for p in me.children(recursive=True)]
    assert cores, "vLLM's engine cores run as child processes"
    events: list = []
    first = threading.Event()

    def stream() -> None:
        body = {"prompt": "The sea", "max_tokens": 24, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120) as c, c.stream("POST", dp_server.url + "/v1/completions",
                                                      json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    events.append(data if data == "[DONE]" else json.loads(data))
                    first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(120), "the stream never started"
    dp_server.proc.send_signal(signal.SIGTERM)
    assert dp_server.proc.wait(timeout=120) == 0, dp_server.log_tail()
    t.join(30)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert len(events) >= 2 and text
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in cores):
        assert time.monotonic() < deadline, "vLLM's engine cores outlived the server"
        time.sleep(0.5)
