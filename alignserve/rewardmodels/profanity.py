"""The `profanity` reward: a small English profanity lexicon of our own (no model, no
download). Higher is cleaner, so it composes with positive weights like every reward."""

from __future__ import annotations

import re

from alignserve.rewardmodels.kind import RewardArgs, RewardKind

# Stems; common inflections are matched by _SUFFIXES. Whole words only, so "class",
# "Scunthorpe" or "cocktail" never match.
# fmt: off
_STEMS = (
    "fuck", "motherfuck", "shit", "bullshit", "horseshit", "bitch", "bastard", "asshole",
    "arsehole", "dickhead", "cunt", "wank", "wanker", "twat", "prick", "slut", "whore",
    "bollock", "goddamn", "damn", "crap", "piss", "douchebag", "jackass", "dumbass",
)
# fmt: on
_SUFFIXES = r"(?:s|es|ed|er|ers|ing|in|y|ty|py|tier)?"
_PATTERN = re.compile(
    rf"(?<!\w)(?:{'|'.join(sorted(map(re.escape, _STEMS), key=len, reverse=True))})"
    rf"{_SUFFIXES}(?!\w)",
    re.IGNORECASE,
)


def count_profanities(text: str) -> int:
    return sum(1 for _ in _PATTERN.finditer(text))


class ProfanityArgs(RewardArgs):
    pass


class ProfanityReward:
    """1.0 for text with no lexicon word; each occurrence halves the score (0.5 ** count),
    so one slip is penalised clearly and a tirade approaches 0."""

    name = "profanity"
    score_range = (0.0, 1.0)

    def score(self, texts: list[str], prompt: str = "") -> list[float]:
        return [0.5 ** count_profanities(t) for t in texts]


PROFANITY = RewardKind(
    name="profanity",
    description="Cleanliness under a built-in English profanity lexicon: 1.0 with none, "
    "halved per profane word (0.5 ** count). Whole words, case-insensitive.",
    args=ProfanityArgs,
    factory=lambda args, param: ProfanityReward(),
    category="classifier",
)
