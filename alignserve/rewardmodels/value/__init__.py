"""Value models for VAS (value-augmented sampling): a head on the frozen base model's final
hidden state that predicts Q(s, a) of a reward (model.py), its registry (registry.py), and its
training by TD(lambda) on the base model's own samples (data.py, td.py, train.py).

Names are imported lazily, so `alignserve.rewardmodels.value.train` (the CLI hook) loads
without torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ValueHead": "model", "ValueModel": "model", "ValueModelConfig": "model",
    "ValueModelError": "model", "load_value_model": "model",
    "DEFAULT_VALUE_MODEL": "registry", "ValueModelRegistry": "registry",
    "shipped_registry": "registry",
}

__all__ = [
    "DEFAULT_VALUE_MODEL", "ValueHead", "ValueModel", "ValueModelConfig", "ValueModelError",
    "ValueModelRegistry", "load_value_model", "shipped_registry",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
