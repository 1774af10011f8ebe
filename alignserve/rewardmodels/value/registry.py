"""The value models a server offers by name: the shipped ones (loaded lazily) plus any given
with `--value-model NAME=DIR`.

A registry is a read-only mapping name -> ValueModel, so it can sit in
`DecodingResources.value_models` as is. `bind(engine)` ties it to the served model: every
model it hands out is then checked against that model's hidden and vocabulary sizes (a
mismatch is a ValueModelError at load) and evaluates on its token matrix.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from alignserve.rewardmodels.value.model import (
    ValueModel,
    ValueModelError,
    describe_config,
    load_value_model,
    read_config,
    token_matrix,
)

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "models"
DEFAULT_VALUE_MODEL = "sentiment-positive"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def shipped_models() -> dict[str, Path]:
    """Value models inside the package: models/NAME/{config.json, head.safetensors}."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(SHIPPED_DIR.iterdir()) if (d / "config.json").is_file()}


class ValueModelRegistry(Mapping[str, ValueModel]):
    def __init__(self, paths: Mapping[str, str | Path] | None = None,
                 default: str | None = None) -> None:
        self._paths: dict[str, Path] = {}
        self._loaded: dict[str, ValueModel] = {}
        self._lock = threading.Lock()
        self._tokens: Any = None
        self._model_name: str | None = None
        self.default_name: str | None = default
        for name, path in (paths or {}).items():
            self.add(name, path)

    @classmethod
    def default(cls) -> ValueModelRegistry:
        """The shipped value models; `sentiment-positive` is the default for `vas`."""
        shipped = shipped_models()
        default = (DEFAULT_VALUE_MODEL if DEFAULT_VALUE_MODEL in shipped
                   else next(iter(shipped), None))
        return cls(shipped, default=default)

    # building -----------------------------------------------------------------------------
    def bind(self, engine: Any) -> ValueModelRegistry:
        """Evaluate on `engine`'s model from now on (models already loaded are re-checked)."""
        tokens, name = token_matrix(engine), getattr(engine, "model_name", None)
        with self._lock:
            for vm in self._loaded.values():
                vm.bind(tokens, name)
            self._tokens, self._model_name = tokens, name
        return self

    def add(self, name: str, path: str | Path, *, load: bool = False,
            make_default: bool = False) -> None:
        """Offer the value model in directory `path` as `name` (replacing a shipped one of the
        same name). With `load`, read it now (and check it against the bound model)."""
        if not _NAME.match(name or ""):
            raise ValueModelError(f"value model name {name!r}: use letters, digits, '.', '-', '_'")
        path = Path(path).expanduser()
        read_config(path)  # fails early on a directory that is not a value model
        with self._lock:
            self._paths[name] = path
            self._loaded.pop(name, None)
            if make_default or self.default_name is None:
                self.default_name = name
        if load:
            self[name]

    def add_spec(self, spec: str, *, load: bool = True) -> str:
        """`--value-model NAME=DIR`; returns NAME."""
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueModelError(f"--value-model expects NAME=DIR, got {spec!r}")
        self.add(name.strip(), path.strip(), load=load)
        return name.strip()

    # the mapping --------------------------------------------------------------------------
    def __getitem__(self, name: str) -> ValueModel:
        with self._lock:
            vm = self._loaded.get(name)
            if vm is None:
                path = self._paths[name]  # KeyError for an unknown name, as a Mapping does
                vm = load_value_model(path, name)
                if self._tokens is not None:
                    vm.bind(self._tokens, self._model_name)
                self._loaded[name] = vm
                log.info("loaded value model %s from %s (%d parameters)", name, path,
                         vm.num_parameters)
            return vm

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._paths))

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    @property
    def names(self) -> list[str]:
        return list(self._paths)

    def describe(self) -> list[dict[str, Any]]:
        """For GET /v1/alignment: name, what it was trained on, base model; weights unread."""
        out = []
        for name, path in self._paths.items():
            try:
                entry = describe_config(name, read_config(path), path)
            except ValueModelError as e:
                entry = {"name": name, "error": str(e)}
            entry["default"] = name == self.default_name
            out.append(entry)
        return out


_shipped: ValueModelRegistry | None = None
_shipped_lock = threading.Lock()


def shipped_registry() -> ValueModelRegistry:
    """One process-wide registry of the shipped value models (what `vas` falls back to)."""
    global _shipped
    if _shipped is None:
        with _shipped_lock:
            if _shipped is None:
                _shipped = ValueModelRegistry.default()
    return _shipped
