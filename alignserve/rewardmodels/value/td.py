"""TD(lambda) targets: lambda-returns bootstrapped from the current value estimate."""

from __future__ import annotations

import torch


def lambda_returns(rewards: torch.Tensor, next_values: torch.Tensor, mask: torch.Tensor,
                   gamma: float = 1.0, lam: float = 0.95) -> torch.Tensor:
    """Lambda-returns G [E, T] for E episodes padded to T steps.

    rewards[e, t]: the reward after step t's action (VAS: 0, and the reward of the finished
    text after the last action); next_values[e, t]: the current estimate V(s_{t+1}) of the
    state after step t (ignored at an episode's last step, which is terminal); mask[e, t]:
    whether step t exists. Backwards from each episode's last step:

        G_last = r_last
        G_t    = r_t + gamma * ((1 - lam) * V(s_{t+1}) + lam * G_{t+1})

    (lam = 1: Monte-Carlo returns; lam = 0: one-step TD targets). Padding gets 0.
    """
    mask = mask.bool()
    e, t_max = mask.shape
    out = torch.zeros(e, t_max, dtype=torch.float32, device=rewards.device)
    g = torch.zeros(e, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(t_max)):
        valid = mask[:, t]
        has_next = mask[:, t + 1] if t + 1 < t_max else torch.zeros_like(valid)
        boot = (1.0 - lam) * next_values[:, t].float() + lam * g
        g = rewards[:, t].float() + gamma * torch.where(has_next, boot, torch.zeros_like(boot))
        g = torch.where(valid, g, torch.zeros_like(g))
        out[:, t] = g
    return out
