"""A value model for VAS: a small head on the frozen base model's final hidden state.

The head predicts Q(s, a), the expected final reward of continuing state s with token a and
then sampling from the base model pi0, for any candidate tokens a:

    Q(s, a) = e_a . W x_s / H  +  e_a . b / sqrt(H)  +  u . x_s / sqrt(H)  +  c

    x_s = h_s / rms_h,   e_a = E_a / rms_E

h_s   the base model's final *normalized* hidden state at s (the vector its logits come from;
      the native engine hands it to logits processors as StepInputs.hidden), H its size,
E_a   row a of the base model's frozen output token matrix (lm_head; SmolLM2 ties it to the
      input embedding): the head reuses the base model's vocabulary geometry and stores none,
W, b  a trained [H x H] map (optionally low rank, W = A B) and a trained vector: the per-token
      part, an action advantage (b alone is a context-free preference, e.g. for positive words),
u, c  a trained state-value part; it is the same for every candidate of a state, so VAS's
      centring cancels it, but it lets the head fit the state's expected reward,
rms_h, rms_E  constants fixed before training (the RMS of the hidden states and of E): with
      them every term sees unit-scale inputs normalised by its fan-in, so one learning rate
      suits any base model. They are stored with the weights.

State value: V(s) = sum_{a in top-k} pi0_k(a|s) Q(s, a), with pi0_k the base policy
renormalized over its top k tokens (TD(lambda) bootstraps from it).

For the embedded default the backbone is the model the engine already runs, so a value model
adds one [B, H] x [H, H] product and a K-row gather per step. On disk it is the head only
(`head.safetensors`, fp32) plus `config.json` naming the base model it was trained on
(hidden and vocabulary sizes, reward spec, training statistics).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "head.safetensors"
FORMAT = "alignserve-value-head/1"


class ValueModelError(ValueError):
    """A value model that cannot be loaded or does not fit the served model."""


@dataclass
class ValueModelConfig:
    base_model: str  # the served model name it was trained on
    hidden_size: int
    vocab_size: int
    rank: int = 0  # 0: full W [hidden, hidden]; r > 0: W = A [hidden, r] @ B [r, hidden]
    reward: Any = None  # the reward spec it was trained on (list of {name, weight, ...})
    description: str = ""
    format: str = FORMAT
    training: dict[str, Any] = field(default_factory=dict)  # statistics of the run

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ValueModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        missing = {"base_model", "hidden_size", "vocab_size"} - set(data)
        if missing:
            raise ValueModelError(f"value model config lacks {sorted(missing)}")
        if data.get("format", FORMAT) != FORMAT:
            raise ValueModelError(f"unsupported value model format {data.get('format')!r} "
                                  f"(this server reads {FORMAT!r})")
        return cls(**{k: v for k, v in data.items() if k in known})


class ValueHead(nn.Module):
    """Q(s, a) from hidden states [B, H] and candidate token vectors [B, K, H] (rows of the
    frozen token matrix E, passed in); see the module docstring for the formula."""

    def __init__(self, hidden_size: int, rank: int = 0, init_value: float = 0.0):
        super().__init__()
        self.hidden_size, self.rank = hidden_size, rank
        if rank > 0:
            self.down = nn.Parameter(torch.randn(rank, hidden_size) / math.sqrt(hidden_size))
            self.up = nn.Parameter(torch.zeros(hidden_size, rank))
        else:
            self.weight = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.state_weight = nn.Parameter(torch.zeros(hidden_size))
        self.state_bias = nn.Parameter(torch.tensor(float(init_value)))
        self.register_buffer("hidden_rms", torch.tensor(1.0))
        self.register_buffer("token_rms", torch.tensor(1.0))

    def set_input_scales(self, hidden_rms: float, token_rms: float) -> None:
        self.hidden_rms.fill_(hidden_rms)
        self.token_rms.fill_(token_rms)

    def query(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vector q_s with Q(s, a) - (u.x_s / sqrt(H) + c) = E_a . q_s."""
        h = self.hidden_size
        x = hidden / self.hidden_rms
        wx = (x @ self.down.t()) @ self.up.t() if self.rank > 0 else x @ self.weight.t()
        return (wx / h + self.bias / math.sqrt(h)) / self.token_rms

    def state_part(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden / self.hidden_rms
        return (x @ self.state_weight) / math.sqrt(self.hidden_size) + self.state_bias

    def forward(self, hidden: torch.Tensor, token_vectors: torch.Tensor) -> torch.Tensor:
        """hidden [B, H], token_vectors [B, K, H] (rows of E) -> Q [B, K]."""
        adv = torch.einsum("bkh,bh->bk", token_vectors, self.query(hidden))
        return adv + self.state_part(hidden).unsqueeze(1)


class ValueModel:
    """A head plus its config, bound to the base model's output token matrix to evaluate."""

    def __init__(self, head: ValueHead, config: ValueModelConfig, name: str = "",
                 path: Path | None = None):
        self.head, self.config, self.name, self.path = head.eval(), config, name, path
        self.tokens: torch.Tensor | None = None  # E [V, H], bound with `bind`

    # evaluation -------------------------------------------------------------------------
    def bind(self, token_matrix: torch.Tensor, model_name: str | None = None) -> ValueModel:
        """Use this base model's output token matrix [V, H]; rejects a model of another shape."""
        v, h = token_matrix.shape
        cfg = self.config
        if (v, h) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueModelError(
                f"value model {self.name or self.path} was trained on {cfg.base_model} "
                f"(hidden {cfg.hidden_size}, vocabulary {cfg.vocab_size}); the served model "
                f"{model_name or ''} has hidden {h}, vocabulary {v}".replace("  ", " "))
        t = self.tokens
        if t is None or t.data_ptr() != token_matrix.data_ptr() or t.device != token_matrix.device:
            self.head = self.head.to(token_matrix.device)
            self.tokens = token_matrix
        return self

    @torch.no_grad()
    def q_values(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Q(s, a) [B, K] (float32) for hidden [B, H] and candidate ids [B, K]."""
        if self.tokens is None:
            raise ValueModelError("value model is not bound to a base model (call bind)")
        dev = self.tokens.device
        vecs = self.tokens[ids.to(dev).long()].float()
        return self.head(hidden.to(dev).float(), vecs)

    @torch.no_grad()
    def state_values(self, hidden: torch.Tensor, ids: torch.Tensor,
                     probs: torch.Tensor) -> torch.Tensor:
        """V(s) [B] = sum_k probs[:, k] Q(s, ids[:, k]) (probs: pi0 renormalized over the ids)."""
        return (self.q_values(hidden, ids) * probs.to(self.tokens.device).float()).sum(-1)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters())

    def describe(self) -> dict[str, Any]:
        return describe_config(self.name, self.config, self.path)

    # storage ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous()
                   for k, v in self.head.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
        (out / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        return out


def read_config(directory: str | Path) -> ValueModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueModelError(f"{directory} is not a value model: it has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueModelError(f"cannot read {path}: {e}") from e
    return ValueModelConfig.from_json(data)


def load_value_model(directory: str | Path, name: str = "") -> ValueModel:
    """Read a saved head (not yet bound to a base model)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueModelError(f"value model {name or directory}: {weights} is missing")
    head = ValueHead(cfg.hidden_size, cfg.rank)
    state = load_file(str(weights))
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueModelError(f"value model {name or directory}: weights do not match its "
                              f"config (hidden {cfg.hidden_size}, rank {cfg.rank}): {e}") from e
    return ValueModel(head, cfg, name=name or directory.name, path=directory)


def describe_config(name: str, cfg: ValueModelConfig, path: Path | None = None) -> dict[str, Any]:
    train = cfg.training or {}
    return {
        "name": name,
        "description": cfg.description,
        "reward": cfg.reward,
        "base_model": cfg.base_model,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "head": "Q(s,a) = e_a.W x_s/H + e_a.b/sqrt(H) + u.x_s/sqrt(H) + c; x_s the base "
                "model's final normalized hidden state, e_a its frozen token vectors (both "
                "RMS-scaled)" + (f" (W of rank {cfg.rank})" if cfg.rank else ""),
        "training": {k: train[k] for k in ("completions", "heldout_loss", "constant_loss",
                                           "max_tokens", "lambda", "gamma") if k in train},
    }


def token_matrix(engine: Any) -> torch.Tensor:
    """The served model's output token matrix [V, H] (lm_head; tied to the embedding for
    SmolLM2). Native engine: model.lm_head; a transformers model: get_output_embeddings()."""
    model = getattr(engine, "model", engine)
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None:
        raise ValueModelError("this engine does not expose its model's token matrix, which "
                              "value models need")
    return weight.detach()
