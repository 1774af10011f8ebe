"""Drive a live alignserve server through the official `openai` client.

For each (task, strategy configuration) pair, the pair's items go out together, `concurrency`
requests in flight; pairs run one after another, so each pair's `seconds` are measured against
requests of its own kind only. Every request is recorded: the returned text, the task's metrics
computed here from that text, the choice's reward report and the response's search report
(model_tokens, seconds, candidates_scored, and `search` where a pruning search ran), the usage,
and the error if it failed (a failed request is recorded and the run goes on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignserve.evaluation.strategies import StrategyConfig
from alignserve.evaluation.tasks import Task, TaskItem
from alignserve.server.probe import wait_healthy


@dataclass
class Pair:
    task: Task
    config: StrategyConfig
    items: list[TaskItem]


def plan(tasks: Sequence[Task], configs: Sequence[StrategyConfig], limit: int | None = None,
         all_pairs: bool = False, draws: int = 1) -> list[Pair]:
    """The (task, configuration) pairs to run, each with the task's first `limit` items; a
    sampled configuration runs each item `draws` times with other seeds (a greedy one once:
    it would only repeat itself), so that its means rest on more samples."""
    pairs = []
    for task in tasks:
        items = task.items[:limit] if limit is not None else list(task.items)
        for config in configs:
            if all_pairs or config.applies_to(task.name):
                times = draws if config.decoding == "sampled" else 1
                pairs.append(Pair(task, config, [dataclasses.replace(it, draw=d)
                                                 for d in range(times) for it in items]))
    return pairs


@dataclass
class RunSettings:
    max_tokens: int = 40
    temperature: float = 0.7
    concurrency: int = 4
    timeout: float = 900.0  # seconds the client waits for one response


class Runner:
    def __init__(self, base_url: str, settings: RunSettings, model: str | None = None,
                 api_key: str | None = None, progress: bool = True) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self.client = openai.OpenAI(base_url=self.base_url + "/v1",
                                    api_key=api_key or os.environ.get("OPENAI_API_KEY") or "x",
                                    max_retries=2, timeout=settings.timeout)
        self.model = model or self.client.models.list().data[0].id
        self.progress = progress

    def close(self) -> None:
        self.client.close()

    # -------------------------------------------------------------------------------- one request
    def body(self, pair: Pair, item: TaskItem) -> dict[str, Any]:
        """The request's keyword arguments for the openai client."""
        alignment = dict(pair.config.alignment)
        if item.rewards:
            alignment["rewards"] = item.rewards
        kw: dict[str, Any] = {"model": self.model,
                              "max_tokens": pair.task.max_tokens(item, self.settings.max_tokens),
                              "extra_body": {"alignment": alignment}}
        if pair.config.decoding == "greedy":
            kw["temperature"] = 0.0
        else:
            kw["temperature"] = self.settings.temperature
            kw["seed"] = item.seed
        if pair.task.endpoint == "chat":
            kw["messages"] = [{"role": "user", "content": item.prompt}]
        else:
            kw["prompt"] = item.prompt
        if pair.task.wants_logprobs:
            if pair.task.endpoint == "chat":
                kw["logprobs"] = True
            else:
                kw["logprobs"] = 0
        return kw

    def request(self, pair: Pair, item: TaskItem) -> dict[str, Any]:
        record: dict[str, Any] = {"task": pair.task.name, "strategy": pair.config.label,
                                  "strategy_name": pair.config.strategy, "item": item.id,
                                  "draw": item.draw}
        kw = self.body(pair, item)
        record["max_tokens"] = kw["max_tokens"]
        start = time.perf_counter()
        try:
            if pair.task.endpoint == "chat":
                resp = self.client.chat.completions.create(**kw)
            else:
                resp = self.client.completions.create(**kw)
        except Exception as e:  # noqa: BLE001 (any failure is recorded; the run goes on)
            record["client_seconds"] = time.perf_counter() - start
            record["error"] = f"{type(e).__name__}: {getattr(e, 'message', None) or e}"
            return record
        record["client_seconds"] = time.perf_counter() - start
        body = resp.model_dump()
        choice = body["choices"][0]
        if pair.task.endpoint == "chat":
            text = (choice.get("message") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        metrics = pair.task.score(item, text)
        if pair.task.wants_logprobs:
            metrics.update(pair.task.score_logprobs(_token_logprobs(choice)))
        report = body.get("alignment") or {}
        scored = choice.get("alignment") or {}
        usage = body.get("usage") or {}
        record.update({
            "text": text,
            "finish_reason": choice.get("finish_reason"),
            "metrics": metrics,
            "reward": scored.get("reward"),
            "components": scored.get("components") or {},
            "model_tokens": report.get("model_tokens"),
            "seconds": report.get("seconds"),
            "candidates_scored": report.get("candidates_scored"),
            "reward_seconds": report.get("reward_seconds"),
            "search": report.get("search"),  # what a pruning search did, where one ran
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
        })
        return record

    # -------------------------------------------------------------------------------- the run
    def run(self, pairs: Sequence[Pair]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Run every pair; returns (per-request records, per-pair wall times)."""
        from tqdm import tqdm

        records: list[dict[str, Any]] = []
        walls: list[dict[str, Any]] = []
        total = sum(len(p.items) for p in pairs)
        with tqdm(total=total, unit="req", disable=not self.progress, dynamic_ncols=True,
                  file=sys.stderr) as bar, \
                ThreadPoolExecutor(max_workers=max(1, self.settings.concurrency)) as pool:
            for pair in pairs:
                bar.set_postfix_str(f"{pair.task.name}/{pair.config.label}")
                start = time.perf_counter()
                futures = {pool.submit(self.request, pair, item): i
                           for i, item in enumerate(pair.items)}
                done: list[tuple[int, dict[str, Any]]] = []
                for fut in as_completed(futures):
                    done.append((futures[fut], fut.result()))
                    bar.update(1)
                records.extend(r for _, r in sorted(done, key=lambda x: x[0]))
                walls.append({"task": pair.task.name, "strategy": pair.config.label,
                              "requests": len(pair.items),
                              "wall_seconds": time.perf_counter() - start})
        return records, walls


def _token_logprobs(choice: dict[str, Any]) -> list[float] | None:
    """The chosen tokens' log-probs of a chat or completions choice, if it carries them."""
    lp = choice.get("logprobs") or {}
    if lp.get("token_logprobs") is not None:  # completions
        return lp["token_logprobs"]
    if lp.get("content") is not None:  # chat
        return [t["logprob"] for t in lp["content"]]
    return None


# ------------------------------------------------------------------------------ --spawn
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def spawned_server(serve_args: Sequence[str] = (), log_path: Path | None = None,
                   startup_timeout: float = 600.0) -> Iterator[str]:
    """Start `alignserve serve` on a free loopback port, yield its base URL once /health
    answers 200, and stop it (SIGTERM, then kill) afterwards."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "alignserve.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *serve_args]
    where = f" (log: {log_path})" if log_path is not None else ""
    with contextlib.ExitStack() as stack:
        log = (stack.enter_context(open(log_path, "ab")) if log_path is not None
               else subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            if not wait_healthy(base_url, lambda: proc.poll() is None, startup_timeout, 0.5):
                if proc.poll() is not None:
                    raise RuntimeError(f"alignserve serve exited with status {proc.returncode} "
                                       f"before it was healthy{where}")
                raise RuntimeError(f"alignserve serve was not healthy after "
                                   f"{startup_timeout:g} s{where}")
            yield base_url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
