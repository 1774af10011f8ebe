"""The evaluation's task sets: what each item asks, which reward it sends, how its answer is
measured. The items live in data/*.json (written for this project); the prompts, rewards and
metrics are defined here.

| task | endpoint | asks | reward sent | primary metric |
| --- | --- | --- | --- | --- |
| keywords | chat | one sentence using 3-5 concept words | `keywords` (the concepts) | coverage, higher is better |
| length | chat | a question, "answer in N words" | `length` (target_words N) | abs(words - N), lower is better |
| sentiment | chat | a short review or reply | `sentiment` (positive) | VADER positivity, higher is better |
| continuation | completions | a story or news opening | none | 4-gram repetition, lower is better |
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from alignserve.evaluation import metrics as m

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    description: str


@dataclass(frozen=True)
class TaskItem:
    id: str
    prompt: str  # the user message (chat) or the raw prompt (completions)
    rewards: list[dict[str, Any]] | None  # alignment.rewards, None: nothing to score
    data: dict[str, Any] = field(default_factory=dict)  # the item as stored
    draw: int = 0  # which of an evaluation's --draws of this item (another seed)

    @property
    def seed(self) -> int:
        """A seed fixed per item and draw: every strategy samples item i's draw d with the same
        seed."""
        return zlib.crc32(self.id.encode()) + DRAW_SEED_STRIDE * self.draw


DRAW_SEED_STRIDE = 1_000_003  # draws of one item take seeds this far apart


class Task:
    name: str = ""
    endpoint: str = "chat"  # "chat" or "completions"
    wants_logprobs: bool = False  # ask for the chosen tokens' log-probs (score_logprobs reads them)
    description: str = ""
    metrics: tuple[Metric, ...] = ()

    def __init__(self, items: list[TaskItem]) -> None:
        self.items = items

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    @property
    def has_reward(self) -> bool:
        return any(item.rewards for item in self.items)

    @classmethod
    def load(cls, path: Path | None = None) -> Task:
        raw = json.loads((path or DATA / f"{cls.name}.json").read_text())
        if raw.get("task") != cls.name:
            raise ValueError(f"{path}: task {raw.get('task')!r}, expected {cls.name!r}")
        return cls([cls.make_item(entry) for entry in raw["items"]])

    @classmethod
    def make_item(cls, entry: dict[str, Any]) -> TaskItem:
        raise NotImplementedError

    def max_tokens(self, item: TaskItem, default: int) -> int:
        """The item's token budget given the run's --max-tokens."""
        return default

    def score(self, item: TaskItem, text: str) -> dict[str, float | None]:
        raise NotImplementedError

    def score_logprobs(self, logprobs: list[float] | None) -> dict[str, float | None]:
        """Metrics read from the returned tokens' log-probs (tasks with wants_logprobs)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint, "description": self.description,
                "has_reward": self.has_reward, "items": len(self.items),
                "metrics": [{"name": x.name, "higher_is_better": x.higher_is_better,
                             "description": x.description} for x in self.metrics]}


class KeywordsTask(Task):
    name = "keywords"
    description = "One sentence using 3-5 given concept words (CommonGen style)."
    metrics = (Metric("coverage", True, "fraction of the concepts used as whole words"),)

    @classmethod
    def make_item(cls, entry: dict[str, Any]) -> TaskItem:
        concepts = list(entry["concepts"])
        prompt = ("Write one sentence that uses all of these words: "
                  f"{', '.join(concepts)}.")
        return TaskItem(entry["id"], prompt, [{"name": "keywords", "keywords": concepts}], entry)

    def score(self, item: TaskItem, text: str) -> dict[str, float | None]:
        return {"coverage": m.coverage(text, item.data["concepts"])}


class LengthTask(Task):
    name = "length"
    description = "Answer a question in N words (N from 5 to 40)."
    metrics = (Metric("length_error", False, "mean |words - N|"),
               Metric("words", True, "mean word count"))

    @classmethod
    def make_item(cls, entry: dict[str, Any]) -> TaskItem:
        n = int(entry["words"])
        prompt = f"{entry['question']} Answer in {n} words."
        return TaskItem(entry["id"], prompt, [{"name": "length", "target_words": n}], entry)

    def max_tokens(self, item: TaskItem, default: int) -> int:
        # Room for N words (about 1.3 tokens each) so that every target is reachable.
        return max(default, math.ceil(1.5 * item.data["words"]) + 8)

    def score(self, item: TaskItem, text: str) -> dict[str, float | None]:
        return {"length_error": float(m.length_error(text, item.data["words"])),
                "words": float(m.word_count(text))}


class SentimentTask(Task):
    name = "sentiment"
    description = "A short review or reply; positive sentiment is rewarded."
    metrics = (Metric("sentiment", True, "VADER positivity in [0, 1]"),)

    @classmethod
    def make_item(cls, entry: dict[str, Any]) -> TaskItem:
        return TaskItem(entry["id"], entry["prompt"],
                        [{"name": "sentiment", "target": "positive"}], entry)

    def score(self, item: TaskItem, text: str) -> dict[str, float | None]:
        return {"sentiment": m.sentiment(text)}


class ContinuationTask(Task):
    name = "continuation"
    endpoint = "completions"
    description = "Continue a story or news opening (raw completion, no reward)."
    wants_logprobs = True
    metrics = (Metric("rep4", False, "share of repeated 4-grams"),
               Metric("distinct2", True, "unique/total 2-grams"),
               Metric("distinct3", True, "unique/total 3-grams"),
               Metric("expert_ppl", False, "the expert's perplexity of the text, exp(-mean "
                      "token log-prob) from the log-probs the server returns (contrastive "
                      "reports the expert's; sampled decoding's are of its sampling "
                      "distribution): low repetition with a sane perplexity is not gibberish"))

    @classmethod
    def make_item(cls, entry: dict[str, Any]) -> TaskItem:
        return TaskItem(entry["id"], entry["text"], None, entry)

    def max_tokens(self, item: TaskItem, default: int) -> int:
        # Degeneration needs room to show: at least 64 tokens (these strategies are cheap).
        return max(default, 64)

    def score(self, item: TaskItem, text: str) -> dict[str, float | None]:
        return {"rep4": m.repetition(text, 4), "distinct2": m.distinct(text, 2),
                "distinct3": m.distinct(text, 3)}

    def score_logprobs(self, logprobs: list[float] | None) -> dict[str, float | None]:
        return {"expert_ppl": m.perplexity(logprobs)}


TASKS: dict[str, type[Task]] = {t.name: t for t in (KeywordsTask, LengthTask, SentimentTask,
                                                    ContinuationTask)}


@cache
def _load(name: str) -> Task:
    return TASKS[name].load()


def load_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return _load(name)
