"""Training data for a value head: completions sampled from the frozen base model, each
step's hidden state and base-policy candidates recorded on the way, labelled by a reward.

Sampling runs on the native engine through the engine protocol (prefill once per prompt, fork
the samples, generate). A pass-through logits processor records, for every sampled token, the
normalized hidden state that produced its logits (StepInputs.hidden: exactly what VAS reads at
serving time) and the base model's top-k tokens with their renormalized probabilities (for the
bootstrap V(s) = sum_k pi0_k(a|s) Q(s, a)). So no second forward pass is needed.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from alignserve.engine import compute_thread
from alignserve.engine.protocol import SamplingParams, SeqHandle, StepInputs


def builtin_prompts() -> list[str]:
    """The default prompt set (prompts.json in this package): short, varied requests whose
    answers can go either way on the rewards we train for."""
    text = resources.files("alignserve.rewardmodels.value").joinpath("prompts.json").read_text()
    return list(json.loads(text)["prompts"])


def read_prompts(path: str | Path) -> list[str]:
    """A prompt file: a JSON list of strings, {"prompts": [...]}, or one prompt per line."""
    raw = Path(path).read_text()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        data = [line.strip() for line in raw.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data.get("prompts", [])
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data) or not data:
        raise ValueError(f"{path}: expected a non-empty list of prompt strings")
    return data


@dataclass
class Trajectories:
    """Episodes stored flat, each episode's steps contiguous and in order.

    Per step (N rows): hidden [N, H] (the state's normalized hidden), actions [N] (the
    sampled token), cand_ids / cand_probs [N, K] (the base model's top-k and its probabilities
    renormalized over them). Per episode (E rows): rewards [E], lengths [E], prompts [E]
    (index into prompt_texts), texts.
    """

    hidden: torch.Tensor
    actions: torch.Tensor
    cand_ids: torch.Tensor
    cand_probs: torch.Tensor
    rewards: torch.Tensor
    lengths: torch.Tensor
    prompts: torch.Tensor
    texts: list[str] = field(default_factory=list)
    prompt_texts: list[str] = field(default_factory=list)

    @property
    def num_episodes(self) -> int:
        return int(self.lengths.numel())

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cumsum(self.lengths, 0) - self.lengths

    def episode_of_step(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.num_episodes), self.lengths)

    def step_index(self) -> torch.Tensor:
        """t of every step within its episode [N]."""
        starts = torch.repeat_interleave(self.offsets, self.lengths)
        return torch.arange(int(self.lengths.sum())) - starts

    def select(self, episodes: torch.Tensor) -> Trajectories:
        episodes = episodes.long()
        offs, lens = self.offsets[episodes], self.lengths[episodes]
        rows = torch.cat([torch.arange(int(o), int(o + n)) for o, n in zip(offs, lens)]) \
            if len(episodes) else torch.zeros(0, dtype=torch.long)
        return Trajectories(self.hidden[rows], self.actions[rows], self.cand_ids[rows],
                            self.cand_probs[rows], self.rewards[episodes], lens.clone(),
                            self.prompts[episodes], [self.texts[i] for i in episodes.tolist()],
                            self.prompt_texts)

    def split_by_prompt(self, heldout: float, seed: int = 0) -> tuple[Trajectories, Trajectories]:
        """(train, held-out): whole prompts go to one side, so held-out prompts are unseen."""
        ids = sorted(set(self.prompts.tolist()))
        random.Random(seed).shuffle(ids)
        n_held = max(1, round(len(ids) * heldout)) if heldout > 0 and len(ids) > 1 else 0
        held = set(ids[:n_held])
        is_held = torch.tensor([p in held for p in self.prompts.tolist()], dtype=torch.bool)
        idx = torch.arange(self.num_episodes)
        return self.select(idx[~is_held]), self.select(idx[is_held])

    def padded(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-step tensor [N] as [E, T_max] with its mask."""
        e, t_max = self.num_episodes, int(self.lengths.max()) if self.num_episodes else 0
        out = torch.zeros(e, t_max, dtype=values.dtype)
        mask = torch.arange(t_max).unsqueeze(0) < self.lengths.unsqueeze(1)
        out[mask] = values
        return out, mask


class _Recorder:
    """A pass-through logits processor that keeps what each step looked like."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.steps: dict[Any, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, seqs: list[SeqHandle], logits: torch.Tensor,
                 inputs: StepInputs) -> torch.Tensor:
        if inputs.hidden is None:
            raise RuntimeError("the engine gives logits processors no hidden states")
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        hidden = inputs.hidden.float().cpu()
        top_i, top_p = top_i.cpu(), top_p.cpu()
        for row, seq in enumerate(seqs):
            self.steps.setdefault(seq.key, []).append(
                (seq.num_output, hidden[row].clone(), top_i[row].clone(), top_p[row].clone()))
        return logits


async def collect(engine: Any, prompts: list[str], reward: Any, *, samples: int,
                  per_prompt: int = 2, max_tokens: int = 32, candidates: int = 20,
                  seed: int = 0, concurrency: int = 16, chat: bool = True,
                  progress: Any = None) -> Trajectories:
    """Sample `samples` completions (`per_prompt` per prompt, cycling through the shuffled
    prompts) with plain temperature-1 sampling, record every step and label each finished
    text with `reward` (a ComposedReward: its total). Runs on `engine`'s event loop."""
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    jobs: list[tuple[int, int]] = []  # (prompt index, samples)
    left, i = samples, 0
    while left > 0:
        n = min(per_prompt, left)
        jobs.append((order[i % len(order)], n))
        left -= n
        i += 1
    gate = asyncio.Semaphore(concurrency)
    results: list[Any] = [None] * len(jobs)

    async def one(j: int, p: int, n: int) -> None:
        async with gate:
            text = prompts[p]
            if chat and hasattr(engine, "encode_chat"):
                prompt_text, ids = engine.encode_chat([{"role": "user", "content": text}])
            else:
                prompt_text, ids = text, engine.encode(text)
            rec = _Recorder(min(candidates, engine.vocab_size))
            root = await engine.prefill(ids)
            try:
                seqs = await engine.fork(root, n)
            finally:
                await engine.release([root])
            try:
                params = SamplingParams(temperature=1.0, max_tokens=max_tokens,
                                        seed=seed * 100003 + j)
                async for events in engine.generate(seqs, params, observer=rec):
                    if progress is not None:
                        progress.update(sum(1 for ev in events if ev.finished))
            finally:
                await engine.release(seqs)
            scores = await compute_thread.run(reward.score, [s.text for s in seqs], prompt_text)
            results[j] = (p, seqs, rec, scores)

    await asyncio.gather(*(one(j, p, n) for j, (p, n) in enumerate(jobs)))
    return _assemble(results, prompts)


def _assemble(results: list[Any], prompts: list[str]) -> Trajectories:
    hidden, actions, cids, cprobs = [], [], [], []
    rewards, lengths, pidx, texts = [], [], [], []
    for p, seqs, rec, scores in results:
        for seq, score in zip(seqs, scores):
            steps = sorted(rec.steps.get(seq.key, []), key=lambda s: s[0])
            out = seq.output_ids
            if not out or len(steps) != len(out) or score is None or score.total is None:
                continue  # e.g. a sequence cut short by the KV budget
            hidden.append(torch.stack([s[1] for s in steps]))
            cids.append(torch.stack([s[2] for s in steps]))
            cprobs.append(torch.stack([s[3] for s in steps]))
            actions.append(torch.tensor(out, dtype=torch.long))
            rewards.append(float(score.total))
            lengths.append(len(out))
            pidx.append(p)
            texts.append(seq.text)
    if not lengths:
        raise RuntimeError("no completions were collected")
    return Trajectories(torch.cat(hidden), torch.cat(actions), torch.cat(cids).long(),
                        torch.cat(cprobs).float(), torch.tensor(rewards, dtype=torch.float32),
                        torch.tensor(lengths, dtype=torch.long),
                        torch.tensor(pidx, dtype=torch.long),
                        texts, list(prompts))
