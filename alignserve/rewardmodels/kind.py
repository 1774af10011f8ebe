"""What the registry knows about one kind of reward: its arguments, how to build it, and
how to document it for GET /v1/alignment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from alignserve.rewardmodels.protocol import Reward


class RewardArgs(BaseModel):
    """Base of each reward's arguments. Strict: unknown keys and wrong JSON types are
    errors, never silently coerced or dropped."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# Builds a reward from validated arguments. `param` is the spec's path (e.g.
# `alignment.rewards[2]`) so checks pydantic cannot express (a regex that does not compile)
# raise RewardSpecError naming the exact field.
Factory = Callable[[Any, str], Reward]


@dataclass(frozen=True)
class RewardKind:
    name: str
    description: str
    args: type[RewardArgs]
    factory: Factory
    output_range: tuple[float | None, float | None] = (0.0, 1.0)
    category: str = "programmatic"  # programmatic | classifier | reward_model

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.category,
            "description": self.description,
            "arguments": describe_arguments(self.args),
            "output_range": list(self.output_range),
        }


def _json_type(prop: dict[str, Any]) -> str:
    """The JSON type of one argument, read from pydantic's JSON schema (`X | None` is
    reported as X: None only means 'not given')."""
    if "type" in prop:
        return str(prop["type"])
    if "enum" in prop:
        return "string"
    for option in prop.get("anyOf", []):
        if option.get("type") not in (None, "null"):
            return str(option["type"])
    return "any"


def describe_arguments(args: type[RewardArgs]) -> list[dict[str, Any]]:
    schema = args.model_json_schema()
    props: dict[str, Any] = schema.get("properties", {})
    out = []
    for attr, field in args.model_fields.items():
        name = field.alias or attr  # the key clients send (e.g. `schema`)
        prop = props.get(name, {})
        entry: dict[str, Any] = {
            "name": name,
            "type": _json_type(prop),
            "required": field.is_required(),
            "default": None if field.is_required() else field.default,
            "description": field.description or "",
        }
        if "enum" in prop:
            entry["enum"] = prop["enum"]
        out.append(entry)
    return out
