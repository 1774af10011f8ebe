"""Task metrics, computed on the client side from the returned text (never trusted from the
server's reward report, which the evaluation records beside them).

- `coverage`: fraction of the concept words present as whole words (case-insensitive, no
  stemming: the same rule as the `keywords` reward);
- `word_count` / `length_error`: words are whitespace-separated tokens holding a letter or
  digit (the `length` reward's rule), the error is |words - N|;
- `sentiment`: VADER compound c mapped to [0, 1] as (c + 1) / 2 (the `sentiment` reward);
- `repetition(text, n)`: the share of a text's n-grams that repeat an earlier n-gram of the same
  text, 1 - unique/total (Welleck et al.'s seq-rep-n; 0 for a text with no repeats);
- `distinct(text, n)`: unique/total n-grams of one text (Li et al.'s distinct-n, per text);
- `perplexity(logprobs)`: exp(-mean) of the returned tokens' log-probs.
  n-grams are over lower-cased words (letters, digits, inner apostrophes); punctuation is
  not a token. A text with fewer than n words has no n-grams: both give None (left out of means).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def _concept_pattern(concept: str) -> re.Pattern[str]:
    body = r"\s+".join(re.escape(part) for part in concept.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def coverage(text: str, concepts: Sequence[str]) -> float:
    """Fraction of `concepts` that appear in `text` as whole words."""
    if not concepts:
        raise ValueError("coverage needs at least one concept")
    return sum(1 for c in concepts if _concept_pattern(c).search(text)) / len(concepts)


def word_count(text: str) -> int:
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def length_error(text: str, target: int) -> int:
    """|words - target|."""
    return abs(word_count(text) - target)


def sentiment(text: str) -> float:
    """VADER positivity in [0, 1] (0.5 is neutral)."""
    from alignserve.rewardmodels.sentiment import analyzer

    return (1.0 + analyzer().polarity_scores(text)["compound"]) / 2.0


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError("n must be at least 1")
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repetition(text: str, n: int = 4) -> float | None:
    """1 - unique/total n-grams of the text; None when it has no n-gram."""
    grams = ngrams(words(text), n)
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def distinct(text: str, n: int) -> float | None:
    """unique/total n-grams of the text; None when it has no n-gram."""
    grams = ngrams(words(text), n)
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def perplexity(logprobs: Sequence[float | None] | None) -> float | None:
    """exp(-mean log-prob) of a text's tokens; None without any."""
    kept = [float(lp) for lp in logprobs or () if lp is not None and math.isfinite(lp)]
    return math.exp(-sum(kept) / len(kept)) if kept else None


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
