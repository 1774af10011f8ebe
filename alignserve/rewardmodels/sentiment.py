"""The `sentiment` reward: VADER's lexicon classifier, which ships inside the
vaderSentiment package (no download, no network)."""

from __future__ import annotations

import threading
from typing import Any, Literal

from pydantic import Field

from alignserve.rewardmodels.kind import RewardArgs, RewardKind

_analyzer: Any = None
_lock = threading.Lock()


def analyzer() -> Any:
    """The one VADER analyzer, loaded on first use (reading its lexicon takes ~0.1 s)."""
    global _analyzer
    if _analyzer is None:
        with _lock:
            if _analyzer is None:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

                _analyzer = SentimentIntensityAnalyzer()
    return _analyzer


class SentimentArgs(RewardArgs):
    target: Literal["positive", "negative"] = Field(
        default="positive", description="Which sentiment scores high."
    )


class SentimentReward:
    """VADER compound score c in [-1, 1] mapped to [0, 1]: (c + 1) / 2 for a positive
    target, (1 - c) / 2 for a negative one; neutral text scores 0.5."""

    name = "sentiment"
    score_range = (0.0, 1.0)  # (1 + compound) / 2, compound in [-1, 1]

    def __init__(self, target: str = "positive") -> None:
        self.sign = 1.0 if target == "positive" else -1.0

    def score(self, texts: list[str], prompt: str = "") -> list[float]:
        vader = analyzer()
        return [(1.0 + self.sign * vader.polarity_scores(t)["compound"]) / 2.0 for t in texts]


SENTIMENT = RewardKind(
    name="sentiment",
    description="Offline VADER sentiment of the text mapped to [0, 1] "
    "((compound + 1) / 2; flipped for target=negative).",
    args=SentimentArgs,
    factory=lambda args, param: SentimentReward(args.target),
    category="classifier",
)
