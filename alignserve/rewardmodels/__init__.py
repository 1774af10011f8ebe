"""Rewards: the protocol, the built-in rewards, reward-model wrappers and their weighted
composition per request."""

from alignserve.rewardmodels.compose import ComposedReward, RewardRegistry, WeightedReward
from alignserve.rewardmodels.protocol import Reward, RewardScore, RewardSpecError

__all__ = [
    "ComposedReward",
    "Reward",
    "RewardRegistry",
    "RewardScore",
    "RewardSpecError",
    "WeightedReward",
]
