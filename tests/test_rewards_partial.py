"""Partial-text scoring: each reward's rule for unfinished text (rewardmodels.partial) and the
composed reward's bound by the sign of each weight."""

from __future__ import annotations

import pytest

from alignserve.rewardmodels.compose import RewardRegistry
from alignserve.rewardmodels.partial import json_prefix_ok, partial_scores


@pytest.fixture(scope="module")
def registry():
    return RewardRegistry.default()


def test_keywords_partial_is_coverage_so_far(registry):
    r = registry.build([{"name": "keywords", "keywords": ["dog", "park"]}])
    (s,) = r.score_partial(["The dog ran"], "", [10])
    assert s.total == 0.5 and s.components == {"keywords": 0.5}


def test_length_partial_is_the_reachable_bound_by_weight_sign(registry):
    # 3 words now, at most 4 more tokens (so at most 7 words): target 10 is out of reach, the
    # best reachable is 7 words (0.7), the worst staying at 3 (0.3)
    pos = registry.build([{"name": "length", "target_words": 10}])
    neg = registry.build([{"name": "length", "weight": -1.0, "target_words": 10}])
    assert pos.score_partial(["one two three"], "", [4])[0].total == pytest.approx(0.7)
    assert neg.score_partial(["one two three"], "", [4])[0].total == pytest.approx(-0.3)
    # with room to reach the target the bound is 1.0 whatever the current count
    assert pos.score_partial(["one two three"], "", [20])[0].total == pytest.approx(1.0)
    assert pos.score(["one two three"])[0].total == pytest.approx(0.3)  # finished: as it is


def test_regex_partial_is_prefix_validity(registry):
    r = registry.build([{"name": "regex", "pattern": r"\d{3}-\d{4}", "mode": "fullmatch"}])
    got = [s.total for s in r.score_partial(["555-", "555-12", "abc", ""], "", [5] * 4)]
    assert got == [1.0, 1.0, 0.0, 1.0]
    assert [s.total for s in r.score(["555-"])] == [0.0]  # finished, it does not match


@pytest.mark.parametrize("text, ok", [
    ("", True), ("{", True), ('{"a": [1, tr', True), ('{"a": 1,}', False), ("[1 2", False),
    ('"unterminated', True), ("{1", False), ("[1, 2] then prose", True), ('{"k" 1', False),
])
def test_json_prefix_ok(text, ok):
    assert json_prefix_ok(text) is ok


def test_json_schema_partial_keeps_viable_prefixes(registry):
    schema = {"type": "object", "required": ["a"]}
    r = registry.build([{"name": "json_schema", "schema": schema}])
    texts = ['```json\n{"a": ', 'Sure: {"a"', '{"a": }', "no json yet", ""]
    got = [s.total for s in r.score_partial(texts, "", [8] * len(texts))]
    # viable JSON prefixes 1.0 (in a fence or after prose); broken JSON and prose get their
    # ordinary score (0.0: no JSON parses); an empty text can still become anything
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_classifiers_without_a_rule_score_the_text_as_it_is(registry):
    r = registry.build([{"name": "sentiment"}])
    (item,) = r.items
    assert not hasattr(item.reward, "score_partial")
    texts = ["I love this, it is wonderful", "This is awful"]
    assert partial_scores(item.reward, texts, "", [5, 5]) == item.reward.score(texts, "")


def test_ceiling_is_each_reward_at_its_best_end_by_weight_sign(registry):
    build = registry.build
    assert build([{"name": "keywords", "keywords": ["a"], "weight": 2.0},
                  {"name": "sentiment", "weight": 0.5}]).ceiling == pytest.approx(2.5)
    # a negative weight's best is its reward's lowest score: 0 for profanity (all profane)
    assert build([{"name": "keywords", "keywords": ["a"]},
                  {"name": "profanity", "weight": -1.0}]).ceiling == pytest.approx(1.0)
    assert build([{"name": "json_schema", "schema": {"type": "object"}}]).ceiling == 1.0
    assert build([]).ceiling is None


def test_sure_of_ceiling_needs_floor_rules_at_their_top(registry):
    kw = registry.build([{"name": "keywords", "keywords": ["dog", "park"]}])
    assert kw.sure_of_ceiling(["The dog", "The dog in the park."]) == [False, True]
    assert kw.reaches_ceiling(kw.score(["a dog park"])[0])
    assert not kw.reaches_ceiling(kw.score(["a dog"])[0])
    # length's partial rule is the best reachable value, not a floor: never sure while going
    both = registry.build([{"name": "keywords", "keywords": ["dog"]},
                           {"name": "length", "target_words": 2}])
    (going,) = both.score_partial(["The dog"], "", [10])
    assert going.total == both.ceiling and both.sure_of_ceiling(["The dog"]) == [False]
    # under a negative weight coverage may still grow (and lower the total): never sure
    neg = registry.build([{"name": "keywords", "keywords": ["dog"], "weight": -1.0}])
    (s,) = neg.score_partial(["The cat"], "", [10])
    assert s.total == neg.ceiling == 0.0 and neg.sure_of_ceiling(["The cat"]) == [False]


def test_a_keyword_at_the_end_may_still_grow(registry):
    """Ranking counts a keyword the text ends on (it usually stays a word); the floor that
    settles a search does not: "sun" may become "sunset". Punctuation ends a word for good."""
    kw = registry.build([{"name": "keywords", "keywords": ["sun", "C++"]}])
    texts = ["Code in C++ under the sun", "Code in C++ under the sun.", "Under the sun, C++"]
    ranked = kw.score_partial(texts, "", [10, 10, 10])
    assert [r.total for r in ranked] == [1.0, 1.0, 1.0]
    assert kw.sure_of_ceiling(texts) == [False, True, True]
    assert kw.reaches_ceiling(kw.score(["Under the sun, C++"])[0])
    assert not kw.reaches_ceiling(kw.score(["Under the sunset, C++"])[0])
    # a keyword's surrounding spaces are not part of it: "dog " may still grow into "dogs"
    spaced = registry.build([{"name": "keywords", "keywords": ["dog "]}])
    assert spaced.sure_of_ceiling(["the dog", "the dog."]) == [False, True]
