"""The embedded model's load time: converted from its GGUF (an empty cache folder) against read
from the conversion cache (alignserve/engine/native/gguf_cache.py), side by side in one run,
each in a fresh process (--repeats rounds). Writes bench/results/load_time-*.json.

    .venv/bin/python bench/load_time.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result

LOAD = ("import torch; from alignserve.engine.native.loader import load_model; "
        "load_model(None, torch.device('cpu'), torch.float32)")


def load_seconds(cache_dir: str) -> float:
    """Wall time of one load in a fresh interpreter (imports included, as a server start has)."""
    env = {**os.environ, "ALIGNSERVE_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"convert": [], "cached": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            times["convert"].append(load_seconds(cache))  # empty folder: converts, then caches
            times["cached"].append(load_seconds(cache))
        print({k: round(v[-1], 1) for k, v in times.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"seconds": times, "median_s": {k: round(v, 1) for k, v in med.items()},
              "speedup": round(med["convert"] / med["cached"], 1)}
    print(result)
    print("wrote", write_result("load_time", {**provenance(), "args": vars(args), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
