"""`alignserve train-value`: fit a VAS value head with TD(lambda) on the frozen base model.

1. Sample completions of a prompt set from the base model (plain temperature-1 sampling: the
   policy pi0 whose Q the head estimates), recording each step's hidden state and top-k
   candidates (data.py), and label every finished text with the reward.
2. Fit the head (model.py) by fitted TD(lambda), gamma 1, lambda 0.95: each epoch, targets are
   the lambda-returns of the episodes bootstrapped from the current head's V(s_{t+1}), with
   the reward at the end (td.py); the head regresses Q(s_t, a_t) on them (MSE, Adam).
3. Hold out whole prompts; report the held-out loss against the final rewards (the
   Monte-Carlo target) next to a constant predictor (the mean training reward), and keep the
   epoch with the lowest held-out loss.

This module imports only argparse at import time, so the CLI stays fast; `add_arguments`
and `run` are the CLI's hooks (`add_subcommand` registers both as `train-value`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_REWARD = '{"name": "sentiment", "target": "positive"}'


@dataclass
class FitConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.0  # decoupled, on W only
    vector_lr: float | None = None  # learning rate of b, u, c (default: lr)
    lam: float = 0.95
    gamma: float = 1.0
    rank: int = 0
    seed: int = 0
    chunk: int = 4096  # rows per no-grad evaluation chunk


def _q_action(head: Any, tokens: Any, hidden: Any, ids: Any) -> Any:
    """Q(s, a) [N] for one token per row."""
    return head(hidden, tokens[ids].float().unsqueeze(1)).squeeze(1)


def state_values(head: Any, tokens: Any, data: Any, chunk: int = 4096) -> Any:
    """V(s_t) for every step of `data` [N] under the current head (no grad)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, data.hidden.shape[0], chunk):
            h = data.hidden[i : i + chunk]
            ids = data.cand_ids[i : i + chunk]
            q = head(h, tokens[ids].float())
            out.append((q * data.cand_probs[i : i + chunk]).sum(-1))
    return torch.cat(out) if out else torch.zeros(0)


def action_values(head: Any, tokens: Any, data: Any, chunk: int = 4096) -> Any:
    import torch

    with torch.no_grad():
        return torch.cat([_q_action(head, tokens, data.hidden[i : i + chunk],
                                    data.actions[i : i + chunk])
                          for i in range(0, data.hidden.shape[0], chunk)]) \
            if data.hidden.shape[0] else torch.zeros(0)


def td_targets(head: Any, tokens: Any, data: Any, lam: float, gamma: float,
               chunk: int = 4096) -> Any:
    """The lambda-return target of every step [N], bootstrapped from the head's V."""
    import torch

    from alignserve.rewardmodels.value.td import lambda_returns

    v = state_values(head, tokens, data, chunk)
    next_v = torch.zeros_like(v)
    next_v[:-1] = v[1:]  # within an episode; the value past an episode's end is never read
    rewards = torch.zeros_like(v)
    ends = torch.cumsum(data.lengths, 0) - 1
    rewards[ends] = data.rewards
    r_pad, mask = data.padded(rewards)
    v_pad, _ = data.padded(next_v)
    return lambda_returns(r_pad, v_pad, mask, gamma=gamma, lam=lam)[mask]


def monte_carlo_targets(data: Any) -> Any:
    import torch

    return torch.repeat_interleave(data.rewards, data.lengths)


def fit(train: Any, tokens: Any, cfg: FitConfig, heldout: Any = None,
        show_progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Fit a ValueHead on `train` (Trajectories) with TD(lambda). Returns (head, stats)."""
    import torch
    from tqdm.auto import tqdm

    from alignserve.rewardmodels.value.model import ValueHead

    torch.manual_seed(cfg.seed)
    tokens = tokens.detach().float()
    mean_reward = float(train.rewards.mean())
    head = ValueHead(train.hidden.shape[1], cfg.rank, init_value=mean_reward)
    head.set_input_scales(float(train.hidden.pow(2).mean().sqrt()),
                          float(tokens.pow(2).mean().sqrt()))
    matrices = [p for n, p in head.named_parameters() if n in ("weight", "up", "down")]
    vectors = [p for n, p in head.named_parameters() if n not in ("weight", "up", "down")]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                             {"params": vectors, "weight_decay": 0.0,
                              "lr": cfg.vector_lr or cfg.lr}], lr=cfg.lr)
    n = train.hidden.shape[0]
    mc_train = monte_carlo_targets(train)
    mc_held = monte_carlo_targets(heldout) if heldout is not None and heldout.num_episodes else None

    def mse(pred: Any, target: Any) -> float:
        return float(((pred - target) ** 2).mean()) if target.numel() else float("nan")

    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, Any], int] | None = None
    bar = tqdm(total=cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size), desc="fitting",
               unit="batch", disable=not show_progress, file=sys.stderr)
    for epoch in range(cfg.epochs):
        targets = td_targets(head, tokens, train, cfg.lam, cfg.gamma, cfg.chunk)
        order = torch.randperm(n)
        total = 0.0
        head.train()
        for i in range(0, n, cfg.batch_size):
            rows = order[i : i + cfg.batch_size]
            pred = _q_action(head, tokens, train.hidden[rows], train.actions[rows])
            loss = ((pred - targets[rows]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
            bar.update(1)
        head.eval()
        row = {"epoch": epoch + 1, "td_loss": total / n,
               "train_loss": mse(action_values(head, tokens, train, cfg.chunk), mc_train)}
        if mc_held is not None:
            row["heldout_loss"] = mse(action_values(head, tokens, heldout, cfg.chunk), mc_held)
            row["heldout_td_loss"] = mse(
                action_values(head, tokens, heldout, cfg.chunk),
                td_targets(head, tokens, heldout, cfg.lam, cfg.gamma, cfg.chunk))
        history.append(row)
        bar.set_postfix({k: round(v, 5) for k, v in row.items() if k != "epoch"})
        key = row.get("heldout_loss", row["train_loss"])
        if best is None or key < best[0]:
            best = (key, {k: v.detach().clone() for k, v in head.state_dict().items()}, epoch + 1)
    bar.close()
    assert best is not None
    head.load_state_dict(best[1])
    stats: dict[str, Any] = {
        "epochs": cfg.epochs, "best_epoch": best[2], "lambda": cfg.lam, "gamma": cfg.gamma,
        "lr": cfg.lr, "batch_size": cfg.batch_size, "rank": cfg.rank,
        "train_steps": n,
        "completions": train.num_episodes + (heldout.num_episodes if heldout is not None else 0),
        "train_completions": train.num_episodes, "mean_reward": mean_reward,
        "constant_train_loss": mse(torch.full_like(mc_train, mean_reward), mc_train),
        "history": history,
    }
    chosen = history[best[2] - 1]
    stats["train_loss"] = chosen["train_loss"]
    if mc_held is not None:
        stats["heldout_completions"] = heldout.num_episodes
        stats["heldout_loss"] = chosen["heldout_loss"]
        stats["heldout_td_loss"] = chosen["heldout_td_loss"]
        stats["constant_loss"] = mse(torch.full_like(mc_held, mean_reward), mc_held)
        stats["beats_constant"] = stats["heldout_loss"] < stats["constant_loss"]
    return head, stats


async def train_value(engine: Any, reward_spec: Any, out: str | None = None, *,
                      prompts: list[str] | None = None, samples: int = 480, per_prompt: int = 2,
                      max_tokens: int = 32, candidates: int = 20, heldout: float = 0.15,
                      fit_config: FitConfig | None = None, seed: int = 0, concurrency: int = 16,
                      description: str = "", show_progress: bool = True,
                      log: Any = print) -> tuple[Any, dict[str, Any]]:
    """Collect on `engine` (a started NativeEngine; call this on its event loop), fit the
    head (on the compute thread, off the event loop), save it to `out` if given.
    Returns (ValueModel bound to the engine's token matrix, stats)."""
    from tqdm.auto import tqdm

    from alignserve.engine import compute_thread
    from alignserve.rewardmodels.compose import RewardRegistry
    from alignserve.rewardmodels.value.data import builtin_prompts, collect
    from alignserve.rewardmodels.value.model import ValueModel, ValueModelConfig, token_matrix

    specs = reward_spec if isinstance(reward_spec, list) else [reward_spec]
    reward = RewardRegistry.default().build(specs, param="--reward")
    prompts = prompts or builtin_prompts()
    fit_config = fit_config or FitConfig(seed=seed)
    tokens = token_matrix(engine)
    started = time.perf_counter()
    bar = tqdm(total=samples, desc="sampling", unit="completion", disable=not show_progress,
               file=sys.stderr)
    try:
        data = await collect(engine, prompts, reward, samples=samples, per_prompt=per_prompt,
                             max_tokens=max_tokens, candidates=candidates, seed=seed,
                             concurrency=concurrency, progress=bar)
    finally:
        bar.close()
    sampled = time.perf_counter() - started
    train, held = data.split_by_prompt(heldout, seed)
    log(f"sampled {data.num_episodes} completions ({int(data.lengths.sum())} steps, mean reward "
        f"{float(data.rewards.mean()):.4f}, std {float(data.rewards.std()):.4f}) "
        f"in {sampled:.0f} s; "
        f"{train.num_episodes} train / {held.num_episodes} held out")
    head, stats = await compute_thread.run(fit, train, tokens.cpu(), fit_config,
                                           held if held.num_episodes else None, show_progress)
    stats.update({
        "max_tokens": max_tokens, "candidates": candidates, "per_prompt": per_prompt,
        "prompts": len(set(data.prompts.tolist())), "seed": seed,
        "reward_std": float(data.rewards.std()) if data.num_episodes > 1 else 0.0,
        "sampling_seconds": round(sampled, 1),
        "seconds": round(time.perf_counter() - started, 1),
    })
    cfg = engine.cfg if hasattr(engine, "cfg") else None
    config = ValueModelConfig(
        base_model=engine.model_name,
        hidden_size=int(tokens.shape[1]) if cfg is None else cfg.hidden_size,
        vocab_size=int(tokens.shape[0]),
        rank=fit_config.rank,
        reward=specs,
        description=description
        or f"Q of the reward {json.dumps(specs)} under {engine.model_name}'s "
        "own sampling, fitted by TD(lambda)",
        training=stats,
    )
    model = ValueModel(head, config, name="", path=None).bind(tokens, engine.model_name)
    if out:
        model.path = model.save(out)
        model.name = model.path.name
    if "heldout_loss" in stats:
        log(f"held-out loss {stats['heldout_loss']:.5f} vs constant predictor "
            f"{stats['constant_loss']:.5f} (TD target loss {stats['heldout_td_loss']:.5f}); "
            f"best epoch {stats['best_epoch']} of {stats['epochs']}")
    log(f"done in {stats['seconds']:.0f} s" + (f"; saved to {out}" if out else ""))
    return model, stats


# ---------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", default=DEFAULT_REWARD,
                        help="the reward to learn, as JSON: one spec {\"name\": ..., ...} or a "
                        "weighted list of them, as in `alignment.rewards` (default: %(default)s)")
    parser.add_argument("--out", required=True, help="directory to write the value model to")
    parser.add_argument("--model", default=None,
                        help="base model (local directory or .gguf; default: the embedded SmolLM2)")
    parser.add_argument("--prompts", default=None,
                        help="prompt file: JSON list, {\"prompts\": [...]}, or one per line "
                        "(default: the built-in set, prompts.json: 305 prompts)")
    parser.add_argument("--samples", type=int, default=480, help="completions to sample")
    parser.add_argument("--per-prompt", type=int, default=2, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--candidates", type=int, default=20,
                        help="top-k of the base policy kept per step for V(s)")
    parser.add_argument("--epochs", type=int, default=FitConfig.epochs)
    parser.add_argument("--lr", type=float, default=FitConfig.lr, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=FitConfig.weight_decay,
                        help="decoupled weight decay on W")
    parser.add_argument("--batch-size", type=int, default=FitConfig.batch_size)
    parser.add_argument("--lambda", dest="lam", type=float, default=FitConfig.lam)
    parser.add_argument("--rank", type=int, default=0,
                        help="rank of W (0: full hidden x hidden)")
    parser.add_argument("--heldout", type=float, default=0.15,
                        help="fraction of prompts held out for the reported loss")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="prompts sampled at once (each forks --per-prompt sequences)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--description", default="")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import asyncio

    try:
        spec = json.loads(args.reward)
    except json.JSONDecodeError as e:
        print(f"alignserve train-value: --reward is not JSON: {e}", file=sys.stderr)
        return 2
    from alignserve.rewardmodels.compose import RewardRegistry
    from alignserve.rewardmodels.protocol import RewardSpecError

    try:
        RewardRegistry.default().build(spec if isinstance(spec, list) else [spec], param="--reward")
    except RewardSpecError as e:
        print(f"alignserve train-value: {e.param}: {e}", file=sys.stderr)
        return 2
    prompts = None
    if args.prompts:
        from alignserve.rewardmodels.value.data import read_prompts

        prompts = read_prompts(args.prompts)
    from alignserve.engine.native.engine import NativeEngine

    engine = NativeEngine.load(model=args.model, device=args.device)
    fit_config = FitConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           lam=args.lam, rank=args.rank, seed=args.seed,
                           weight_decay=args.weight_decay)

    async def main() -> dict[str, Any]:
        await engine.start()
        try:
            _, stats = await train_value(
                engine, spec, args.out, prompts=prompts, samples=args.samples,
                per_prompt=args.per_prompt, max_tokens=args.max_tokens,
                candidates=args.candidates, heldout=args.heldout, fit_config=fit_config,
                seed=args.seed, concurrency=args.concurrency, description=args.description,
                show_progress=not args.no_progress)
            return stats
        finally:
            await engine.close()

    stats = asyncio.run(main())
    if "beats_constant" in stats and not stats["beats_constant"]:
        print("warning: the head does not beat a constant predictor on held-out prompts",
              file=sys.stderr)
    return 0


def add_subcommand(sub: Any) -> None:
    """Register `train-value` on the CLI's subparsers."""
    p = sub.add_parser("train-value", help="train a value model for the vas strategy",
                       description="Sample completions from the frozen base model, label them "
                       "with a reward and fit a VAS value head by TD(lambda).")
    add_arguments(p)
    p.set_defaults(func=run)
