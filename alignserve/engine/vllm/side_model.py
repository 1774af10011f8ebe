"""What the vLLM logits processor computes beside vLLM's own model, in the engine-core process.

vLLM hands a logits processor the logits and the token ids of each request, nothing else: no
hidden states, no KV cache. The token-level strategies need more, so they get it here:

- `SideRunner`: a second model (a contrastive amateur: the expert truncated to L layers, the
  expert itself on a lame prompt, or another served model) run with the native engine's model
  code and a KV cache of its own. Each steered request holds one sequence there, fed the
  request's tokens in lockstep; requests with the same prompt (the n children of one vLLM
  request, a beam's rollouts) share the prompt's KV through the native cache's segments, so a
  prompt is computed once however many rows use it.
- `HiddenFromLogits`: the value heads of VAS read the served model's final normalized hidden
  state h, which vLLM does not expose. For Llama-family models logits = E h exactly (E the
  output token matrix [V, H], no bias, V >> H), so h is the least-squares solution of E h =
  logits: one [B, V] x [V, H] product and an [H, H] Cholesky solve per step, no second copy of
  the model. Entries another processor masked to -inf (min_tokens) are filled in iteratively
  with E h (the fixed point is the least-squares fit to the finite entries).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from alignserve.engine.native.attention import DecodePlan, ExtendPlan
from alignserve.engine.native.kv_cache import KVCache, Segment
from alignserve.engine.native.model import CausalLM

log = logging.getLogger(__name__)


def truncated(model: CausalLM, layers: int) -> CausalLM:
    """The first `layers` layers of `model` under its final norm and head (`self:L`). Shares
    every weight with `model`: no memory beyond its own KV cache."""
    cfg = model.cfg
    if not 1 <= layers <= cfg.num_layers:
        raise ValueError(f"layers must be in [1, {cfg.num_layers}], got {layers}")
    t = CausalLM.__new__(CausalLM)
    nn.Module.__init__(t)
    t.cfg = dataclasses.replace(cfg, num_layers=layers)
    t.embed = model.embed
    t.layers = nn.ModuleList(list(model.layers)[:layers])
    t.norm = model.norm
    t.lm_head = model.lm_head
    t.inv_freq = model.inv_freq
    return t


@dataclass(eq=False)
class _Root:
    id: int
    prompt: tuple[int, ...]
    chain: list[Segment]
    logits: torch.Tensor | None = None  # after the prompt, once computed
    users: int = 0


@dataclass(eq=False)
class _Seq:
    id: int
    root: _Root
    chain: list[Segment] | None = None  # forked from the root once the root is computed
    fed: int = 0  # tokens fed after the prompt
    logits: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.root.prompt) + self.fed


class SideRunner:
    """A model run beside vLLM's: sequences opened on a prompt, fed tokens, asked for logits."""

    def __init__(self, model: CausalLM, kv_slots: int, device: torch.device | str | None = None):
        cfg = model.cfg
        param = next(model.parameters())
        self.model = model
        self.device = torch.device(device) if device is not None else param.device
        self.kv = KVCache(cfg.num_layers, kv_slots, cfg.num_kv_heads, cfg.head_dim, param.dtype,
                          self.device)
        self.scale = cfg.head_dim ** -0.5
        self.vocab_size = cfg.vocab_size
        self._ids = itertools.count(1)
        self._chains: dict[int, list[Segment]] = {}
        self._roots: dict[tuple[int, ...], _Root] = {}
        self._seqs: dict[int, _Seq] = {}

    @staticmethod
    def slots_for(model: CausalLM, gib: float) -> int:
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        return max(64, int(gib * 2**30) // KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads,
                                                                      cfg.head_dim, dtype))

    # bookkeeping --------------------------------------------------------------------------
    @property
    def open_sequences(self) -> int:
        return len(self._seqs)

    @property
    def open_prompts(self) -> int:
        return len(self._roots)

    def open(self, prompt_ids: Sequence[int]) -> int:
        """A new sequence on `prompt_ids`; an identical open prompt is shared, not recomputed."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        key = tuple(int(t) for t in prompt_ids)
        root = self._roots.get(key)
        if root is None:
            rid = next(self._ids)
            root = _Root(rid, key, self.kv.new_chain(rid))
            self._roots[key] = root
            self._chains[rid] = root.chain
        root.users += 1
        sid = next(self._ids)
        self._seqs[sid] = _Seq(sid, root)
        return sid

    def close(self, sid: int) -> None:
        seq = self._seqs.pop(sid, None)
        if seq is None:
            return
        if seq.chain is not None:
            self.kv.release(seq.chain, seq.id, self._chains)
            del self._chains[seq.id]
        root = seq.root
        root.users -= 1
        if root.users <= 0:
            self.kv.release(root.chain, root.id, self._chains)
            del self._chains[root.id]
            del self._roots[root.prompt]

    def fed(self, sid: int) -> int:
        return self._seqs[sid].fed

    # compute ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, sids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Feed each sequence its new tokens; the logits after them, float32 [len(sids), V]."""
        seqs = [self._seqs[s] for s in sids]
        roots = list({id(s.root): s.root for s in seqs if s.root.logits is None}.values())
        if roots:
            out = self._extend([(r.chain, list(r.prompt), 0) for r in roots])
            for r, logits in zip(roots, out):
                r.logits = logits
                self.kv.seal(r.chain, r.id)  # the prompt becomes a segment its users share
        for s in seqs:
            if s.chain is None:
                s.chain = self.kv.fork(s.root.chain, s.root.id, [s.id])[0]
                self._chains[s.id] = s.chain
                s.logits = s.root.logits
        singles = [(s, t) for s, t in zip(seqs, tokens) if len(t) == 1]
        multis = [(s, t) for s, t in zip(seqs, tokens) if len(t) > 1]
        if multis:
            out = self._extend([(s.chain, list(t), s.length) for s, t in multis])
            for (s, t), logits in zip(multis, out):
                s.logits, s.fed = logits, s.fed + len(t)
        if singles:
            out = self._decode([s.chain for s, _ in singles], [t[0] for _, t in singles],
                               [s.length for s, _ in singles])
            for (s, _), logits in zip(singles, out):
                s.logits, s.fed = logits, s.fed + 1
        return torch.stack([s.logits for s in seqs]).float()

    def _extend(self, work: list[tuple[list[Segment], list[int], int]]) -> list[torch.Tensor]:
        """Several tokens for each chain (causal among themselves): logits after each chain's last."""
        contexts, counts, slots, toks, positions = [], [], [], [], []
        for chain, new, start in work:
            before = Segment()
            before.slots = list(chain[-1].slots)
            slots.extend(self.kv.append_slots(chain, len(new)))
            contexts.append(chain[:-1] + [before])
            counts.append(len(new))
            toks.extend(new)
            positions.extend(range(start, start + len(new)))
        plan = ExtendPlan(self.kv, contexts, counts, slots, self.scale)
        ends = list(itertools.accumulate(counts))
        return list(self._forward(toks, positions, plan, [e - 1 for e in ends]))

    def _decode(self, chains: list[list[Segment]], toks: list[int], positions: list[int]) -> list[torch.Tensor]:
        slots = [self.kv.append_slots(c, 1)[0] for c in chains]
        plan = DecodePlan(self.kv, chains, slots, self.scale)
        return list(self._forward(toks, positions, plan, list(range(len(toks)))))

    def _forward(self, toks: list[int], positions: list[int], plan, rows: list[int]) -> torch.Tensor:
        hidden = self.model.hidden_states(torch.tensor(toks, device=self.device),
                                          torch.tensor(positions, device=self.device), plan)
        picked = hidden.index_select(0, torch.tensor(rows, device=self.device))
        return self.model.head(picked)[1].float()


class HiddenFromLogits:
    """h from logits = E h (least squares), for logits [B, V] and E [V, H]."""

    def __init__(self, token_matrix: torch.Tensor, iterations: int = 6):
        e = token_matrix.detach().float()
        self.e = e
        gram = e.double().t() @ e.double()
        self.chol = torch.linalg.cholesky(gram)
        self.iterations = iterations

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(rhs.double().t(), self.chol).t().float()

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.to(self.e.device).float()
        finite = torch.isfinite(x)
        h = self._solve(torch.where(finite, x, torch.zeros_like(x)) @ self.e)
        holes = ~finite.all(dim=1)
        if bool(holes.any()):
            rows = holes.nonzero().squeeze(1)
            xr, fr, hr = x[rows], finite[rows], h[rows]
            for _ in range(self.iterations):
                hr = self._solve(torch.where(fr, xr, hr @ self.e.t()) @ self.e)
            h[rows] = hr
        return h


def load_token_matrix(model_path: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The served model's output token matrix E [V, H] (float32), read from its checkpoint:
    `lm_head.weight`, or the input embedding when the two are tied. Reads only that tensor
    from safetensors files; other formats (GGUF) go through the native loader."""
    path = Path(model_path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        from safetensors import safe_open

        tied = False
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            tied = bool(json.loads(cfg_file.read_text()).get("tie_word_embeddings", False))
        names = ["model.embed_tokens.weight"] if tied else ["lm_head.weight", "model.embed_tokens.weight"]
        for name in names:
            for f in files:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    if name in st.keys():  # noqa: SIM118  (safe_open has no __contains__)
                        return st.get_tensor(name).float().to(device)
        raise ValueError(f"{model_path}: no lm_head.weight or model.embed_tokens.weight in its safetensors")
    from alignserve.engine.native.loader import load_model

    model, _, _ = load_model(model_path, torch.device("cpu"), torch.float32)
    return model.lm_head.weight.detach().float().to(device)
