"""bench/prune_sim.py's replays, which chose speculative_rejection's defaults, on a pool built by
hand: pausing ties must recover the candidate a random tie-break drops, cost what the server's
rounds would, and never lose to the same rule without pausing."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def prune_sim():
    sys.path.insert(0, str(BENCH))
    try:
        import prune_sim as module
    finally:
        sys.path.remove(str(BENCH))
    return module


def entry(*sentences: str) -> dict:
    """One item whose samples are these sentences, a token per word (equal words, equal
    tokens, so equal prefixes are twin rows)."""
    vocab: dict[str, int] = {}
    samples = []
    for text in sentences:
        words = text.split()
        samples.append({"tokens": [vocab.setdefault(w, len(vocab)) for w in words],
                        "lps": [-1.0] * len(words),
                        "prefixes": [" ".join(words[:t]) for t in range(len(words) + 1)]})
    return {"item": "hand", "prompt_text": "Use red and blue.", "prompt_tokens": 5,
            "rewards": [{"name": "keywords", "keywords": ["red", "blue"]}], "samples": samples}


# After 2 words all four tie at 0 coverage: the first two go on, the last two are a random
# pick's losers. The survivors finish with red alone; only "a cat saw blue red" has both.
TIED = entry("the cat red sat", "the dog red ran", "a cat saw blue red", "a dog sat down")


def test_pausing_resumes_the_tie_a_random_pick_dropped(prune_sim):
    scorer = prune_sim.Scorer(TIED, max_tokens=8)
    members = [0, 1, 2, 3]
    dropping = prune_sim.parse_rule("segment=2,keep=0.5,tie=none,settle=1,dedup=1")
    pausing = prune_sim.parse_rule("segment=2,keep=0.5,pause=1,dedup=1")
    assert prune_sim.replay_one(TIED, scorer, dropping, members)[0] == 0.5
    reward, tokens = prune_sim.replay_one(TIED, scorer, pausing, members)
    assert reward == 1.0
    # twin rows: round 1 "the", "a" then 4 distinct pairs; round 2 the survivors' 2 words
    # each; then the paused two resume (2 words each) and the one left runs its last word
    assert tokens == 5 + (2 + 4) + 4 + 4 + 1


def test_pausing_never_loses_to_dropping_and_keep_one_is_best_of_n(prune_sim):
    pool = entry("the cat red sat", "the dog red ran", "a cat saw blue red", "a dog sat down",
                 "blue sky red sun", "the red blue cat", "a red hat", "the sky is blue today")
    scorer = prune_sim.Scorer(pool, max_tokens=8)
    best_of_n = prune_sim.parse_rule("segment=1000000,keep=1.0,dedup=1")
    for members in itertools.combinations(range(8), 4):
        members = list(members)
        for segment, keep in ((1, 0.5), (2, 0.5), (2, 0.75)):
            rule = f"segment={segment},keep={keep},dedup=1"
            dropped = prune_sim.replay_one(pool, scorer, prune_sim.parse_rule(
                rule + ",tie=none,settle=1"), members)
            paused = prune_sim.replay_one(pool, scorer, prune_sim.parse_rule(rule + ",pause=1"),
                                          members)
            assert paused[0] >= dropped[0] and paused[1] >= dropped[1], (members, rule)
        whole = prune_sim.replay_one(pool, scorer, best_of_n, members)
        never = prune_sim.replay_one(pool, scorer, prune_sim.parse_rule(
            "segment=2,keep=1.0,pause=1,dedup=1"), members)
        assert never[0] == whole[0]
