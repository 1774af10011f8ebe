"""The `regex` reward: does the text match a client-supplied pattern?

Client patterns can backtrack catastrophically, so matching uses the `regex` package,
whose matcher honours a time limit; a match that runs out of time scores 0.0.
"""

from __future__ import annotations

from typing import Literal

import regex
from pydantic import Field

from alignserve.rewardmodels.kind import RewardArgs, RewardKind
from alignserve.rewardmodels.protocol import RewardSpecError

MAX_PATTERN_CHARS = 1000
MATCH_TIMEOUT_S = 0.05  # per text: bounds a request of N candidates to N * 50 ms


class RegexArgs(RewardArgs):
    pattern: str = Field(
        min_length=1,
        max_length=MAX_PATTERN_CHARS,
        description="Regular expression (Python `regex` syntax, at most 1000 characters). "
        "Matching is time-bounded; a match that times out scores 0.",
    )
    mode: Literal["search", "fullmatch"] = Field(
        default="search",
        description="`search`: match anywhere in the text; `fullmatch`: the whole text.",
    )
    ignore_case: bool = Field(default=False, description="Match case-insensitively.")


class RegexReward:
    """1.0 when the pattern matches the text, else 0.0 (also on timeout)."""

    name = "regex"
    score_range = (0.0, 1.0)

    def __init__(
        self, compiled: regex.Pattern, mode: str, timeout_s: float = MATCH_TIMEOUT_S
    ) -> None:
        self.compiled = compiled
        self.mode = mode
        self.timeout_s = timeout_s
        self.timeouts = 0  # how many texts ran out of time (for logs and tests)

    def _matches(self, text: str) -> bool:
        match = self.compiled.fullmatch if self.mode == "fullmatch" else self.compiled.search
        try:
            return match(text, timeout=self.timeout_s) is not None
        except TimeoutError:
            self.timeouts += 1
            return False

    def score(self, texts: list[str], prompt: str = "") -> list[float]:
        return [1.0 if self._matches(t) else 0.0 for t in texts]

    def _viable(self, text: str) -> bool:
        """Whether some continuation of `text` matches: `regex`'s partial matching (a match that
        reaches the end of the text counts). A timeout counts as not viable."""
        match = self.compiled.fullmatch if self.mode == "fullmatch" else self.compiled.search
        try:
            return match(text, partial=True, timeout=self.timeout_s) is not None
        except TimeoutError:
            self.timeouts += 1
            return False

    def score_partial(self, texts: list[str], prompt: str, tokens_left: list[int],
                      optimistic: bool = True) -> list[float]:
        """1.0 while the text can still be extended into a match (prefix-valid), else 0.0."""
        return [1.0 if self._viable(t) else 0.0 for t in texts]


def compile_pattern(pattern: str, ignore_case: bool, param: str) -> regex.Pattern:
    flags = regex.IGNORECASE if ignore_case else 0
    try:
        return regex.compile(pattern, flags)
    except (regex.error, ValueError, OverflowError, RecursionError) as e:
        raise RewardSpecError(f"invalid regular expression: {e}", f"{param}.pattern") from e


def _build_regex(args: RegexArgs, param: str) -> RegexReward:
    return RegexReward(compile_pattern(args.pattern, args.ignore_case, param), args.mode)


REGEX = RewardKind(
    name="regex",
    description="1.0 if the text matches `pattern` (search or fullmatch), else 0.0. "
    f"Matching stops after {MATCH_TIMEOUT_S} s per text and then scores 0.0.",
    args=RegexArgs,
    factory=_build_regex,
)
