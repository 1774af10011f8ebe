"""Shared fixtures: one real server (real uvicorn, real embedded model) per test session.

Loading SmolLM2-135M takes ~20 s on CPU, so the engine loads once and the server runs in a
background thread on a free loopback port for the whole session. Tests reach it over HTTP with
the official `openai` client or httpx, exactly as users do.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from alignserve.server.probe import wait_healthy

# Limits the live server runs with; tests that probe limits read them from here.
SERVER_LIMITS = {"max_n": 8, "max_candidates": 16, "max_tokens_limit": 4096, "max_rewards": 8}


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    engine: Any  # the NativeEngine behind it (same process: tests may read engine.stats())
    settings: Any
    model: str  # the served model name


@pytest.fixture(scope="session")
def native_engine() -> Any:
    from alignserve.engine.native.engine import NativeEngine

    return NativeEngine.load()


@pytest.fixture
def exact_engine(live_server: LiveServer) -> Iterator[Any]:
    """The live server's engine in exact fp32, for tests that hold it to transformers' numbers
    or to itself across batch shapes, which bf16 linears and a bf16 KV pool (cpu_linear.py,
    tested in test_cpu_linear.py) would round."""
    engine = live_server.engine
    engine.set_exact(True)
    yield engine
    engine.set_exact(False)


@pytest.fixture(scope="session")
def live_server(native_engine: Any) -> Iterator[LiveServer]:
    import uvicorn

    from alignserve.server.app import create_app
    from alignserve.server.settings import ServerSettings

    settings = ServerSettings(host="127.0.0.1", port=0, **SERVER_LIMITS)
    app = create_app(native_engine, settings)
    # Bind first and hand uvicorn the socket: no race for the port between choosing and binding.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="alignserve-test-server")
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    if not wait_healthy(base_url, thread.is_alive, timeout=120):
        raise RuntimeError("the test server did not become healthy")
    yield LiveServer(base_url=base_url, engine=native_engine, settings=settings,
                     model=settings.served_model_name or native_engine.model_name)
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="session")
def base_url(live_server: LiveServer) -> str:
    return live_server.base_url


@pytest.fixture(scope="session")
def model_name(live_server: LiveServer) -> str:
    return live_server.model


@pytest.fixture(scope="session")
def client(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="x", max_retries=0,
                      timeout=180)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, timeout=180) as c:
        yield c


# ---- real vLLM (its CPU build): one `serve --engine vllm` process per test session --------------

@dataclass
class VllmServer:
    process: Any  # vllm_live.ServerProcess
    base_url: str
    folder: str  # the Hugging Face folder vLLM serves (the embedded model, converted)
    amateur: str  # the name of the served amateur (`--amateur`)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory) -> Iterator[VllmServer]:
    from vllm_live import require_vllm, start_server

    require_vllm()
    from alignserve.engine.native.loader import model_folder

    folder, _ = model_folder(None)
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    # the expert's folder doubles as a served amateur: contrastive with a named model runs
    # its own side model in vLLM's engine core
    proc = start_server(["--engine", "vllm", "--amateur", f"small={folder}", "--max-n", "8",
                         "--kv-cache-gib", "1", "--shutdown-grace", "5", "--log-level", "info"],
                        log_path)
    yield VllmServer(proc, proc.url, folder, "small")
    code = proc.stop()
    assert code == 0, proc.log_tail()


@pytest.fixture(scope="session")
def vllm_client(vllm_server: VllmServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=vllm_server.base_url + "/v1", api_key="x", max_retries=0,
                      timeout=300)
    yield c
    c.close()
