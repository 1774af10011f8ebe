"""Composition: the registry of reward kinds a server offers, and the per-request weighted
sum of rewards built from the client's `alignment.rewards` list."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from alignserve.rewardmodels.kind import RewardArgs, RewardKind
from alignserve.rewardmodels.lexical import KEYWORDS, LENGTH
from alignserve.rewardmodels.pattern import REGEX
from alignserve.rewardmodels.profanity import PROFANITY
from alignserve.rewardmodels.protocol import Reward, RewardScore, RewardSpecError
from alignserve.rewardmodels.sentiment import SENTIMENT
from alignserve.rewardmodels.structured import JSON_SCHEMA

BUILTIN_KINDS: tuple[RewardKind, ...] = (KEYWORDS, LENGTH, REGEX, JSON_SCHEMA, SENTIMENT, PROFANITY)
DEFAULT_MAX_REWARDS = 16
# Relative slack when a total is compared with the ceiling: the total is a weighted sum of a
# few float64 terms (rounding far below this), and the built-in scores are exact fractions.
CEILING_TOLERANCE = 1e-9

WEIGHT_ARGUMENT = {
    "name": "weight",
    "type": "number",
    "required": False,
    "default": 1.0,
    "description": "Multiplier of this reward in the total (any finite number; negative "
    "penalises).",
}


@dataclass(frozen=True)
class WeightedReward:
    label: str  # key in the report's `components`: the name, or name#2, name#3 on repeats
    weight: float
    reward: Reward


class ComposedReward:
    """The weighted sum of a request's rewards. Cheap to build per request: it only holds
    references to already-built rewards.

    Timing: `last_seconds` holds the wall seconds each reward *name* took during the
    latest `score()` call (the server observes these into `reward_seconds{reward}`);
    `seconds` accumulates the same over this object's life, i.e. over the request.
    """

    def __init__(self, items: list[WeightedReward] | None = None) -> None:
        self.items: list[WeightedReward] = list(items or [])
        self.seconds: dict[str, float] = {}
        self.last_seconds: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def labels(self) -> list[str]:
        return [item.label for item in self.items]

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @functools.cached_property
    def ceiling(self) -> float | None:
        """The highest total any text can score (each reward at its best end of `score_range`,
        the low end under a negative weight); None when a reward is unbounded there. Computed
        once: the items do not change after construction, and a search asks every round."""
        if not self.items:
            return None
        total = 0.0
        for item in self.items:
            bounds = getattr(item.reward, "score_range", None)
            if item.weight == 0:
                continue
            if bounds is None:
                return None
            total += item.weight * (bounds[1] if item.weight > 0 else bounds[0])
        return total

    def reaches_ceiling(self, score: RewardScore) -> bool:
        """Whether a final score is the ceiling: no other text can score higher."""
        top = self.ceiling
        return (top is not None and score.total is not None
                and score.total >= top - CEILING_TOLERANCE * max(1.0, abs(top)))

    @functools.cached_property
    def can_be_sure(self) -> bool:
        """Whether unfinished text can ever be sure of the ceiling (`sure_of_ceiling`): every
        weighted reward has a floor rule (`floor_partial`). A negative weight would need a
        ceiling rule that no built-in reward has, so it never can."""
        return self.ceiling is not None and all(
            item.weight > 0 and hasattr(item.reward, "floor_partial")
            for item in self.items if item.weight != 0)

    def sure_of_ceiling(self, texts: list[str], prompt: str = "") -> list[bool]:
        """For unfinished texts: whether each is sure to finish at the ceiling, every weighted
        reward's floor rule (`floor_partial`) being at the top of its range already."""
        if not self.can_be_sure or not texts:
            return [False] * len(texts)
        sure = [True] * len(texts)
        for item in self.items:
            if item.weight == 0:
                continue
            floor = item.reward.floor_partial
            hi = item.reward.score_range[1]
            for i, value in enumerate(floor(list(texts), prompt)):
                if value < hi - CEILING_TOLERANCE * max(1.0, abs(hi)):
                    sure[i] = False
        return sure

    def score(self, texts: list[str], prompt: str = "") -> list[RewardScore]:
        self.last_seconds = {}
        if not self.items:
            return [RewardScore(total=None, components={}) for _ in texts]
        if not texts:
            return []
        components: list[dict[str, float]] = [{} for _ in texts]
        totals = [0.0] * len(texts)
        for item in self.items:
            start = time.perf_counter()
            values = item.reward.score(list(texts), prompt)
            elapsed = time.perf_counter() - start
            if len(values) != len(texts):
                raise RuntimeError(
                    f"reward {item.reward.name!r} returned {len(values)} "
                    f"scores for {len(texts)} texts"
                )
            name = item.reward.name
            self.last_seconds[name] = self.last_seconds.get(name, 0.0) + elapsed
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            for i, value in enumerate(values):
                value = float(value)
                components[i][item.label] = value
                totals[i] += item.weight * value
        return [RewardScore(total=t, components=c) for t, c in zip(totals, components)]


    def score_partial(self, texts: list[str], prompt: str,
                      tokens_left: list[int]) -> list[RewardScore]:
        """Scores of unfinished texts, each reward by its partial rule (see
        rewardmodels.partial): with a positive weight the bound is the best reachable value,
        with a negative one the worst, so that a text is never pruned for what it may still
        become nor kept for what it may still lose."""
        from alignserve.rewardmodels.partial import partial_scores

        if not self.items:
            return [RewardScore(total=None, components={}) for _ in texts]
        components: list[dict[str, float]] = [{} for _ in texts]
        totals = [0.0] * len(texts)
        for item in self.items:
            start = time.perf_counter()
            values = partial_scores(item.reward, list(texts), prompt, tokens_left,
                                    optimistic=item.weight >= 0)
            elapsed = time.perf_counter() - start
            name = item.reward.name
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            for i, value in enumerate(values):
                components[i][item.label] = float(value)
                totals[i] += item.weight * float(value)
        return [RewardScore(total=t, components=c) for t, c in zip(totals, components)]


def _param_path(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _first_error(e: ValidationError, prefix: str) -> RewardSpecError:
    err = e.errors(include_url=False)[0]
    path = _param_path(prefix, tuple(err["loc"]))
    key = _param_path("", tuple(err["loc"])).lstrip(".")
    if err["type"] == "extra_forbidden":
        message = f"unknown argument {key!r}"
    elif err["type"] == "missing":
        message = f"missing required argument {key!r}"
    else:
        message = f"{key}: {err['msg']}" if key else err["msg"]
    return RewardSpecError(message, path)


def _model_kind(name: str, model: Reward) -> RewardKind:
    class NoArgs(RewardArgs):
        pass

    return RewardKind(
        name=name,
        description=f"Reward model {name!r} served from a local checkpoint: the logit it "
        "gives (prompt, text); unbounded, higher is better.",
        args=NoArgs,
        factory=lambda args, param: model,
        output_range=(None, None),
        category="reward_model",
    )


class RewardRegistry:
    """Every reward a server offers by name: the built-ins plus the reward models it was
    started with."""

    def __init__(self, kinds: list[RewardKind] | tuple[RewardKind, ...] = ()) -> None:
        self.kinds: dict[str, RewardKind] = {}
        for kind in kinds:
            self.add_kind(kind)

    @classmethod
    def default(cls) -> RewardRegistry:
        return cls(BUILTIN_KINDS)

    def add_kind(self, kind: RewardKind) -> None:
        if kind.name in self.kinds:
            raise ValueError(f"reward {kind.name!r} is already registered")
        self.kinds[kind.name] = kind

    def add_reward(self, name: str, reward: Reward) -> None:
        """Offer an already-loaded scorer (argument-less) under `name`."""
        if reward.name != name:  # components and timings are keyed by reward.name
            raise ValueError(f"reward named {reward.name!r} registered as {name!r}")
        self.add_kind(_model_kind(name, reward))

    def add_model(self, name: str, path: str | Path, device: str = "cpu") -> None:
        """Load `--reward-model NAME=PATH` (a local HF sequence-classification model)."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"reward model name {name!r}: use letters, digits, - and _")
        if name in self.kinds:
            raise ValueError(f"reward {name!r} is already registered")
        from alignserve.rewardmodels.hf_reward_model import HFRewardModel

        self.add_reward(name, HFRewardModel(name, path, device))

    @property
    def names(self) -> list[str]:
        return list(self.kinds)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for kind in self.kinds.values():
            entry = kind.describe()
            entry["arguments"] = [dict(WEIGHT_ARGUMENT), *entry["arguments"]]
            out.append(entry)
        return out

    def build(
        self, specs: Any, max_rewards: int = DEFAULT_MAX_REWARDS, param: str = "alignment.rewards"
    ) -> ComposedReward:
        """Validate the client's reward specs and build their weighted sum. Every problem
        is a RewardSpecError naming the offending field's path."""
        if specs is None:
            return ComposedReward()
        if not isinstance(specs, list):
            raise RewardSpecError("rewards must be a list", param)
        if len(specs) > max_rewards:
            raise RewardSpecError(
                f"at most {max_rewards} rewards per request, got {len(specs)}", param
            )
        items: list[WeightedReward] = []
        seen: dict[str, int] = {}
        for i, spec in enumerate(specs):
            reward, weight = self._build_one(spec, f"{param}[{i}]")
            seen[reward.name] = seen.get(reward.name, 0) + 1
            n = seen[reward.name]
            label = reward.name if n == 1 else f"{reward.name}#{n}"
            items.append(WeightedReward(label, weight, reward))
        return ComposedReward(items)

    def _build_one(self, spec: Any, param: str) -> tuple[Reward, float]:
        if not isinstance(spec, dict):
            raise RewardSpecError("each reward must be an object", param)
        args = dict(spec)
        name = args.pop("name", None)
        if name is None:
            raise RewardSpecError("missing required argument 'name'", f"{param}.name")
        if not isinstance(name, str) or name not in self.kinds:
            raise RewardSpecError(
                f"unknown reward {name!r}; available: {', '.join(self.kinds)}", f"{param}.name"
            )
        weight = args.pop("weight", 1.0)
        # bool is an int subclass in Python, but `true` is not a weight.
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RewardSpecError("weight must be a number", f"{param}.weight")
        try:
            weight = float(weight)  # a huge JSON integer overflows here
        except OverflowError:
            weight = math.inf
        if not math.isfinite(weight):
            raise RewardSpecError("weight must be finite", f"{param}.weight")
        kind = self.kinds[name]
        try:
            validated = kind.args.model_validate(args)
        except ValidationError as e:
            raise _first_error(e, param) from e
        return kind.factory(validated, param), weight
