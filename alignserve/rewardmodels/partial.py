"""Scoring unfinished text: what a search that prunes or resamples part-way ranks by.

A reward may define `score_partial(texts, prompt, tokens_left, optimistic)`: the score of texts
that will go on for up to `tokens_left[i]` more tokens. `optimistic` says which bound a reward
that can only be judged when finished should give: the best value reachable (a positive weight:
never prune a text that can still reach the target) or the worst (a negative weight). Rewards
without it (classifiers, reward models) score the partial text as it is.

The built-in rules (each beside its reward):
- keywords: coverage so far (a keyword once present stays present);
- length: the best (worst) value any finished text reachable from here could get;
- regex: 1.0 while the text can still be extended into a match, else 0.0;
- json_schema: 1.0 while the JSON begun so far can still be completed, else its ordinary score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def partial_scores(reward: Any, texts: list[str], prompt: str, tokens_left: Sequence[int],
                   optimistic: bool = True) -> list[float]:
    """`reward`'s scores of unfinished texts: its own rule, or its ordinary score."""
    method = getattr(reward, "score_partial", None)
    if method is None:
        return list(reward.score(texts, prompt))
    return list(method(texts, prompt, list(tokens_left), optimistic))


# ---- JSON prefixes ------------------------------------------------------------------------

_LITERALS = ("true", "false", "null")
_NUMBER_CHARS = set("0123456789+-.eE")


def json_prefix_ok(text: str) -> bool:
    """Whether `text` is a prefix of some JSON value (possibly the whole of one, possibly with
    trailing text after a complete value). A syntax check, not a schema check."""
    stack: list[str] = []  # "{" or "[" per open container
    # next: "value", "first" (a value or "]" just after "["), "key", "first_key" (a key or "}"
    # just after "{"), "colon", "after" ("," or the closer), "done" (a whole value was read)
    expect = "value"
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        if expect == "done":
            return True  # a whole value, then anything (the reward reads the first value)
        closes = {"first": "]", "first_key": "}", "after": "]" if stack[-1:] == ["["] else "}"}
        if expect in closes and ch == closes[expect]:
            stack.pop()
            i += 1
            expect = "after" if stack else "done"
            continue
        if expect in ("colon", "after") and ch != (":" if expect == "colon" else ","):
            return False
        if expect == "colon":
            i, expect = i + 1, "value"
            continue
        if expect == "after":  # ch == ","
            i, expect = i + 1, "key" if stack[-1] == "{" else "value"
            continue
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                return True  # inside a string
            i += 1
            expect = "colon" if expect in ("key", "first_key") else ("after" if stack else "done")
            continue
        if expect in ("key", "first_key"):
            return False  # keys are strings
        if ch in "{[":
            stack.append(ch)
            i += 1
            expect = "first_key" if ch == "{" else "first"
            continue
        if ch in "-0123456789":
            while i < n and text[i] in _NUMBER_CHARS:
                i += 1
            expect = "after" if stack else "done"
            continue
        for lit in _LITERALS:
            chunk = text[i:i + len(lit)]
            if lit.startswith(chunk):
                if len(chunk) < len(lit):
                    return True  # the text ends inside the literal
                i += len(lit)
                expect = "after" if stack else "done"
                break
        else:
            return False
    return True
