"""What every benchmark records beside its numbers: device, commit, date."""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def provenance(device: str | None = None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, cwd=Path(__file__).parent,
                                    check=False).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    if device is None:
        import torch

        device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                  else f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return {"device": device, "commit": commit + ("-dirty" if dirty else ""),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def median_ms(fn, iters: int) -> float:
    """Median wall time of fn() in milliseconds, after one untimed call (CPU benches)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def write_result(name: str, payload: dict, folder: Path | None = None) -> Path:
    folder = folder or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = folder / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_step_ratio(name: str, what: str, extra: dict, runs: dict[str, list[dict]],
                     rows: tuple[int, ...], base: str, other: str) -> Path:
    """Median ms per decode step of each variant and row count over its rounds (a round's keys
    may be ints or, from a child's JSON, strings), `other`'s over `base`'s as OTHER_vs_BASE:
    printed, and written as bench/results/NAME-*.json with provenance, `extra` and every run."""
    import statistics

    summary = {variant: {n: round(statistics.median(run.get(n, run.get(str(n))) for run in rs), 1)
                         for n in rows} for variant, rs in runs.items()}
    key = f"{other}_vs_{base}"
    ratios = {n: round(summary[other][n] / summary[base][n], 3) for n in rows}
    print(json.dumps({"ms_per_step": summary, key: ratios}))
    path = write_result(name, {**provenance(), **extra, "what": what, "ms_per_step": summary,
                               key: ratios, "runs": runs})
    print("wrote", path)
    return path


def alternate_children(script: str, kinds: list[str], rounds: int, args: list[str]):
    """Yield (round, kind, result) running `script --child KIND *args` in fresh interpreters, the
    kinds taking turns `rounds` times (a busy machine weighs on each alike); a child prints its
    result as JSON on its last line. For settings that last a process's lifetime."""
    import sys

    for r in range(rounds):
        for kind in kinds:
            done = subprocess.run([sys.executable, script, "--child", kind, *args],
                                  capture_output=True, text=True, check=True)
            yield r, kind, json.loads(done.stdout.strip().splitlines()[-1])
