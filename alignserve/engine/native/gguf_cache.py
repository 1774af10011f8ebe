"""A GGUF model converted once into a Hugging Face folder that both engines load.

transformers parses a GGUF file and dequantizes its weights on every load (tokenizer, config
and weights each parse the file): ~40 s for the embedded 93 MB SmolLM2 on the 2-core machine.
The result of that work is kept as a standard Hugging Face model folder: config.json (with
`architectures`), generation_config.json, the tokenizer files, and the dequantized float32
weights as `model.safetensors` under transformers' tensor names (~520 MB for SmolLM2-135M).
The native engine reads it directly (`loader.load_model`); vLLM loads it as it loads any
Hugging Face checkpoint; `alignserve model-path` prints it.

The folder is named after the GGUF's path, size and modification time, so a changed file is
converted again. It is written under a temporary name and renamed, so a crash never leaves a
half-written folder; a folder whose files fail to read is converted again and replaced
(`convert(replace=True)`). A cache that cannot be written (read-only disk) is an error only
for the callers that need a folder (vLLM); the native engine then loads the GGUF directly.

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

import torch

log = logging.getLogger(__name__)

FORMAT = 2  # bump when what an entry holds changes (2: a Hugging Face folder)
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


def complete(entry: Path) -> bool:
    """Whether `entry` holds what a load needs (the rename makes it all or nothing)."""
    return all((entry / f).is_file() for f in ("config.json", WEIGHTS, "tokenizer_config.json"))


def hf_folder(directory: str, gguf: str) -> Path:
    """The Hugging Face folder of this GGUF file, converting it on first use. Raises OSError
    when the cache cannot be written."""
    entry = entry_for(directory, gguf)
    if complete(entry):
        return entry
    return convert(directory, gguf)


def convert(directory: str, gguf: str, *, replace: bool = False) -> Path:
    """Convert the GGUF file into its cache folder (`replace`: even when one is there, e.g. one
    whose files failed to read). Returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = entry_for(directory, gguf)
    if complete(entry) and not replace:
        return entry
    # the folder first: an unwritable cache fails here, before the slow part
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        log.info("converting %s into a Hugging Face folder (once)", gguf)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf,
                                                     local_files_only=True, dtype=torch.float32)
        # transformers refuses to save a model it dequantized from GGUF while the quantizer is
        # attached; the weights are plain float32 tensors by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if complete(entry):  # a racing writer finished first: its folder is as good
            return entry
        raise
    log.info("converted %s into %s", gguf, entry)
    return entry
