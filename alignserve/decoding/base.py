"""What every strategy shares: the request it decodes, the events it yields, its registry.

A strategy is an async generator `run(ctx)` that drives an engine through the engine
protocol, scores text through a composed reward, and yields `ChoiceDelta` (tokens of a
choice, for streaming), `ChoiceFinal` (a finished choice with its reward report) and, last,
one `RequestSummary` (what the search cost).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from alignserve.decoding.kv import KvSlots, branching
from alignserve.engine.protocol import Engine, SamplingParams, TokenTally


class StrategyParams(BaseModel):
    """Base of each strategy's own `alignment` keys: unknown keys are an error, and so is a JSON
    value of the wrong type (strict, as the request model: `"candidates": "8"` is a 400, not 8;
    ints are accepted where floats go)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StrategyInputError(ValueError):
    """A request a strategy cannot serve because of what the client asked for (the server
    answers 400). `param` is the offending field as the client sees it, e.g.
    `alignment.amateur`. Raised by `Strategy.check` (before any work) and by `run`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class DecodeRequest:
    request_id: str
    prompt_ids: list[int]
    prompt_text: str
    sampling: SamplingParams
    n: int
    strategy: str
    params: StrategyParams
    reward: Any  # rewardmodels.compose.ComposedReward (may be empty)
    stream: bool = False
    messages: list[dict] | None = None  # chat requests: the messages (contrastive's lame prompt)
    continue_final: bool = False  # the prompt continues the final (assistant) message


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class ChoiceFinal:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    reward: float | None
    components: dict[str, float]
    cumulative_logprob: float = 0.0
    logprobs: list[dict] = field(default_factory=list)
    streamed: bool = False  # its text already went out as ChoiceDelta events


@dataclass
class RequestSummary:
    strategy: str
    candidates_scored: int
    model_tokens: int
    prompt_tokens: int
    completion_tokens: int
    reward_seconds: float
    seconds: float
    tally: TokenTally
    search: dict[str, Any] | None = None  # a pruning search's report (rounds, pruned, ...)


DecodeEvent = ChoiceDelta | ChoiceFinal | RequestSummary


@dataclass
class DecodeContext:
    engine: Engine
    request: DecodeRequest
    # Server-wide things strategies may use: value models (vas), amateurs (contrastive).
    # See alignserve.decoding.resources; None means the strategy's built-in defaults.
    resources: Any = None
    tally: TokenTally = field(default_factory=TokenTally)
    started: float = field(default_factory=time.perf_counter)
    reward_seconds: float = 0.0
    candidates_scored: int = 0
    # The prompt already computed (a batch's shared prefix, or prompt log-probs): a pending
    # sequence the strategy takes over instead of prefilling (decoding.common.take_root).
    root: Any = None

    def summary(self, completion_tokens: int, search: dict[str, Any] | None = None) -> RequestSummary:
        return RequestSummary(
            strategy=self.request.strategy,
            candidates_scored=self.candidates_scored,
            model_tokens=self.tally.total,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=completion_tokens,
            reward_seconds=self.reward_seconds,
            seconds=time.perf_counter() - self.started,
            tally=self.tally,
            search=search,
        )


StrategyRun = Callable[[DecodeContext], AsyncIterator[DecodeEvent]]
# Checks that need the engine or the server's resources (request, engine, resources); raise
# StrategyInputError. The server calls it before it starts the run (so that a streamed request
# still gets a 400); `run` calls it again for callers that skip the server.
StrategyCheck = Callable[[DecodeRequest, Engine, Any], None]


@dataclass
class Strategy:
    name: str
    description: str
    params: type[StrategyParams]
    run: StrategyRun
    streams: str = "tokens"  # how it streams: "tokens", "winner", "agreed-prefix"
    check: StrategyCheck | None = None
    # The most KV slots one request holds at once (decoding.kv); admission reserves it. The
    # default suits strategies whose branches only ever shrink in number.
    kv_slots: KvSlots = branching


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    STRATEGIES[strategy.name] = strategy
    return strategy
