"""The reward contract every scorer implements, and the error a bad reward spec raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@runtime_checkable
class Reward(Protocol):
    """Scores candidate continuations of one prompt; higher is better.

    `score` is batched: one call scores every candidate, so a model-backed reward can run
    them as one forward pass.
    """

    name: str

    def score(self, texts: list[str], prompt: str) -> list[float]: ...


# Optional attributes a reward may define (rewardmodels.compose reads them with getattr):
# - `score_range = (lo, hi)`: every score lies in [lo, hi] (unset: unbounded, e.g. a reward
#   model's logit). It gives the composed total its ceiling, which lets a search stop once a
#   text has reached it (nothing can beat it).
# - `floor_partial(texts, prompt) -> list[float]`: for unfinished texts, a score that no
#   continuation finishes below (keywords: the keywords already complete words), so a text
#   whose floor is at `hi` is sure to finish there.


class RewardSpecError(ValueError):
    """A reward spec the client sent is invalid.

    `param` is the dotted path of the offending field as the HTTP client sees it
    (e.g. `alignment.rewards[1].keywords`); the server reports it as the 400's `param`.
    """

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class RewardScore:
    """One candidate's reward: the weighted total (None when no reward was asked for) and
    each reward's unweighted score by label."""

    total: float | None
    components: dict[str, float] = field(default_factory=dict)
