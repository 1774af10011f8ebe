"""The strategy configurations the evaluation compares, by label.

Each is an `alignment` object (strategy plus its own keys; the task adds `rewards`) and a
decoding mode: "sampled" requests use the run's temperature and a per-item seed, "greedy" ones
temperature 0 (deal is deterministic whatever the temperature). `tasks` is where a configuration
is meaningful: vas steers with the server's default value model (positive sentiment), so it runs
on the sentiment task, as do vas_c2 / vas_c3 (VAS with best-of-2 / 3 by the task's reward);
contrastive and greedy are the continuation task's pair; the reward-driven searches run on the
tasks that have a reward (best_of_2 / best_of_8 and the cheaper DeAL only on keywords, where the
issue's DeAL goal is measured at equal model tokens). `--all-pairs` runs every configuration on every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REWARD_TASKS = ("keywords", "length", "sentiment")
SEARCH_TASKS = ("keywords", "sentiment")  # where the pruning searches' goal is measured


@dataclass(frozen=True)
class StrategyConfig:
    label: str
    alignment: dict[str, Any]
    decoding: str = "sampled"  # "sampled" | "greedy"
    tasks: tuple[str, ...] | None = None  # None: every task
    description: str = ""

    @property
    def strategy(self) -> str:
        return self.alignment["strategy"]

    def applies_to(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "alignment": self.alignment, "decoding": self.decoding,
                "tasks": list(self.tasks) if self.tasks is not None else None,
                "description": self.description}


CONFIGS: dict[str, StrategyConfig] = {c.label: c for c in (
    StrategyConfig("greedy", {"strategy": "sample"}, "greedy", ("continuation",),
                   "plain decoding at temperature 0 (the continuation baseline)"),
    StrategyConfig("sample", {"strategy": "sample"}, "sampled", None,
                   "plain sampling; the reward only reports"),
    StrategyConfig("best_of_4", {"strategy": "best_of_n", "candidates": 4}, "sampled",
                   REWARD_TASKS, "best of 4 sampled candidates by reward"),
    StrategyConfig("best_of_16", {"strategy": "best_of_n", "candidates": 16}, "sampled",
                   REWARD_TASKS, "best of 16 sampled candidates by reward"),
    StrategyConfig("best_of_2", {"strategy": "best_of_n", "candidates": 2}, "sampled",
                   ("keywords",), "best of 2: the low end of best_of_n's tokens-coverage curve"),
    StrategyConfig("best_of_8", {"strategy": "best_of_n", "candidates": 8}, "sampled",
                   ("keywords",), "best of 8: fills best_of_n's curve where DeAL's spend lies, "
                   "so the two compare at equal model tokens"),
    StrategyConfig("deal", {"strategy": "deal"}, "greedy", REWARD_TASKS,
                   "DeAL lookahead search with the server's defaults"),
    StrategyConfig("deal_k2", {"strategy": "deal", "top_k": 2}, "greedy", ("keywords",),
                   "DeAL with 2 actions per beam and step: a cheaper point on its curve"),
    StrategyConfig("vas", {"strategy": "vas"}, "sampled", ("sentiment",),
                   "value-augmented sampling with the server's default value model"),
    StrategyConfig("vas_c2", {"strategy": "vas", "candidates": 2}, "sampled", ("sentiment",),
                   "VAS composed with best-of-2: two VAS-guided candidates share one prefill, "
                   "the better by reward is returned"),
    StrategyConfig("vas_c3", {"strategy": "vas", "candidates": 3}, "sampled", ("sentiment",),
                   "VAS composed with best-of-3 (about a quarter of best_of_16's tokens)"),
    StrategyConfig("best_of_16_soft", {"strategy": "best_of_n", "candidates": 16,
                                       "selection": "soft"}, "sampled", ("keywords",),
                   "soft best-of-16: the winner drawn from softmax(reward / lambda)"),
    StrategyConfig("sr_16", {"strategy": "speculative_rejection", "candidates": 16}, "sampled",
                   SEARCH_TASKS, "speculative rejection from 16 candidates at the server's "
                   "defaults (the issue's goal: best_of_16's reward at <= 0.4x its tokens)"),
    StrategyConfig("pf_16", {"strategy": "particle_filter", "candidates": 16}, "sampled",
                   SEARCH_TASKS, "particle filtering with 16 particles at the server's defaults"),
    StrategyConfig("contrastive", {"strategy": "contrastive"}, "greedy", ("continuation",),
                   "contrastive decoding with the server's default amateur, greedy"),
)}


def parse_configs(spec: str | None) -> list[StrategyConfig]:
    """`a,b,c` labels (None or "all": every configuration), in the order given."""
    if spec is None or spec.strip() in ("", "all"):
        return list(CONFIGS.values())
    out = []
    for label in (s.strip() for s in spec.split(",")):
        if label not in CONFIGS:
            raise ValueError(f"unknown strategy configuration {label!r}; choose from "
                             f"{', '.join(CONFIGS)}")
        if label not in [c.label for c in out]:
            out.append(CONFIGS[label])
    return out
