"""A compact Llama-family transformer (Llama, Mistral, Qwen2, SmolLM) in plain PyTorch.

The model knows nothing of the KV cache layout: each layer hands its queries and new keys and
values to an attention plan (`attention.py`), which stores the keys and values and attends.
That seam is where shared prefixes are read once per group and where Triton kernels plug in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = None

    @classmethod
    def from_hf(cls, cfg: Any) -> ModelConfig:
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        heads = cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(cfg, "attention_bias", False) or cfg.model_type == "qwen2"),
            rope_scaling=rope if rope_type not in ("default", None) else None,
        )


class AttentionPlan(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], new k/v [T, KVH, D] -> attention output [T, H, D]."""


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.x: long wavelengths are stretched by `factor`, with a smooth band between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        band = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv = torch.where(band, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel: one op instead of six (pow, mean, add, rsqrt, mul, mul), each of
        # which costs a parallel region on a CPU; fp32 results equal the six ops' bit for bit.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos [T, D] and signed sin [T, D] from `CausalLM.rope`; HF's rotate-half
    convention: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) as x * cos + roll(x) * sin, three
    contiguous ops (the CPU pays per op, decode steps most; 1.6x the seven-op version's speed
    for a 1,447-token prompt)."""
    xf = x.float()
    out = torch.roll(xf, x.shape[-1] // 2, dims=-1).mul_(sin.unsqueeze(1))
    return out.addcmul_(xf, cos.unsqueeze(1)).to(x.dtype)


class DecoderLayer(nn.Module):
    # Linears whose output feeds only elementwise ops and then another linear: on a CPU with
    # bf16 weights they may hand it on in bf16 (`cpu_linear.FewRowBf16Linear.bf16_out`).
    bf16_outputs = ("gate_up",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=False)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    # The layer is two pieces around attention, so that a decode step can run the dense pieces
    # from CUDA graphs and attention eagerly between them (`cuda_graphs.py`).
    def pre_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> q [T, H, D], k and v [T, KVH, D] (rotated, contiguous)."""
        cfg = self.cfg
        t = x.shape[0]
        qkv = self.qkv(self.input_norm(x))
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q = qkv[:, :q_out].view(t, cfg.num_heads, cfg.head_dim)
        k = qkv[:, q_out : q_out + kv_out].view(t, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, q_out + kv_out :].view(t, cfg.num_kv_heads, cfg.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.contiguous()

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream x [T, hidden] and attention output [T, H, D] (x's dtype) -> the
        layer's output."""
        x = x + self.o_proj(attn.reshape(x.shape[0], -1))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def forward(self, x, cos, sin, plan: AttentionPlan, index: int) -> torch.Tensor:
        q, k, v = self.pre_attention(x, cos, sin)
        return self.post_attention(x, plan.attend(index, q, k, v).to(x.dtype))


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [T, D] for token positions [T], as `apply_rope` takes them: built
        once per forward for all layers, both halves laid out so rotation needs no slicing."""
        angles = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        cos, sin = torch.cos(angles), torch.sin(angles)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def hidden_states(
        self, tokens: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan,
        capture: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states after the last layer, before the final norm. Layers named in
        `capture` (a dict of layer count -> None) get their output stored there."""
        cos, sin = self.rope(positions)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, plan, i)
            if capture is not None and i + 1 in capture:
                capture[i + 1] = x
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()

    def head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized hidden, float32 logits) for hidden states before the final norm."""
        normed = self.norm(hidden)
        return normed, self.lm_head(normed).float()


def load_hf_state(model: CausalLM, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy a transformers Llama-family state dict into our fused layout."""
    cfg = model.cfg
    with torch.no_grad():
        model.embed.weight.copy_(hf_state["model.embed_tokens.weight"])
        model.norm.weight.copy_(hf_state["model.norm.weight"])
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(hf_state.get("lm_head.weight", hf_state["model.embed_tokens.weight"]))
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            layer.input_norm.weight.copy_(hf_state[p + "input_layernorm.weight"])
            layer.post_norm.weight.copy_(hf_state[p + "post_attention_layernorm.weight"])
            layer.qkv.weight.copy_(torch.cat([hf_state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
            if cfg.attention_bias:
                layer.qkv.bias.copy_(torch.cat([hf_state[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
            layer.o_proj.weight.copy_(hf_state[p + "self_attn.o_proj.weight"])
            layer.gate_up.weight.copy_(
                torch.cat([hf_state[p + "mlp.gate_proj.weight"], hf_state[p + "mlp.up_proj.weight"]])
            )
            layer.down.weight.copy_(hf_state[p + "mlp.down_proj.weight"])
