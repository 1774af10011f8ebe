"""The per-request alignment arguments that travel to vLLM's engine core.

A token-level strategy (vas, contrastive) hands the engine a `Steering` value
(alignserve.engine.steering); on vLLM it is applied by `AlignLogitsProcessor`, which runs in
vLLM's engine-core process and sees only what a request carries in
`SamplingParams.extra_args`. This module is the one place that format is written down: the
adapter (API process) builds it from the Steering with `from_steering` and `to_wire`, the
processor (engine core) reads it with `parse`, and `AlignLogitsProcessor.validate_params` rejects a malformed one before the request
is scheduled. Everything in it is plain JSON (msgspec carries it between the processes).

    extra_args = {"alignserve": {
        "contrastive": {"alpha": 0.1, "beta": 0.5,
                        "amateur": {"source": "self", "layers": 12}
                                 | {"source": "model", "path": "/models/amateur"}
                                 | {"source": "expert", "prompt_ids": [...]}},
        "vas": {"beta": 2.0, "top_k": 10, "keep_others": false,
                "value_models": [{"path": "/values/positive", "weight": 1.0}]},
    }}

Amateur sources: `self` is the served model truncated to its first `layers` layers (`self:L`);
`model` another model with the same vocabulary; `expert` the served model itself fed another
context (`prompt_ids`, e.g. the lame prompt plus what was generated so far) in lockstep.
Either part may be absent; with both, the order of `alignserve.kernels.logits_ops` holds
(contrastive combination, then VAS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from alignserve.engine.steering import AmateurPrompt, EarlyLayers, ServedAmateur, Steering

KEY = "alignserve"
SOURCES = ("self", "model", "expert")


@dataclass(frozen=True)
class AmateurSpec:
    source: str  # "self" | "model" | "expert"
    layers: int | None = None  # source "self"
    path: str | None = None  # source "model"
    prompt_ids: tuple[int, ...] | None = None  # source "expert": the context it is fed instead

    def side_key(self) -> tuple:
        """Which side model serves this amateur (rows with the same key share one)."""
        if self.source == "self":
            return ("self", self.layers)
        if self.source == "model":
            return ("model", self.path)
        return ("expert",)


@dataclass(frozen=True)
class ContrastiveSpec:
    amateur: AmateurSpec
    alpha: float = 0.1
    beta: float = 0.5


@dataclass(frozen=True)
class ValueSpec:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class VasSpec:
    value_models: tuple[ValueSpec, ...]
    beta: float = 1.0
    top_k: int = 10
    keep_others: bool = False


@dataclass(frozen=True)
class AlignSpec:
    contrastive: ContrastiveSpec | None = None
    vas: VasSpec | None = None


def _number(d: dict, key: str, default: float, lo: float, hi: float, where: str,
            open_low: bool = False) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be a finite number, got {value!r}")
    if value < lo or value > hi or (open_low and value == lo):
        bound = f"({lo}, {hi}]" if open_low else f"[{lo}, {hi}]"
        raise ValueError(f"{where}.{key} must be in {bound}, got {value}")
    return float(value)


def _only(d: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object, got {type(d).__name__}")  # noqa: TRY004
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    return d


def _token_ids(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where} must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ValueError(f"{where} must hold non-negative integer token ids")
    return tuple(value)


def _amateur(d: Any, where: str) -> AmateurSpec:
    d = _only(d, {"source", "layers", "path", "prompt_ids"}, where)
    source = d.get("source")
    if source not in SOURCES:
        raise ValueError(f"{where}.source must be one of {list(SOURCES)}, got {source!r}")
    if source == "self":
        layers = d.get("layers")
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"{where}.layers must be a positive integer, got {layers!r}")
        return AmateurSpec("self", layers=layers)
    if source == "model":
        path = d.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}.path must name a model directory")
        return AmateurSpec("model", path=path)
    return AmateurSpec("expert", prompt_ids=_token_ids(d.get("prompt_ids"), where + ".prompt_ids"))


def _contrastive(d: Any, where: str) -> ContrastiveSpec:
    d = _only(d, {"amateur", "alpha", "beta"}, where)
    if "amateur" not in d:
        raise ValueError(f"{where}.amateur is required")
    return ContrastiveSpec(
        amateur=_amateur(d["amateur"], where + ".amateur"),
        alpha=_number(d, "alpha", 0.1, 0.0, 1.0, where, open_low=True),
        beta=_number(d, "beta", 0.5, 0.0, 1e4, where),
    )


def _vas(d: Any, where: str) -> VasSpec:
    d = _only(d, {"value_models", "beta", "top_k", "keep_others"}, where)
    models = d.get("value_models")
    if not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"{where}.value_models must be a non-empty list")
    specs = []
    for i, m in enumerate(models):
        w = f"{where}.value_models[{i}]"
        m = _only(m, {"path", "weight"}, w)
        if not isinstance(m.get("path"), str) or not m["path"]:
            raise ValueError(f"{w}.path must name a value model directory")
        specs.append(ValueSpec(m["path"], _number(m, "weight", 1.0, -1e4, 1e4, w)))
    top_k = d.get("top_k", 10)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 1024:
        raise ValueError(f"{where}.top_k must be an integer in [1, 1024], got {top_k!r}")
    keep = d.get("keep_others", False)
    if not isinstance(keep, bool):
        raise ValueError(f"{where}.keep_others must be a boolean")  # noqa: TRY004
    return VasSpec(tuple(specs), beta=_number(d, "beta", 1.0, -1e4, 1e4, where), top_k=top_k,
                   keep_others=keep)


def parse(extra_args: Any) -> AlignSpec | None:
    """The request's AlignSpec, None when it asks for none; ValueError when malformed."""
    if not extra_args or KEY not in extra_args:
        return None
    d = _only(extra_args[KEY], {"contrastive", "vas"}, KEY)
    spec = AlignSpec(
        contrastive=_contrastive(d["contrastive"], KEY + ".contrastive") if d.get("contrastive") else None,
        vas=_vas(d["vas"], KEY + ".vas") if d.get("vas") else None,
    )
    return spec if spec.contrastive or spec.vas else None


def to_wire(spec: AlignSpec) -> dict[str, Any]:
    """The extra_args entry for `spec` (the inverse of `parse`)."""
    out: dict[str, Any] = {}
    if spec.contrastive is not None:
        c, a = spec.contrastive, spec.contrastive.amateur
        am: dict[str, Any] = {"source": a.source}
        if a.layers is not None:
            am["layers"] = a.layers
        if a.path is not None:
            am["path"] = a.path
        if a.prompt_ids is not None:
            am["prompt_ids"] = list(a.prompt_ids)
        out["contrastive"] = {"alpha": c.alpha, "beta": c.beta, "amateur": am}
    if spec.vas is not None:
        v = spec.vas
        out["vas"] = {"beta": v.beta, "top_k": v.top_k, "keep_others": v.keep_others,
                      "value_models": [{"path": m.path, "weight": m.weight} for m in v.value_models]}
    return {KEY: out}


def from_steering(steering: Steering, *, output_ids: Sequence[int] = (),
                  served_path: Callable[[ServedAmateur], str] | None = None) -> AlignSpec | None:
    """One sequence's `Steering` in this format (None: nothing to steer). `output_ids`: what the
    sequence has produced so far (an amateur prompt reads it after its own tokens);
    `served_path(amateur)`: the directory of a served amateur. ValueError for what cannot travel
    to the engine core (a value model with no directory, an amateur with none)."""
    contrastive = None
    c = steering.contrastive
    if c is not None:
        a = c.amateur
        if isinstance(a, EarlyLayers):
            amateur = AmateurSpec("self", layers=a.layers)
        elif isinstance(a, AmateurPrompt):
            amateur = AmateurSpec("expert", prompt_ids=tuple(a.prompt_ids) + tuple(output_ids))
        elif isinstance(a, ServedAmateur):
            path = served_path(a) if served_path is not None else getattr(a.model, "path", None)
            if not path:
                raise ValueError(f"amateur {a.name!r} is not served by this engine")
            amateur = AmateurSpec("model", path=str(path))
        else:
            raise ValueError(f"unknown amateur {a!r}")
        contrastive = ContrastiveSpec(amateur, alpha=float(c.alpha), beta=float(c.beta))
    vas = None
    v = steering.value
    if v is not None:
        unsaved = [getattr(vm, "name", "?") for vm, _ in v.models if getattr(vm, "path", None) is None]
        if unsaved:
            raise ValueError(f"value models {unsaved} have no directory; on vLLM value models are "
                             "loaded from disk")
        vas = VasSpec(tuple(ValueSpec(str(vm.path), float(w)) for vm, w in v.models),
                      beta=float(v.beta), top_k=int(v.top_k), keep_others=bool(v.keep_others))
    if contrastive is None and vas is None:
        return None
    return AlignSpec(contrastive=contrastive, vas=vas)
