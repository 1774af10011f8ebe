"""Decoding strategies; importing this package registers the built-in ones."""

from alignserve.decoding import (  # noqa: F401  (registration)
    best_of_n,
    contrastive,
    deal,
    particle_filter,
    sample,
    speculative_rejection,
    vas,
)
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
