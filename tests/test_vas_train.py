"""Training value models: the fit on a synthetic task, the real path on the embedded model
(tiny numbers), and the command line."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
import torch

from alignserve.rewardmodels.value.data import Trajectories, builtin_prompts, read_prompts
from alignserve.rewardmodels.value.model import load_value_model
from alignserve.rewardmodels.value.train import FitConfig, add_arguments, fit, run, train_value


def synthetic(episodes: int = 400, steps: int = 3, vocab: int = 24, hidden: int = 32,
              seed: int = 0) -> tuple[Trajectories, torch.Tensor]:
    """Episodes whose reward is the fraction of 'good' tokens (ids < 8) taken; the state does
    not matter (hidden states are one vector plus a little noise), so Q(s, a) should rank the
    good tokens first."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(vocab, hidden, generator=g)
    n = episodes * steps
    cand = torch.stack([torch.randperm(vocab, generator=g)[:6] for _ in range(n)])
    pick = torch.randint(0, 6, (n,), generator=g)
    actions = cand[torch.arange(n), pick]
    good = (actions < 8).float().view(episodes, steps)
    return Trajectories(
        hidden=(torch.randn(1, hidden, generator=g) * 3.0
                + 0.1 * torch.randn(n, hidden, generator=g)),
        actions=actions,
        cand_ids=cand,
        cand_probs=torch.full((n, 6), 1 / 6),
        rewards=good.mean(1),
        lengths=torch.full((episodes,), steps, dtype=torch.long),
        prompts=torch.arange(episodes) % 20,
        texts=[""] * episodes,
        prompt_texts=[str(i) for i in range(20)],
    ), tokens


def test_fit_learns_which_tokens_pay_and_beats_a_constant():
    data, tokens = synthetic()
    train, held = data.split_by_prompt(0.25, seed=0)
    assert held.num_episodes and not set(train.prompts.tolist()) & set(held.prompts.tolist())
    head, stats = fit(train, tokens, FitConfig(epochs=15, lr=3e-3, batch_size=64, rank=4),
                      held, show_progress=False)
    hist = stats["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # the best possible here is 2/3 of the constant predictor's loss (the other steps are noise)
    assert stats["heldout_loss"] < 0.85 * stats["constant_loss"] and stats["beats_constant"]
    with torch.no_grad():
        q = head(train.hidden[:1], tokens.unsqueeze(0))[0]
    # every good token above every bad one
    assert q[:8].min() > q[8:].max()


def test_trajectory_views():
    data, _ = synthetic(episodes=3, steps=2)
    data.lengths = torch.tensor([1, 2, 3])
    data.rewards = torch.tensor([0.1, 0.2, 0.3])
    assert data.step_index().tolist() == [0, 0, 1, 0, 1, 2]
    padded, mask = data.padded(torch.arange(6.0))
    assert mask.sum() == 6
    assert padded.tolist() == [[0, 0, 0], [1, 2, 0], [3, 4, 5]]
    part = data.select(torch.tensor([2, 0]))
    assert part.lengths.tolist() == [3, 1]
    assert part.actions.tolist() == data.actions[[3, 4, 5, 0]].tolist()


def test_prompt_sets(tmp_path):
    prompts = builtin_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "p.json").write_text(json.dumps({"prompts": ["a", "b"]}))
    assert read_prompts(tmp_path / "p.json") == ["a", "b"]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError):
        read_prompts(tmp_path / "bad.json")


def test_cli_arguments_and_a_bad_reward(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x"])
    assert (args.samples, args.max_tokens, args.lam, args.device) == (480, 32, 0.95, "cpu")
    assert json.loads(args.reward) == {"name": "sentiment", "target": "positive"}
    # the reward is validated before any model is loaded
    assert run(parser.parse_args(["--out", "x", "--reward", '{"name": "nope"}'])) == 2
    assert "--reward[0].name" in capsys.readouterr().err
    assert run(parser.parse_args(["--out", "x", "--reward", "{not json"])) == 2


def test_train_value_on_the_embedded_model(live_server, tmp_path):
    """The real path with tiny numbers: sample on the engine, record hidden states, label with
    the sentiment reward, fit, save, load back and steer with it."""
    engine = live_server.engine
    prompts = ["Describe a rainy day.", "Tell me about your cat.", "Review a cheap hotel.",
               "Describe a busy airport."]

    async def go():
        return await train_value(
            engine, {"name": "sentiment"}, str(tmp_path / "tiny"), prompts=prompts, samples=8,
            per_prompt=2, max_tokens=8, heldout=0.25, show_progress=False, log=lambda *_: None,
            fit_config=FitConfig(epochs=8, lr=1e-3, batch_size=16))

    model, stats = asyncio.run_coroutine_threadsafe(go(), engine.loop).result(600)
    assert stats["completions"] == 8 and stats["heldout_completions"] == 2
    hist = stats["history"]
    assert len(hist) == 8 and all(h["heldout_loss"] >= 0 for h in hist)
    assert min(h["train_loss"] for h in hist) < hist[0]["train_loss"]
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert cfg["base_model"] == engine.model_name
    assert (cfg["hidden_size"], cfg["vocab_size"]) == (576, 49152)
    assert cfg["reward"] == [{"name": "sentiment"}]
    back = load_value_model(tmp_path / "tiny").bind(engine.model.lm_head.weight)
    h = torch.randn(2, 576)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert torch.allclose(back.q_values(h, ids), model.q_values(h, ids))
