"""Server-wide things strategies may use besides the engine, built once at start-up.

The server puts one `DecodingResources` on every `DecodeContext.resources` (None there means
an empty one): the amateur models `contrastive` may name (`--amateur NAME=PATH`) and the value
models `vas` may compose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignserve.engine.protocol import Engine


@dataclass
class DecodingResources:
    # contrastive: served amateur models by name; each must share the expert's vocabulary.
    amateurs: dict[str, Engine] = field(default_factory=dict)
    # vas: value models by name.
    value_models: dict[str, Any] = field(default_factory=dict)
    # contrastive: the amateur a request gets when it names none (None: the built-in default,
    # `self:L` with L from alignserve.decoding.contrastive.default_amateur).
    default_amateur: str | None = None


EMPTY = DecodingResources()


def resources_of(value: Any) -> DecodingResources:
    """`ctx.resources` or an empty set when the caller gave none."""
    return value if value is not None else EMPTY
