"""`alignserve eval`: run the task sets through a live server with each strategy configuration
and write the report (JSON, Markdown, SVG) into --out.

    alignserve eval --spawn --out eval-out [--tasks keywords,length] [--strategies sample,deal]
                    [--limit 10] [--draws 1] [--max-tokens 40] [--concurrency 4]
    alignserve eval --base-url http://127.0.0.1:8000 --out eval-out
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import Any

from alignserve.evaluation.strategies import CONFIGS

TASK_NAMES = ("keywords", "length", "sentiment", "continuation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--spawn", action="store_true",
                       help="start `alignserve serve` on a free loopback port, stop it after")
    p.add_argument("--serve-args", default="",
                   help="extra flags for the spawned server as one string, written with '=': "
                   "--serve-args=\"--device cuda\"")
    p.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--tasks", default=",".join(TASK_NAMES),
                   help=f"comma-separated tasks (default: all: {','.join(TASK_NAMES)})")
    p.add_argument("--strategies", default="all",
                   help="comma-separated strategy configurations (default: all: "
                   f"{','.join(CONFIGS)})")
    p.add_argument("--all-pairs", action="store_true",
                   help="run every configuration on every task (default: each where it is "
                   "meaningful: vas on sentiment, greedy and contrastive on continuation, ...)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--draws", type=int, default=1,
                   help="times each item runs under a sampled configuration, with other seeds "
                   "(greedy ones run once): means over more samples of the same items")
    p.add_argument("--max-tokens", type=int, default=40,
                   help="max_tokens per request (length items get room for their N words)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="temperature of the sampled configurations (greedy ones use 0)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait per request")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def evaluate(base_url: str, tasks: list[str], strategies: str | None = None,
             limit: int | None = None, max_tokens: int = 40, temperature: float = 0.7,
             concurrency: int = 4, timeout: float = 900.0, model: str | None = None,
             api_key: str | None = None, all_pairs: bool = False, progress: bool = True,
             meta: dict[str, Any] | None = None, draws: int = 1) -> dict[str, Any]:
    """Run the evaluation against `base_url`; returns the result dict (see report.py)."""
    from alignserve.evaluation import report
    from alignserve.evaluation.runner import Runner, RunSettings, plan
    from alignserve.evaluation.strategies import parse_configs
    from alignserve.evaluation.tasks import load_task

    task_objs = [load_task(t) for t in tasks]
    configs = parse_configs(strategies)
    pairs = plan(task_objs, configs, limit, all_pairs, draws)
    if not pairs:
        raise ValueError("no (task, strategy) pair to run: see --all-pairs")
    settings = RunSettings(max_tokens=max_tokens, temperature=temperature,
                           concurrency=concurrency, timeout=timeout)
    runner = Runner(base_url, settings, model=model, api_key=api_key, progress=progress)
    try:
        started = dt.datetime.now(dt.UTC)
        records, walls = runner.run(pairs)
    finally:
        runner.close()
    config_info = {c.label: c.describe() for c in configs}
    rows = report.aggregate(records, walls, config_info)
    return {
        "meta": {"model": runner.model, "base_url": base_url,
                 "date": started.isoformat(timespec="seconds"), "max_tokens": max_tokens,
                 "temperature": temperature, "limit": limit, "draws": draws,
                 "concurrency": concurrency,
                 "pairs": [f"{p.task.name}/{p.config.label}" for p in pairs],
                 **(meta or {})},
        "tasks": {t.name: t.describe() for t in task_objs},
        "configs": config_info,
        "rows": rows,
        "goals": report.goals(rows),
        "walls": walls,
        "requests": records,
    }


def run_eval(args: argparse.Namespace, meta: dict[str, Any] | None = None, stem: str = "eval",
             server_log: Path | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """The evaluation as the CLI flags describe it: spawn or reach the server, run, write
    OUT/STEM.{json,md,svg}. A spawned server logs to `server_log` (default OUT/STEM-server.log)."""
    import contextlib

    from alignserve.evaluation import report
    from alignserve.evaluation.runner import spawned_server
    from alignserve.evaluation.strategies import parse_configs

    parse_configs(args.strategies)  # a bad flag fails before a server is spawned
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASK_NAMES)}")
    for flag, value in (("--limit", args.limit), ("--max-tokens", args.max_tokens),
                        ("--concurrency", args.concurrency), ("--draws", args.draws)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if args.spawn:
        serve_args = shlex.split(args.serve_args)
        meta.update(spawned=True, serve_args=serve_args)
        server = spawned_server(serve_args, log_path=server_log or out / f"{stem}-server.log")
    else:
        server = contextlib.nullcontext(args.base_url)
    with server as base_url:
        result = evaluate(base_url, tasks, args.strategies, limit=args.limit,
                          max_tokens=args.max_tokens, temperature=args.temperature,
                          concurrency=args.concurrency, timeout=args.timeout, model=args.model,
                          api_key=args.api_key, all_pairs=args.all_pairs,
                          progress=not args.no_progress, meta=meta, draws=args.draws)
    return result, report.write(result, out, stem)


def main(args: argparse.Namespace) -> int:
    from alignserve.evaluation import report

    try:
        result, paths = run_eval(args)
    except (ValueError, RuntimeError) as e:
        print(f"alignserve eval: {e}", file=sys.stderr)
        return 2
    print(report.markdown(result))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
