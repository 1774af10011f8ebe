"""Model shapes the GPU benchmarks use, and random-weight models of them (speed does not depend
on the weights). `tiny` exists so that a benchmark's code path can be smoke-run on a CPU."""

from __future__ import annotations

import random

import torch

from alignserve.engine.native.model import CausalLM, ModelConfig, rope_frequencies

SHAPES = {
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
                     "rope_theta": 100000.0},
    "llama-3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "head_dim": 64,
                     "rope_theta": 500000.0},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
             "rope_theta": 10000.0},
}

# The same shapes in Hugging Face's LlamaConfig terms (for vLLM and HF generate).
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}


def hf_config_kwargs(shape: str) -> dict:
    return {HF_NAMES.get(k, k): v for k, v in SHAPES[shape].items()} | {
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True}


def build_model(shape: str, device: torch.device | str, dtype: torch.dtype) -> CausalLM:
    """A random-weight CausalLM of `shape` (seeded; norms at 1 so activations stay sane)."""
    cfg = ModelConfig(rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
                      **SHAPES[shape])
    with torch.device(device):
        model = CausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for layer in model.layers:
            layer.input_norm.weight.fill_(1.0)
            layer.post_norm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
    model = model.to(dtype).eval()
    model.inv_freq = rope_frequencies(cfg).to(device)
    return model


def random_prompt(rng: random.Random, shape: str, n: int) -> list[int]:
    """n token ids drawn from the shape's vocabulary (away from its ends, where specials live)."""
    return [rng.randrange(100, SHAPES[shape]["vocab_size"] - 100) for _ in range(n)]
