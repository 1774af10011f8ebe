"""Decoding strategies; importing this package registers the built-in ones."""

from alignserve.decoding import best_of_n, sample  # noqa: F401  (registration)
from alignserve.decoding.base import (
    STRATEGIES,
    ChoiceDelta,
    ChoiceFinal,
    DecodeContext,
    DecodeEvent,
    DecodeRequest,
    RequestSummary,
    Strategy,
    StrategyParams,
)

__all__ = [
    "STRATEGIES", "ChoiceDelta", "ChoiceFinal", "DecodeContext", "DecodeEvent", "DecodeRequest",
    "RequestSummary", "Strategy", "StrategyParams",
]
