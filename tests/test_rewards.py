"""Rewards: each built-in's scores, their weighted composition, strict spec validation
with the client-visible param path, GET /v1/alignment's description, and the local
reward-model wrapper on a tiny random model."""

from __future__ import annotations

import math
import time

import pytest
import torch

from alignserve.rewardmodels import (
    ComposedReward,
    RewardRegistry,
    RewardScore,
    RewardSpecError,
)
from alignserve.rewardmodels.lexical import KeywordsReward, LengthReward, count_words
from alignserve.rewardmodels.pattern import MAX_PATTERN_CHARS
from alignserve.rewardmodels.structured import MAX_SCHEMA_BYTES
from tests.tolerance import reorder_tol

BUILTINS = {"keywords", "length", "regex", "json_schema", "sentiment", "profanity"}


@pytest.fixture(scope="module")
def registry() -> RewardRegistry:
    return RewardRegistry.default()


def one(registry: RewardRegistry, spec: dict, text: str, prompt: str = "") -> float:
    """Score one text with one reward; returns its unweighted component."""
    composed = registry.build([spec])
    (result,) = composed.score([text], prompt)
    (value,) = result.components.values()
    return value


# ---- keywords ---------------------------------------------------------------------------


def test_keywords_whole_words_case_insensitive(registry):
    spec = {"name": "keywords", "keywords": ["whale", "Blue", "ocean"]}
    # "BLUE" matches "Blue"; "whales" is not the word "whale"; "ocean." ends at a boundary.
    assert one(registry, spec, "The BLUE whales swim in the ocean.") == pytest.approx(2 / 3)
    assert one(registry, spec, "A blue whale, in an ocean") == 1.0
    assert one(registry, spec, "bluewhale oceanic") == 0.0
    assert one(registry, spec, "") == 0.0


def test_keywords_phrases_and_punctuation():
    reward = KeywordsReward(["blue whale", "C++"])
    assert reward.score(["a Blue\n  whale codes C++."], "") == [1.0]
    assert reward.score(["blue whales in C++x"], "") == [0.0]
    assert reward.score(["the blue  whale"], "") == [0.5]


# ---- length -----------------------------------------------------------------------------


def test_count_words_ignores_bare_punctuation():
    assert count_words("Hello , world -- 42 !") == 3
    assert count_words("  \n ") == 0
    assert count_words("don't stop-me now.") == 3


@pytest.mark.parametrize(
    "words, expected", [(10, 1.0), (5, 0.5), (15, 0.5), (8, 0.8), (20, 0.0), (35, 0.0), (0, 0.0)]
)
def test_length_target(registry, words, expected):
    text = " ".join(["word"] * words)
    assert one(registry, {"name": "length", "target_words": 10}, text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "words, expected", [(4, 1.0), (6, 1.0), (8, 1.0), (2, 0.5), (0, 0.0), (12, 0.5), (16, 0.0)]
)
def test_length_range(registry, words, expected):
    spec = {"name": "length", "min_words": 4, "max_words": 8}
    assert one(registry, spec, " ".join(["w"] * words)) == pytest.approx(expected)


def test_length_open_ranges():
    assert LengthReward(hi=5).score(["", "a b c d e f"], "") == [1.0, pytest.approx(0.8)]
    assert LengthReward(lo=4).score(["a b", " ".join("x" * 100)], "") == [0.5, 1.0]


# ---- regex ------------------------------------------------------------------------------


def test_regex_search_fullmatch_and_case(registry):
    search = {"name": "regex", "pattern": r"\d{3}-\d{4}"}
    assert one(registry, search, "call 555-1234 now") == 1.0
    assert one(registry, search, "call 555-12 now") == 0.0
    full = {"name": "regex", "pattern": r"\d{3}-\d{4}", "mode": "fullmatch"}
    assert one(registry, full, "call 555-1234 now") == 0.0
    assert one(registry, full, "555-1234") == 1.0
    assert one(registry, {"name": "regex", "pattern": "^yes"}, "YES") == 0.0
    assert one(registry, {"name": "regex", "pattern": "^yes", "ignore_case": True}, "YES") == 1.0


def test_regex_catastrophic_backtracking_times_out_and_scores_zero(registry):
    composed = registry.build([{"name": "regex", "pattern": r"(a|aa)+$"}])
    reward = composed.items[0].reward
    text = "a" * 60 + "!"
    start = time.perf_counter()
    (result,) = composed.score([text])
    elapsed = time.perf_counter() - start
    assert result.components == {"regex": 0.0}
    assert reward.timeouts == 1  # it really ran out of time rather than failing to match
    assert elapsed < 1.0
    # The same reward still matches ordinary text afterwards.
    assert composed.score(["aaaa"])[0].components == {"regex": 1.0}


# ---- json_schema ------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "tag": {"type": "string", "pattern": "^[a-z]+$"}},
    "required": ["n"],
}


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"n": 3}', 1.0),
        ('  {"n": 3, "tag": "ok"}\n', 1.0),
        ('Here it is:\n```json\n{"n": 3}\n```\nDone.', 1.0),
        ('The answer is {"n": 7} as requested.', 1.0),
        ('Noise {not json} then {"n": 1}', 1.0),
        ('{"n": "three"}', 0.5),
        ('{"n": 3, "tag": "NOT lower"}', 0.5),
        ("[1, 2]", 0.5),
        ("42", 0.5),
        ("```json\n[]\n```", 0.5),
        ("no json here", 0.0),
        ('{"n": 3', 0.0),
        ("", 0.0),
    ],
)
def test_json_schema_three_outcomes(registry, text, expected):
    assert one(registry, {"name": "json_schema", "schema": SCHEMA}, text) == expected


def test_json_schema_pattern_is_time_bounded(registry):
    spec = {"name": "json_schema", "schema": {"type": "string", "pattern": "^(a|aa)+$"}}
    start = time.perf_counter()
    assert one(registry, spec, '"' + "a" * 60 + '!"') == 0.5
    assert time.perf_counter() - start < 1.0
    assert one(registry, spec, '"aaaa"') == 1.0


def test_json_schema_local_refs_work(registry):
    schema = {
        "$defs": {"pos": {"type": "integer", "minimum": 1}},
        "type": "array",
        "items": {"$ref": "#/$defs/pos"},
    }
    spec = {"name": "json_schema", "schema": schema}
    assert one(registry, spec, "[1, 2, 3]") == 1.0
    assert one(registry, spec, "[1, 0]") == 0.5


# ---- classifiers ------------------------------------------------------------------------

POSITIVE = "I love this, it is wonderful, beautiful and amazing!"
NEGATIVE = "This is terrible and awful. I hate it, the worst thing ever."
NEUTRAL = "The table is made of wood."


def test_sentiment_orders_and_flips(registry):
    pos = registry.build([{"name": "sentiment"}])
    neg = registry.build([{"name": "sentiment", "target": "negative"}])
    p = [s.components["sentiment"] for s in pos.score([POSITIVE, NEGATIVE, NEUTRAL])]
    n = [s.components["sentiment"] for s in neg.score([POSITIVE, NEGATIVE, NEUTRAL])]
    assert p[0] > 0.75 and p[1] < 0.25
    assert n[1] > 0.75 and n[0] < 0.25
    assert p[2] == pytest.approx(0.5) == n[2]  # no sentiment words: compound 0
    for a, b in zip(p, n):
        assert 0.0 <= a <= 1.0 and a + b == pytest.approx(1.0)


def test_profanity_counts_whole_words(registry):
    spec = {"name": "profanity"}
    assert one(registry, spec, "What a lovely day in Scunthorpe; class assessment.") == 1.0
    assert one(registry, spec, "this is SHIT") == 0.5
    assert one(registry, spec, "fucking shitty weather") == 0.25
    assert one(registry, spec, "Damned crappy bastards!") == 0.125


# ---- composition ------------------------------------------------------------------------


class CountingReward:
    """Scores the text length; records how it was called."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[list[str], str]] = []

    def score(self, texts: list[str], prompt: str) -> list[float]:
        self.calls.append((list(texts), prompt))
        return [float(len(t)) for t in texts]


def test_composition_weighted_sum_and_labels(registry):
    composed = registry.build(
        [
            {"name": "keywords", "weight": 2, "keywords": ["blue"]},
            {"name": "length", "weight": 0.5, "target_words": 4},
            {"name": "keywords", "weight": -1.5, "keywords": ["red", "car"]},
            {"name": "keywords", "keywords": ["green"]},
        ]
    )
    assert len(composed) == 4 and composed
    assert composed.labels == ["keywords", "length", "keywords#2", "keywords#3"]
    texts = ["a blue red car", "blue sky", "nothing at all here today"]
    results = composed.score(texts, "prompt")
    assert results[0].components == {
        "keywords": 1.0,
        "length": 1.0,
        "keywords#2": 1.0,
        "keywords#3": 0.0,
    }
    assert results[0].total == pytest.approx(2 + 0.5 - 1.5)
    assert results[1].components["keywords#2"] == 0.0
    assert results[1].total == pytest.approx(2 * 1 + 0.5 * 0.5)
    assert results[2].total == pytest.approx(0.5 * 0.75)
    weights = [item.weight for item in composed.items]
    for r in results:
        assert r.total == pytest.approx(sum(w * c for w, c in zip(weights, r.components.values())))


def test_composition_batches_and_times_per_name():
    counter = CountingReward("counter")
    registry = RewardRegistry.default()
    registry.add_reward("counter", counter)
    composed = registry.build(
        [
            {"name": "counter", "weight": 0.25},
            {"name": "counter", "weight": 1},
            {"name": "length", "target_words": 1},
        ]
    )
    results = composed.score(["ab", "abcd", "x"], "the prompt")
    # One batched call per reward, each with every candidate and the prompt.
    assert counter.calls == [(["ab", "abcd", "x"], "the prompt")] * 2
    assert [r.components["counter"] for r in results] == [2.0, 4.0, 1.0]
    assert [r.components["counter#2"] for r in results] == [2.0, 4.0, 1.0]
    assert [r.total for r in results] == pytest.approx([3.5, 6.0, 2.25])
    # Timings are keyed by reward name (repeats add up), per call and accumulated.
    assert set(composed.last_seconds) == {"counter", "length"}
    first = dict(composed.seconds)
    composed.score(["y"])
    assert all(composed.seconds[k] >= first[k] + composed.last_seconds[k] - 1e-12 for k in first)
    assert composed.total_seconds == pytest.approx(sum(composed.seconds.values()))


@pytest.mark.parametrize("specs", [[], None])
def test_no_rewards(registry, specs):
    composed = registry.build(specs)
    assert isinstance(composed, ComposedReward)
    assert len(composed) == 0 and not composed
    assert composed.score(["a", "b"]) == [RewardScore(None, {}), RewardScore(None, {})]
    assert composed.last_seconds == {}


def test_registered_name_must_match():
    registry = RewardRegistry.default()
    with pytest.raises(ValueError):
        registry.add_reward("other", CountingReward("counter"))
    with pytest.raises(ValueError):
        registry.add_reward("keywords", CountingReward("keywords"))


# ---- validation -------------------------------------------------------------------------

P = "alignment.rewards"
KW = {"name": "keywords", "keywords": ["a"]}

BAD_SPECS = [
    ("keywords", P),
    (["keywords"], f"{P}[0]"),
    ([{"weight": 1.0}], f"{P}[0].name"),
    ([{"name": "nope"}], f"{P}[0].name"),
    ([{"name": 3}], f"{P}[0].name"),
    ([KW, {"name": "keywords", "keywords": []}], f"{P}[1].keywords"),
    ([{"name": "keywords"}], f"{P}[0].keywords"),
    ([{"name": "keywords", "keywords": "blue"}], f"{P}[0].keywords"),
    ([{"name": "keywords", "keywords": ["a", 3]}], f"{P}[0].keywords[1]"),
    ([{"name": "keywords", "keywords": ["a", "  "]}], f"{P}[0].keywords[1]"),
    ([{"name": "keywords", "keywords": [f"k{i}" for i in range(65)]}], f"{P}[0].keywords"),
    ([{**KW, "colour": "red"}], f"{P}[0].colour"),
    ([KW, KW, {**KW, "weight": math.nan}], f"{P}[2].weight"),
    ([{**KW, "weight": math.inf}], f"{P}[0].weight"),
    ([{**KW, "weight": 10**400}], f"{P}[0].weight"),
    ([{**KW, "weight": "1"}], f"{P}[0].weight"),
    ([{**KW, "weight": True}], f"{P}[0].weight"),
    ([{"name": "length"}], f"{P}[0].target_words"),
    ([{"name": "length", "target_words": 5, "max_words": 9}], f"{P}[0].target_words"),
    ([{"name": "length", "min_words": 9, "max_words": 5}], f"{P}[0].min_words"),
    ([{"name": "length", "target_words": 0}], f"{P}[0].target_words"),
    ([{"name": "length", "target_words": "10"}], f"{P}[0].target_words"),
    ([{"name": "length", "target_words": 10.5}], f"{P}[0].target_words"),
    ([{"name": "length", "max_words": -1}], f"{P}[0].max_words"),
    ([{"name": "regex", "pattern": "(unclosed"}], f"{P}[0].pattern"),
    ([{"name": "regex", "pattern": "a" * (MAX_PATTERN_CHARS + 1)}], f"{P}[0].pattern"),
    ([{"name": "regex", "pattern": ""}], f"{P}[0].pattern"),
    ([{"name": "regex"}], f"{P}[0].pattern"),
    ([{"name": "regex", "pattern": "a", "mode": "match"}], f"{P}[0].mode"),
    ([{"name": "json_schema", "schema": {"type": "strin"}}], f"{P}[0].schema"),
    ([{"name": "json_schema", "schema": {"minimum": "zero"}}], f"{P}[0].schema"),
    ([{"name": "json_schema", "schema": [{"type": "object"}]}], f"{P}[0].schema"),
    ([{"name": "json_schema", "schema": {"type": "string", "pattern": "(x"}}], f"{P}[0].schema"),
    ([{"name": "json_schema", "schema": {"patternProperties": {"^a": {}}}}], f"{P}[0].schema"),
    ([{"name": "json_schema", "schema": {"$ref": "https://example.com/s.json"}}], f"{P}[0].schema"),
    (
        [
            {
                "name": "json_schema",
                "schema": {"enum": ["x" * 1000 for _ in range(MAX_SCHEMA_BYTES // 1000 + 1)]},
            }
        ],
        f"{P}[0].schema",
    ),
    ([{"name": "json_schema"}], f"{P}[0].schema"),
    ([{"name": "sentiment", "target": "happy"}], f"{P}[0].target"),
    ([{"name": "profanity", "level": 2}], f"{P}[0].level"),
    ([KW] * 17, P),
]


@pytest.mark.parametrize("specs, param", BAD_SPECS)
def test_bad_specs_name_the_field(registry, specs, param):
    with pytest.raises(RewardSpecError) as info:
        registry.build(specs)
    assert info.value.param == param
    assert isinstance(info.value, ValueError) and str(info.value)


def test_schema_just_under_the_size_limit_is_accepted(registry):
    schema = {"enum": ["x" * 1000 for _ in range(MAX_SCHEMA_BYTES // 1000 - 1)]}
    assert one(registry, {"name": "json_schema", "schema": schema}, '"' + "x" * 1000 + '"') == 1.0


def test_max_rewards_is_configurable(registry):
    registry.build([KW] * 3, max_rewards=3)
    with pytest.raises(RewardSpecError) as info:
        registry.build([KW] * 3, max_rewards=2)
    assert info.value.param == P


def test_schema_names_that_look_like_keywords_are_fine(registry):
    # Property *names* are not keywords; enum values are data.
    schema = {
        "type": "object",
        "properties": {"patternProperties": {"type": "string"}, "$ref": {"enum": ["http://x"]}},
    }
    assert (
        one(
            registry,
            {"name": "json_schema", "schema": schema},
            '{"patternProperties": "p", "$ref": "http://x"}',
        )
        == 1.0
    )


# ---- describe ---------------------------------------------------------------------------


def test_describe_documents_every_builtin(registry):
    described = {d["name"]: d for d in registry.describe()}
    assert set(described) == BUILTINS == set(registry.names)
    for d in described.values():
        assert d["description"]
        lo, hi = d["output_range"]
        assert (lo, hi) == (0.0, 1.0)
        args = d["arguments"]
        assert args[0]["name"] == "weight" and args[0]["default"] == 1.0
        for a in args:
            assert set(a) >= {"name", "type", "required", "default", "description"}
            assert a["description"]
    required = {
        name: {a["name"] for a in d["arguments"] if a["required"]} for name, d in described.items()
    }
    assert required == {
        "keywords": {"keywords"},
        "length": set(),
        "regex": {"pattern"},
        "json_schema": {"schema"},
        "sentiment": set(),
        "profanity": set(),
    }
    types = {a["name"]: a["type"] for d in described.values() for a in d["arguments"]}
    assert types["keywords"] == "array" and types["target_words"] == "integer"
    assert types["schema"] == "object" and types["pattern"] == "string"
    mode = next(a for a in described["regex"]["arguments"] if a["name"] == "mode")
    assert mode["enum"] == ["search", "fullmatch"] and mode["default"] == "search"
    # Every documented argument is accepted by build(): the description cannot drift.
    for name in ("keywords", "regex"):
        for a in described[name]["arguments"]:
            assert a["name"] in {"weight", "keywords", "pattern", "mode", "ignore_case"}


def test_describe_lists_reward_models():
    registry = RewardRegistry.default()
    registry.add_reward("counter", CountingReward("counter"))
    (d,) = [d for d in registry.describe() if d["name"] == "counter"]
    assert d["kind"] == "reward_model" and d["output_range"] == [None, None]
    assert [a["name"] for a in d["arguments"]] == ["weight"]
    with pytest.raises(RewardSpecError) as info:
        registry.build([{"name": "counter", "keywords": ["a"]}])
    assert info.value.param == f"{P}[0].keywords"


# ---- HF reward model --------------------------------------------------------------------

# fmt: off
WORDS = ["the", "a", "blue", "whale", "swims", "in", "ocean", "is", "good", "bad", "very",
         "answer", "question", "what", "why"]
# fmt: on


def _tiny_reward_model(path, arch: str) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    if arch == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_max_length=64,
        )
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=1,
        )
        model = BertForSequenceClassification(config)
    else:
        # Decoder-only without a pad token: the wrapper must pad with EOS and drop
        # token_type_ids, as real Llama-based reward models need.
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]"
        )
        config = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            num_labels=1,
            pad_token_id=None,
        )
        model = LlamaForSequenceClassification(config)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hf_reward_model_batched_equals_single(tmp_path, arch):
    from alignserve.rewardmodels.hf_reward_model import MAX_BATCH

    _tiny_reward_model(tmp_path, arch)
    registry = RewardRegistry.default()
    registry.add_model("rm", tmp_path, device="cpu")
    composed = registry.build([{"name": "rm", "weight": 2.0}])
    reward = composed.items[0].reward
    texts = [
        "the blue whale",
        "a whale swims in the ocean very good",
        "bad",
        "why is the ocean blue what a question",
    ]
    texts = (texts * ((MAX_BATCH // len(texts)) + 2))[: MAX_BATCH + 3]  # crosses a chunk
    prompt = "what is a whale"
    batched = composed.score(texts, prompt)
    single = [reward.score([t], prompt)[0] for t in texts]
    # Padding to the batch's length reorders sums: both tiny models reduce at most 64 terms
    # (width 16-32, 64 positions) through one layer: embeddings, attention, MLP, head.
    tol = reorder_tol(torch.float32, 64, depth=4)["atol"]
    assert [r.components["rm"] for r in batched] == pytest.approx(single, abs=tol)
    assert [r.total for r in batched] == pytest.approx([2 * s for s in single], abs=2 * tol)
    assert all(math.isfinite(s) for s in single)
    # The prompt is part of the input, and different texts get different rewards.
    assert reward.score([texts[0]], "why bad")[0] != pytest.approx(single[0], abs=1e-7)
    assert len({round(s, 6) for s in single[:4]}) > 1
    # Without a prompt the text alone is scored.
    assert reward.score(texts[:3], "") == pytest.approx(
        [reward.score([t], "")[0] for t in texts[:3]], abs=tol
    )


def test_add_model_rejects_missing_path_and_clashes(tmp_path):
    registry = RewardRegistry.default()
    with pytest.raises(FileNotFoundError):
        registry.add_model("rm", tmp_path / "absent")
    with pytest.raises(ValueError):
        registry.add_model("keywords", tmp_path)
    with pytest.raises(ValueError):
        registry.add_model("bad name!", tmp_path)
