"""The strategies' evaluation on the embedded model on CPU: spawns `alignserve serve --device cpu`,
runs every task set with every strategy configuration where it is meaningful (see
alignserve/evaluation/strategies.py), prints the Markdown table and the issue's goals, and
writes bench/results/eval-cpu-STAMP.{json,md,svg} (the JSON with device, commit and date).

    .venv/bin/python bench/eval_cpu.py [--limit 12] [--draws 1] [--max-tokens 40]
        [--concurrency 4]
        [--tasks keywords,length,sentiment,continuation] [--strategies all]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance

from alignserve.evaluation import report
from alignserve.evaluation.command import TASK_NAMES, add_arguments, run_eval


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    # The bench's own defaults: spawn on CPU, a modest slice of every task, into bench/results.
    args = p.parse_args(["--spawn", "--serve-args=--device cpu", "--limit", "12",
                         "--tasks", ",".join(TASK_NAMES), "--out", str(RESULTS),
                         *sys.argv[1:]])
    meta = provenance()
    log = Path(tempfile.gettempdir()) / f"eval-cpu-{stamp}-server.log"  # not a result
    result, paths = run_eval(args, meta=meta, stem=f"eval-cpu-{stamp}", server_log=log)
    print(report.markdown(dict(result, plot=paths["svg"].name)))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
