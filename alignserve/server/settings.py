"""Server settings: one dataclass, each field a CLI flag whose default comes from `ALIGNSERVE_*`.

The flag table lives here (not in cli.py) so the names, env vars and defaults are written once.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ServerSettings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "port to bind"})
    model: str | None = field(
        default=None, metadata={"help": "model path (default: the embedded SmolLM2-135M-Instruct)"}
    )
    engine: str = field(default="native",
                        metadata={"help": "engine: native", "choices": ["native"]})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda", "choices": ["cpu", "cuda"]})
    served_model_name: str | None = field(
        default=None, metadata={"help": "name clients use in `model` (default: the engine's name)"}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "context length (default: the model's)"}
    )
    kv_cache_gib: float | None = field(default=None, metadata={"help": "KV cache budget in GiB"})
    max_tokens_limit: int = field(
        default=4096, metadata={"help": "largest max_tokens a request may ask for"}
    )
    max_n: int = field(default=16, metadata={"help": "largest n a request may ask for"})
    max_candidates: int = field(
        default=64, metadata={"help": "largest alignment.candidates a request may ask for"}
    )
    max_rewards: int = field(
        default=16, metadata={"help": "most items in alignment.rewards per request"}
    )
    reward_models: list[str] = field(
        default_factory=list,
        metadata={"help": "extra reward model NAME=PATH (repeatable)", "flag": "--reward-model",
                  "metavar": "NAME=PATH"},
    )
    api_key: str | None = field(
        default=None, metadata={"help": "if set, /v1/* requires `Authorization: Bearer KEY`"}
    )
    disconnect_poll_s: float = field(
        default=0.1, metadata={"help": "how often a non-streamed request checks its client"}
    )
    log_level: str = field(default="info", metadata={
        "help": "log level", "choices": ["critical", "error", "warning", "info", "debug"]})

    def reward_model_pairs(self) -> list[tuple[str, str]]:
        """`--reward-model NAME=PATH` items as (name, path); a malformed item is a usage error."""
        pairs = []
        for item in self.reward_models:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--reward-model expects NAME=PATH, got {item!r}")
            pairs.append((name, path))
        return pairs


def _env_name(name: str) -> str:
    return "ALIGNSERVE_" + name.upper()


def _base_type(f: Any) -> type:
    # Annotations are strings under `from __future__ import annotations`: read the first type.
    text = str(f.type).split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "bool": bool}.get(text, str)


def _env_default(f: Any) -> Any:
    raw = os.environ.get(_env_name(f.name))
    default = f.default_factory() if callable(f.default_factory) else f.default
    if raw is None:
        return default
    if str(f.type).startswith("list"):
        # A list from the environment is comma-separated: ALIGNSERVE_REWARD_MODELS=a=/x,b=/y
        return [item for item in raw.split(",") if item]
    return _base_type(f)(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; `--flag` spells the field with dashes unless overridden."""
    for f in fields(ServerSettings):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        default = _env_default(f)
        shown = f" (default: {default})" if default not in (None, []) else ""
        help_text = f"{f.metadata.get('help', '')}{shown} [env {_env_name(f.name)}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if str(f.type).startswith("list"):
            kwargs["action"] = "append"
            kwargs["default"] = None  # argparse appends to a default list in place: merge below
        else:
            kwargs["type"] = _base_type(f)
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        parser.add_argument(flag, **kwargs)


def from_args(ns: argparse.Namespace) -> ServerSettings:
    values: dict[str, Any] = {}
    for f in fields(ServerSettings):
        value = getattr(ns, f.name, None)
        if str(f.type).startswith("list"):
            value = list(_env_default(f)) + list(value or [])
        values[f.name] = value
    return ServerSettings(**values)
