"""The evaluation harness: exact metrics, the task files, the report writer, and one tiny run of
`alignserve eval` against the session's live server."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest

from alignserve.evaluation import metrics as m
from alignserve.evaluation import report
from alignserve.evaluation.runner import plan
from alignserve.evaluation.strategies import CONFIGS, parse_configs
from alignserve.evaluation.tasks import TASKS, load_task
from alignserve.rewardmodels.compose import RewardRegistry

# ---------------------------------------------------------------------------- metrics


def test_coverage_counts_whole_words_case_insensitively():
    concepts = ["dog", "ball", "throw", "park"]
    assert m.coverage("The DOG chased a ball.", concepts) == 0.5
    # no stemming, no substrings: dogs, threw, parking, hotdog are not the concepts
    assert m.coverage("Dogs threw balls in the parking lot of the hotdog stand", concepts) == 0.0
    assert m.coverage("dog-ball: throw (park)", concepts) == 1.0
    assert m.coverage("ice cream", ["ice  cream", "cream"]) == 1.0  # a phrase spans whitespace
    with pytest.raises(ValueError):
        m.coverage("x", [])


def test_word_count_and_length_error():
    assert m.word_count("Hello, world - 42 ... !") == 3  # punctuation alone is no word
    assert m.word_count("") == 0
    assert m.length_error("one two three", 5) == 2
    assert m.length_error("one two three four five six seven", 5) == 2
    assert m.length_error("one two three four five", 5) == 0


def test_repetition_and_distinct_on_hand_counted_ngrams():
    text = "a b c d a b c d"  # 4-grams: abcd bcda cdab dabc abcd -> 5, 4 unique
    assert m.repetition(text, 4) == pytest.approx(1 - 4 / 5)
    assert m.distinct("a b a b", 2) == pytest.approx(2 / 3)  # ab ba ab
    assert m.distinct("a b a b", 3) == 1.0  # aba bab
    assert m.repetition("one two three four five", 4) == 0.0
    # lower-cased words; punctuation is not a token
    assert m.repetition("The cat sat. The CAT sat!", 2) == pytest.approx(1 - 3 / 5)
    assert m.words("Don't stop, it's fine.") == ["don't", "stop", "it's", "fine"]
    # fewer words than n: no n-grams, no value, and means skip it
    assert m.repetition("too short", 4) is None and m.distinct("too short", 3) is None
    assert m.mean([None, 1.0, 0.0, None]) == 0.5 and m.mean([None]) is None


def test_sentiment_metric_is_vader_mapped_to_unit_interval():
    assert m.sentiment("") == 0.5
    assert m.sentiment("What a wonderful, lovely day!") > 0.8
    assert m.sentiment("This is terrible and awful.") < 0.2


# ---------------------------------------------------------------------------- tasks

SIZES = {"keywords": 50, "length": 20, "sentiment": 20, "continuation": 20}


@pytest.mark.parametrize("name", list(TASKS))
def test_task_files_load_with_their_sizes_and_buildable_rewards(name):
    task = load_task(name)
    assert len(task.items) >= SIZES[name]
    assert len({i.id for i in task.items}) == len(task.items)
    assert len({i.prompt for i in task.items}) == len(task.items)
    registry = RewardRegistry.default()
    for item in task.items:
        assert item.prompt.strip()
        if name == "continuation":
            assert item.rewards is None
            continue
        reward = registry.build(item.rewards)  # raises on a malformed spec
        assert len(reward) == 1
        assert reward.score(["some text"])[0].total is not None


def test_task_items_match_their_metric_and_reward():
    registry = RewardRegistry.default()
    for item in load_task("keywords").items:
        concepts = item.data["concepts"]
        assert 3 <= len(concepts) <= 5
        assert all(c in item.prompt for c in concepts)
        text = "Here: " + " and ".join(concepts) + "."
        assert m.coverage(text, concepts) == 1.0
        assert registry.build(item.rewards).score([text])[0].total == 1.0
        half = " ".join(concepts[:2])
        assert registry.build(item.rewards).score([half])[0].total == m.coverage(half, concepts)
    length = load_task("length")
    for item in length.items:
        n = item.data["words"]
        assert 5 <= n <= 40 and f"{n} words" in item.prompt
        assert item.rewards == [{"name": "length", "target_words": n}]
        assert length.max_tokens(item, 8) >= 1.5 * n  # every target is reachable
        assert length.score(item, " ".join(["w"] * n)) == {"length_error": 0.0, "words": float(n)}
    assert {t.name: t.endpoint for t in map(load_task, TASKS)} == {
        "keywords": "chat", "length": "chat", "sentiment": "chat", "continuation": "completions"}


def test_plan_runs_each_configuration_where_it_is_meaningful():
    tasks = [load_task(t) for t in TASKS]
    pairs = {(p.task.name, p.config.label) for p in plan(tasks, parse_configs("all"), limit=3)}
    assert ("sentiment", "vas") in pairs and ("keywords", "vas") not in pairs
    assert ("continuation", "contrastive") in pairs and ("continuation", "greedy") in pairs
    assert ("keywords", "deal") in pairs and ("continuation", "deal") not in pairs
    assert ("keywords", "best_of_8") in pairs and ("length", "best_of_8") not in pairs
    every = plan(tasks, parse_configs("vas,sample"), limit=3, all_pairs=True)
    assert len(every) == 8 and all(len(p.items) == 3 for p in every)
    assert [c.label for c in parse_configs("deal, sample,deal")] == ["deal", "sample"]
    with pytest.raises(ValueError, match="unknown strategy configuration 'nope'"):
        parse_configs("sample,nope")
    assert CONFIGS["greedy"].decoding == "greedy" and CONFIGS["best_of_16"].alignment == {
        "strategy": "best_of_n", "candidates": 16}


def test_draws_repeat_sampled_items_with_other_seeds_and_greedy_ones_once():
    tasks = [load_task("continuation")]
    sampled, greedy = plan(tasks, parse_configs("sample,greedy"), limit=2, draws=3)
    assert [(i.id, i.draw) for i in sampled.items] == [
        (tasks[0].items[0].id, 0), (tasks[0].items[1].id, 0), (tasks[0].items[0].id, 1),
        (tasks[0].items[1].id, 1), (tasks[0].items[0].id, 2), (tasks[0].items[1].id, 2)]
    seeds = [i.seed for i in sampled.items]
    assert len(set(seeds)) == 6 and seeds[0] == tasks[0].items[0].seed  # draw 0: as before
    assert len(greedy.items) == 2


# ---------------------------------------------------------------------------- report


def _rec(task, strategy, name, metric, reward, tokens, seconds, **kw):
    return {"task": task, "strategy": strategy, "strategy_name": name, "item": "x",
            "metrics": metric, "reward": reward, "model_tokens": tokens, "seconds": seconds,
            "client_seconds": (seconds or 0) + 0.1, "candidates_scored": kw.get("cand", 1),
            "completion_tokens": 10, "text": "t", **({"error": kw["error"]} if "error" in kw
                                                      else {})}


def _synthetic() -> dict:
    recs = [
        _rec("keywords", "sample", "sample", {"coverage": 0.5}, 0.5, 100, 1.0),
        _rec("keywords", "sample", "sample", {"coverage": 0.75}, 0.75, 120, 3.0),
        _rec("keywords", "best_of_16", "best_of_n", {"coverage": 0.9}, 0.9, 1000, 4.0, cand=16),
        _rec("keywords", "deal", "deal", {"coverage": 1.0}, 1.0, 300, 9.0, cand=50),
        _rec("keywords", "deal", "deal", {}, None, None, None, error="BadRequestError: x"),
        _rec("sentiment", "best_of_16", "best_of_n", {"sentiment": 0.8}, 0.8, 1000, 2.0),
        _rec("sentiment", "vas", "vas", {"sentiment": 0.85}, 0.85, 200, 1.0),
        _rec("sentiment", "vas_c2", "vas", {"sentiment": 0.7}, 0.7, 300, 1.0),
        _rec("sentiment", "sr_16", "speculative_rejection", {"sentiment": 0.78}, 0.78, 400, 1.0),
        _rec("sentiment", "pf_16", "particle_filter", {"sentiment": 0.8}, 0.8, 450, 1.0),
        _rec("continuation", "greedy", "sample", {"rep4": 0.3, "distinct2": 0.6}, None, 70, 1.0),
        _rec("continuation", "contrastive", "contrastive", {"rep4": 0.1, "distinct2": None},
             None, 70, 2.0),
    ]
    tasks = {t: load_task(t).describe() for t in ("keywords", "sentiment", "continuation")}
    rows = report.aggregate(recs, [{"task": "keywords", "strategy": "deal", "requests": 2,
                                    "wall_seconds": 5.0}],
                            {"deal": {"alignment": {"strategy": "deal", "top_k": 8}},
                             "sr_16": {"alignment": {"strategy": "speculative_rejection",
                                                     "candidates": 16}},
                             "pf_16": {"alignment": {"strategy": "particle_filter",
                                                     "candidates": 16}}})
    return {"meta": {"model": "m", "max_tokens": 8}, "tasks": tasks, "rows": rows,
            "goals": report.goals(rows), "requests": recs}


def test_aggregate_means_errors_and_baseline():
    rows = {(r["task"], r["strategy"]): r for r in _synthetic()["rows"]}
    s = rows[("keywords", "sample")]
    assert s["metrics"] == {"coverage": 0.625} and s["reward"] == 0.625
    assert s["model_tokens"] == 110 and s["seconds"] == 2.0 and s["requests"] == 2
    d = rows[("keywords", "deal")]
    assert (d["requests"], d["errors"], d["metrics"]["coverage"], d["model_tokens"]) == (2, 1, 1.0,
                                                                                      300)
    assert d["first_error"] == "BadRequestError: x" and d["wall_seconds"] == 5.0
    assert d["alignment"] == {"strategy": "deal", "top_k": 8}
    c = rows[("continuation", "contrastive")]
    assert c["vs_baseline"]["strategy"] == "greedy"
    assert c["vs_baseline"]["rep4"] == pytest.approx(-0.2) and c["vs_baseline"]["distinct2"] is None
    assert "vs_baseline" not in rows[("continuation", "greedy")]


def test_goals_compare_at_equal_model_tokens():
    assert report.interpolate_log([(10, 0.5), (100, 0.7)], math.sqrt(1000)) == (
        pytest.approx(0.6), True)
    assert report.interpolate_log([(10, 0.5), (100, 0.7)], 1000) == (0.7, False)
    goals = {g["goal"]: g for g in _synthetic()["goals"]}
    assert goals["deal reaches at least 0.95 keyword coverage"]["met"] is True
    eq = goals["deal beats best_of_n at equal model tokens on keyword coverage"]
    # best_of_n curve (110, 0.625) -> (1000, 0.9) in log tokens, read at 300 tokens
    ref = 0.625 + (math.log(300) - math.log(110)) / (math.log(1000) - math.log(110)) * 0.275
    assert eq["met"] is True and f"{ref:.3f}" in eq["measured"]
    vas = goals["vas reaches best_of_16's reward with under a quarter of its model tokens"]
    assert vas["met"] is True and "(0.20x)" in vas["measured"]
    # every vas configuration is held to the goal on its own
    vas_c2 = goals["vas_c2 reaches best_of_16's reward with under a quarter of its model tokens"]
    assert vas_c2["met"] is False and "(0.30x)" in vas_c2["measured"]
    rep = goals["contrastive cuts greedy's 4-gram repetition rate to <= 0.5x"]
    assert rep["met"] is True and "(0.33x)" in rep["measured"]
    # the pruning searches against best_of_16: reward gap <= 0.03 at <= 0.4x its tokens
    sr = goals["sr_16 on sentiment reaches best_of_16's reward within 0.03 at <= 0.4x its model "
               "tokens"]
    pf = goals["pf_16 on sentiment reaches best_of_16's reward within 0.03 at <= 0.4x its model "
               "tokens"]
    assert sr["met"] is True and "(gap +0.020)" in sr["measured"] and "(0.40x)" in sr["measured"]
    assert pf["met"] is False and "(0.45x)" in pf["measured"]  # the reward ties, tokens do not


def test_report_writer_produces_valid_json_markdown_and_svg(tmp_path):
    result = _synthetic()
    paths = report.write(result, tmp_path / "out", stem="eval")
    data = json.loads(paths["json"].read_text())
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    assert data["plot"] == "eval.svg"
    md = paths["md"].read_text()
    assert "| sample | `sample` | 0.625 | 0.625 | 110 | 2.00 | 1.0 | 10.0 | 2/2 |" in md
    assert "| deal | `deal` (top_k=8) | 1.000 |" in md and "1/2 |" in md
    assert "rep4 vs greedy" in md and "| -0.200 |" in md
    assert "deal: 1 failed, e.g. BadRequestError: x" in md
    assert md.count("| yes |") == 5 and "![reward against model tokens](eval.svg)" in md
    root = ET.fromstring(paths["svg"].read_text())  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    circles = root.findall(f".//{ns}circle")
    plotted = [r for r in result["rows"] if r["model_tokens"]]
    assert len(circles) == len(plotted) == 10
    labels = {t.text for t in root.iter(f"{ns}text")}
    assert {"keywords", "sentiment", "continuation", "best_of_16", "vas", "sr_16", "pf_16"} <= labels
    assert "mean rep4" in labels and "mean reward" in labels


def test_report_with_no_rows_is_still_valid():
    ET.fromstring(report.svg({"rows": []}))
    assert report.markdown({"rows": []}).startswith("# alignserve evaluation")


# ---------------------------------------------------------------------------- end to end


def test_eval_command_against_the_live_server(base_url, tmp_path):
    from alignserve.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--base-url", base_url, "--tasks", "keywords,sentiment",
               "--strategies", "sample,best_of_4,sr_16", "--limit", "2", "--max-tokens", "6",
               "--concurrency", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    rows = {(r["task"], r["strategy"]): r for r in data["rows"]}
    assert set(rows) == {(task, label) for task in ("keywords", "sentiment")
                         for label in ("sample", "best_of_4", "sr_16")}
    for (task, label), row in rows.items():
        assert (row["requests"], row["errors"]) == (2, 0)
        assert row["model_tokens"] > 0 and row["seconds"] > 0
        if label != "sr_16":
            assert row["candidates_scored"] == (4 if label == "best_of_4" else 1)
        assert row["reward"] is not None
    assert len(data["requests"]) == 12
    for r in data["requests"]:
        assert r["completion_tokens"] <= 6 and r["model_tokens"] >= r["completion_tokens"]
        primary = r["metrics"]["coverage" if r["task"] == "keywords" else "sentiment"]
        assert r["reward"] == pytest.approx(primary)  # the server's score is ours
        if r["strategy"] == "sr_16":  # the search's report is kept: ties pause on keywords
            assert r["search"]["pause_ties"] == (r["task"] == "keywords")
        else:
            assert r["search"] is None
    md = (out / "eval.md").read_text()
    assert "| best_of_4 | `best_of_n` (candidates=4) |" in md and "## sentiment" in md
    root = ET.fromstring((out / "eval.svg").read_text())
    assert len(root.findall(".//{http://www.w3.org/2000/svg}circle")) == 6


def test_eval_command_rejects_bad_flags(capsys, tmp_path):
    from alignserve.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--out", str(tmp_path)])  # neither --base-url nor --spawn
    assert main(["eval", "--base-url", "http://127.0.0.1:9", "--tasks", "nope",
                 "--out", str(tmp_path)]) == 2
    assert "unknown task(s) nope" in capsys.readouterr().err
    assert main(["eval", "--spawn", "--strategies", "sample,bogus", "--out", str(tmp_path)]) == 2
    assert "unknown strategy configuration 'bogus'" in capsys.readouterr().err
    assert main(["eval", "--base-url", "http://127.0.0.1:9", "--limit", "0",
                 "--out", str(tmp_path)]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
