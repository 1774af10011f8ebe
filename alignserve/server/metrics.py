"""Prometheus metrics, prefix `alignserve_`, on a registry of the app's own.

A registry per app (not prometheus_client's global one) lets several apps live in one process,
as tests do. Engine quantities (tokens computed, running/waiting, KV use) are read from
`engine.stats()` when scraped, by a collector; request quantities are recorded as requests end.
No metric name of ours has a colon: Prometheus reserves those for recording rules. An engine
with metrics of its own (`metrics_text()`: vLLM's `vllm:*`) has them appended after ours,
unchanged, so dashboards built for vLLM keep working beside ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from alignserve.decoding.base import ChoiceFinal, RequestSummary
from alignserve.engine.protocol import Engine

P = "alignserve_"
log = logging.getLogger("alignserve.server")

# Buckets as vLLM's dashboards expect them.
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
        240.0, 480.0, 960.0, 1920.0, 7680.0)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
         10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0)
_REWARD = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineCollector(Collector):
    """Reads the engine's counters and gauges (and the admission queue's) at scrape time."""

    def __init__(self, engine: Engine, admission: Any = None) -> None:
        self.engine = engine
        self.admission = admission  # server.admission.Admission, or None

    def _families(self) -> tuple[Metric, ...]:
        return (
            GaugeMetricFamily(P + "num_requests_running",
                              "Sequences in the engine's running batch (as vLLM counts n>1)."),
            GaugeMetricFamily(P + "num_requests_waiting",
                              "Requests waiting: queued for admission plus prompts queued in "
                              "the engine."),
            GaugeMetricFamily(P + "kv_cache_usage_perc", "KV cache use, 0 to 1 (1 = full)."),
            CounterMetricFamily(P + "prefill_tokens",
                                "Prompt tokens actually computed (a shared prompt counts once)."),
            CounterMetricFamily(P + "model_tokens", "Tokens the model computed, by kind.",
                                labels=["kind"]),
            CounterMetricFamily(P + "twin_tokens",
                                "Decode tokens not computed: a sample identical to another of "
                                "its request in the same step reused its KV and logits."),
            GaugeMetricFamily(P + "server_requests_running",
                              "Requests admitted and decoding (each may run many sequences)."),
            GaugeMetricFamily(P + "kv_cache_reserved_perc",
                              "KV cache reserved by admitted requests' worst cases, 0 to 1."),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.engine.stats()
        except Exception:  # a scrape must never fail because the engine is busy or broken
            log.exception("engine.stats() failed during a scrape")
            return
        running, waiting, kv, prefill, model, twins, admitted, reserved = self._families()
        adm = self.admission
        running.add_metric([], stats.running_sequences)
        waiting.add_metric([], stats.waiting_requests + (adm.waiting if adm else 0))
        admitted.add_metric([], adm.running if adm else 0)
        kv_total = adm.kv_total if adm and adm.kv_total else 0
        reserved.add_metric([], adm.kv_reserved / kv_total if kv_total else 0.0)
        total = stats.kv_total_slots
        kv.add_metric([], stats.kv_used_slots / total if total else 0.0)
        prefill.add_metric([], stats.prefill_tokens)
        twins.add_metric([], stats.twin_tokens)
        for kind in ("prefill", "decode", "lookahead"):
            model.add_metric([kind], stats.model_tokens.get(kind, 0))
        for kind, value in stats.model_tokens.items():
            if kind not in ("prefill", "decode", "lookahead"):
                model.add_metric([kind], value)
        yield from (running, waiting, kv, prefill, model, twins, admitted, reserved)


class ServerMetrics:
    def __init__(self, engine: Engine, admission: Any = None) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.e2e = Histogram(P + "e2e_request_latency_seconds",
                             "Request latency from arrival to last byte.", buckets=_E2E, registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds",
                              "Arrival to the first output text.", buckets=_TTFT, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds",
                             "Gap between consecutive streamed pieces of a request.",
                             buckets=_ITL, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.generation_tokens = Counter(P + "generation_tokens",
                                         "Completion tokens returned (all choices).", registry=r)
        self.success = Counter(P + "request_success",
                               "Finished requests, by the finish reason of choice 0.",
                               ["finished_reason"], registry=r)
        self.strategy_requests = Counter(P + "strategy_requests", "Requests by strategy.",
                                         ["strategy"], registry=r)
        self.candidates = Counter(P + "candidates_scored", "Candidates scored, by strategy.",
                                  ["strategy"], registry=r)
        self.reward_seconds = Histogram(P + "reward_seconds", "Seconds spent in each reward.",
                                        ["reward"], buckets=_REWARD, registry=r)
        self.aborts = Counter(P + "request_aborts", "Requests that ended early, by why: "
                              "disconnect (client left), timeout (--request-timeout), shutdown, "
                              "error.", ["reason"], registry=r)
        self.http_requests = Counter(P + "http_requests", "HTTP responses by route and status "
                                     "(401, 413, 429, ... included).", ["route", "status"],
                                     registry=r)
        for reason in ("disconnect", "timeout", "shutdown", "error"):
            self.aborts.labels(reason)
        r.register(EngineCollector(engine, admission))

    def render(self) -> bytes:
        """Ours, then the engine's own metrics, if it has any."""
        return generate_latest(self.registry) + self._engine_text()

    def _engine_text(self) -> bytes:
        source = getattr(self.engine, "metrics_text", None)
        if source is None:
            return b""
        try:
            text = source()
        except Exception:  # a scrape must not fail because of the engine's metrics
            log.exception("engine.metrics_text() failed during a scrape")
            return b""
        if not text:
            return b""
        return (text if text.endswith("\n") else text + "\n").encode("utf-8")

    def tracker(self, strategy: str) -> RequestTracker:
        self.strategy_requests.labels(strategy).inc()
        return RequestTracker(self)


class RequestTracker:
    """Times one request's events and records them once, when it ends."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.arrival = time.perf_counter()
        self.last_output: float | None = None
        self.done = False

    def output(self) -> None:
        """Text went out (or became ready, when not streamed)."""
        now = time.perf_counter()
        if self.last_output is None:
            self.m.ttft.observe(now - self.arrival)
        else:
            self.m.itl.observe(now - self.last_output)
        self.last_output = now

    def finish(self, summary: RequestSummary, finals: list[ChoiceFinal],
               reward_seconds: dict[str, float]) -> None:
        if self.done:
            return
        self.done = True
        self.m.e2e.observe(time.perf_counter() - self.arrival)
        self.m.prompt_tokens.inc(summary.prompt_tokens)
        self.m.generation_tokens.inc(sum(len(f.token_ids) for f in finals))
        first = min(finals, key=lambda f: f.index) if finals else None
        self.m.success.labels(first.finish_reason if first else "abort").inc()
        self.m.candidates.labels(summary.strategy).inc(summary.candidates_scored)
        for name, seconds in reward_seconds.items():
            self.m.reward_seconds.labels(name).observe(seconds)

    def abort(self, reason: str = "disconnect") -> None:
        """The request ended before its answer: the client left (disconnect), its deadline
        passed (timeout), the server stopped it (shutdown) or it failed (error)."""
        if self.done:
            return
        self.done = True
        self.m.e2e.observe(time.perf_counter() - self.arrival)
        self.m.success.labels("abort").inc()
        self.m.aborts.labels(reason).inc()
