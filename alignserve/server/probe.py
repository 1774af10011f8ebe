"""Client side: wait until an alignserve server answers GET /health with 200 (used by the
evaluation's spawned server, the load benchmark and the tests' in-process servers)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable


def healthy(base_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):  # refused, 503, timeout: not (yet) healthy
        return False


def wait_healthy(base_url: str, alive: Callable[[], bool] = lambda: True,
                 timeout: float = 120.0, interval: float = 0.2) -> bool:
    """True once /health answers 200; False as soon as `alive()` is false (the server's
    process or thread has ended) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if healthy(base_url):
            return True
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(interval)
