"""vLLM's own metrics, beside ours.

vLLM's AsyncLLM (started with log stats on) registers its `vllm:*` metrics in
prometheus_client's global registry of the process that holds it. Our server keeps its
`alignserve_*` metrics in a registry of its own (API.md: no colons in our names), so the two
never clash; `vllm_metrics_text` renders vLLM's families alone, for /metrics to append, and
`VllmGauges` reads the few gauges EngineStats reports (waiting requests, KV cache use).
Only one AsyncLLM per process may keep stats on: a second one would unregister the first
one's metrics (../shared/FACTS.md), so the adapter creates exactly one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

PREFIX = "vllm:"


def _vllm_families(registry: Any = None) -> list[Any]:
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return [m for m in registry.collect() if m.name.startswith(PREFIX)]


class _Only:
    """A collector that re-exposes given metric families."""

    def __init__(self, families: list[Any]):
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families


def vllm_metrics_text(registry: Any = None) -> str:
    """vLLM's `vllm:*` metric families in Prometheus text format ('' when there are none)."""
    from prometheus_client import CollectorRegistry, generate_latest

    families = _vllm_families(registry)
    if not families:
        return ""
    out = CollectorRegistry(auto_describe=False)
    out.register(_Only(families))
    return generate_latest(out).decode("utf-8")


class VllmGauges:
    """Reads vLLM's scheduler gauges from the registry (summed over their labels)."""

    NAMES: ClassVar[dict[str, tuple[str, ...]]] = {
        "running": ("vllm:num_requests_running",),
        "waiting": ("vllm:num_requests_waiting",),
        "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    }

    def __init__(self, registry: Any = None):
        self.registry = registry

    def read(self) -> dict[str, float]:
        try:
            families = _vllm_families(self.registry)
        except Exception:  # noqa: BLE001  (a scrape must not fail on vLLM's registry)
            return {}
        values: dict[str, float] = {}
        by_name = {}
        for fam in families:
            for sample in fam.samples:
                by_name[sample.name] = by_name.get(sample.name, 0.0) + float(sample.value)
        for key, names in self.NAMES.items():
            for name in names:
                if name in by_name:
                    values[key] = by_name[name]
                    break
        return values
