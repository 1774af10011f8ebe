"""A GGUF model converted once, loaded fast after that.

transformers parses a GGUF file and dequantizes its weights on every load (tokenizer, config
and weights each parse the file): ~40 s for the embedded 93 MB SmolLM2 on the 2-core machine,
against ~6 s from the cache (bench/load_time.py). The result of that work (config.json, the
tokenizer files, our model's fp32 weights as safetensors, ~520 MB for SmolLM2-135M) is kept in
a cache folder named after the file's path, size and modification time, so a changed file is
converted again. The folder is written under a temporary name and renamed, so a crash never
leaves a half-written entry; an entry that fails to read or fit is converted again and
replaced; a cache that cannot be written (read-only disk) only costs the speed.

Location: $ALIGNSERVE_CACHE_DIR, else $XDG_CACHE_HOME/alignserve, else ~/.cache/alignserve
(the system's temporary folder when there is no home directory).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds changes
WEIGHTS = "model.safetensors"


def cache_root() -> Path:
    if os.environ.get("ALIGNSERVE_CACHE_DIR"):
        return Path(os.environ["ALIGNSERVE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home directory to be found (some service accounts)
            base = Path(tempfile.gettempdir())
    return Path(base) / "alignserve"


def entry_for(directory: str, gguf: str) -> Path:
    """The cache folder of this GGUF file as it is now."""
    path = Path(directory, gguf).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{FORMAT}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}"


def read(entry: Path) -> tuple[Any, Any, dict[str, torch.Tensor]] | None:
    """(HF config, tokenizer, our state dict) from a complete entry, else None."""
    if not (entry / WEIGHTS).is_file():
        return None
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(entry, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True)
        return cfg, tokenizer, load_file(entry / WEIGHTS)
    except Exception as exc:  # noqa: BLE001  (a damaged entry: convert again)
        log.warning("ignoring the model cache at %s (%s)", entry, exc)
        return None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], entry: Path) -> bool:
    """Load a cached state dict into `model`; False (and a warning) when it does not fit (the
    caller converts again, and `write` replaces the entry)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        problem = str(exc).splitlines()[-1]
    else:
        extra = sorted(set(missing) - {"lm_head.weight"}) + sorted(unexpected)  # lm_head: tied
        if not extra:
            return True
        problem = f"tensors that do not fit: {extra[:5]}"
    log.warning("the model cache at %s does not fit the model (%s); converting again", entry,
                problem)
    return False


def write(entry: Path, hf_cfg: Any, tokenizer: Any, model: torch.nn.Module) -> bool:
    """Store a converted model, replacing a damaged entry; False (and a warning) when the cache
    cannot be written: that costs only the speed of the next load."""
    from safetensors.torch import save_file

    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        hf_cfg.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = model.state_dict()
        if getattr(model.cfg, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the embedding's; safetensors stores a tensor once
        save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp / WEIGHTS)
        if entry.exists():  # an entry that failed to read or fit: its files are replaced
            shutil.rmtree(entry)
        os.replace(tmp, entry)
        log.info("cached the converted model at %s", entry)
        return True
    except Exception as exc:  # noqa: BLE001  (disk full, read-only, a racing writer, ...)
        log.warning("could not cache the converted model at %s: %s", entry, exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return False
