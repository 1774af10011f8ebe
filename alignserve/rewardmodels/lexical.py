"""Word-level rewards: `keywords` (which words appear) and `length` (how many words)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, StringConstraints

from alignserve.rewardmodels.kind import RewardArgs, RewardKind
from alignserve.rewardmodels.protocol import RewardSpecError

MAX_KEYWORDS = 64
MAX_KEYWORD_CHARS = 200


def count_words(text: str) -> int:
    """Words are whitespace-separated tokens holding at least one letter or digit, so
    stray punctuation ("-", "...") does not count."""
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


# ---- keywords ---------------------------------------------------------------------------

Keyword = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEYWORD_CHARS)]


class KeywordsArgs(RewardArgs):
    keywords: list[Keyword] = Field(
        min_length=1,
        max_length=MAX_KEYWORDS,
        description=(
            "Words or phrases to include (1-64). Each counts when it appears as whole "
            "word(s), case-insensitively; no stemming ('whale' does not match 'whales'); "
            "a phrase matches across any whitespace."
        ),
    )


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    # Lookarounds rather than \b so keywords that start or end with punctuation
    # ("C++", ".NET") still need a non-word neighbour, and phrases match across any run
    # of whitespace (line breaks included).
    body = r"\s+".join(re.escape(part) for part in keyword.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


class KeywordsReward:
    """Fraction of the keywords present (each listed keyword counts once)."""

    name = "keywords"
    score_range = (0.0, 1.0)

    def __init__(self, keywords: list[str]) -> None:
        self.keywords = list(keywords)
        self._patterns = [_keyword_pattern(k) for k in keywords]
        # a keyword ending in a word character can still grow at the text's end ("sun" ->
        # "sunset"); one ending in punctuation ("C++") cannot: the next word needs a gap. The
        # pattern ignores surrounding spaces ("dog " matches "dog"), so its last character does
        self._may_grow = [bool(re.match(r"\w", k.rstrip()[-1])) for k in keywords]

    def score(self, texts: list[str], prompt: str = "") -> list[float]:
        n = len(self._patterns)
        return [sum(1 for p in self._patterns if p.search(t)) / n for t in texts]

    def score_partial(self, texts: list[str], prompt: str, tokens_left: list[int],
                      optimistic: bool = True) -> list[float]:
        """Coverage so far (see rewardmodels.partial): what a search ranks by. A keyword at
        the very end counts, as it usually stays a word; `floor_partial` does not count it."""
        return self.score(texts, prompt)

    def floor_partial(self, texts: list[str], prompt: str = "") -> list[float]:
        """The coverage no continuation can fall below: keywords present and complete (a
        character that ends the word follows, or the keyword cannot grow)."""
        n = len(self._patterns)
        return [sum(1 for p, grows in zip(self._patterns, self._may_grow)
                    if any(not grows or m.end() < len(t) for m in p.finditer(t))) / n
                for t in texts]


def _build_keywords(args: KeywordsArgs, param: str) -> KeywordsReward:
    for i, keyword in enumerate(args.keywords):
        if not keyword.strip():
            raise RewardSpecError(
                "a keyword must contain a non-space character", f"{param}.keywords[{i}]"
            )
    return KeywordsReward(args.keywords)


KEYWORDS = RewardKind(
    name="keywords",
    description="Fraction of the given keywords that appear in the text as whole words "
    "(case-insensitive, exact words: no stemming).",
    args=KeywordsArgs,
    factory=_build_keywords,
)


# ---- length -----------------------------------------------------------------------------


class LengthArgs(RewardArgs):
    target_words: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Ideal word count: 1.0 there, falling linearly to 0.0 at a distance "
        "of target_words. Give this or min_words/max_words, not both.",
    )
    min_words: int | None = Field(
        default=None,
        ge=0,
        le=100_000,
        description="Lower bound of the ideal range (below it the score falls linearly, "
        "reaching 0.0 at 0 words).",
    )
    max_words: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Upper bound of the ideal range (above it the score falls linearly, "
        "reaching 0.0 at 2 * max_words).",
    )


def _decay(distance: int, scale: int) -> float:
    """1 at distance 0, linearly down to 0 at distance >= scale."""
    if scale <= 0:
        return 1.0 if distance <= 0 else 0.0
    return max(0.0, 1.0 - distance / scale)


class LengthReward:
    """1.0 at the target word count (or inside [min_words, max_words]), decaying
    linearly with the distance relative to the target (or the nearest bound)."""

    name = "length"
    score_range = (0.0, 1.0)

    def __init__(
        self, target: int | None = None, lo: int | None = None, hi: int | None = None
    ) -> None:
        self.target, self.lo, self.hi = target, lo, hi

    def score_words(self, words: int) -> float:
        if self.target is not None:
            return _decay(abs(words - self.target), self.target)
        if self.lo is not None and words < self.lo:
            return _decay(self.lo - words, self.lo)
        if self.hi is not None and words > self.hi:
            return _decay(words - self.hi, self.hi)
        return 1.0

    def score(self, texts: list[str], prompt: str = "") -> list[float]:
        return [self.score_words(count_words(t)) for t in texts]

    def reachable(self, words: int, more_words: int, optimistic: bool = True) -> float:
        """Best (worst, when not optimistic) score_words over [words, words + more_words]: the
        value a text of `words` words could reach once finished. score_words is unimodal (peak
        at the target or over the range), so the extremes are at the ends or the peak's points
        clamped into the range."""
        hi = words + max(0, more_words)
        points = {words, hi}
        for peak in (self.target, self.lo, self.hi):
            if peak is not None:
                points.add(min(max(peak, words), hi))
        values = [self.score_words(w) for w in points]
        return max(values) if optimistic else min(values)

    def score_partial(self, texts: list[str], prompt: str, tokens_left: list[int],
                      optimistic: bool = True) -> list[float]:
        """The reachable bound: a token adds at most one word, so a text with `left` tokens to
        go can end with any count in [words, words + left]."""
        return [self.reachable(count_words(t), left, optimistic)
                for t, left in zip(texts, tokens_left)]


def _build_length(args: LengthArgs, param: str) -> LengthReward:
    has_range = args.min_words is not None or args.max_words is not None
    if args.target_words is not None and has_range:
        raise RewardSpecError(
            "give target_words or min_words/max_words, not both", f"{param}.target_words"
        )
    if args.target_words is None and not has_range:
        raise RewardSpecError(
            "length needs target_words, or min_words and/or max_words", f"{param}.target_words"
        )
    if (
        args.min_words is not None
        and args.max_words is not None
        and args.min_words > args.max_words
    ):
        raise RewardSpecError("min_words must not exceed max_words", f"{param}.min_words")
    return LengthReward(args.target_words, args.min_words, args.max_words)


LENGTH = RewardKind(
    name="length",
    description="Closeness of the word count to target_words, or to the range "
    "[min_words, max_words]: 1.0 on target, linear decay outside.",
    args=LengthArgs,
    factory=_build_length,
)
