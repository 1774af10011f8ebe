"""Served amateurs (`--amateur NAME=PATH`) on the vLLM engine.

On the native engine a served amateur is a second engine that the expert engine drives in
lockstep (engine/native/amateurs.py). On vLLM the amateur runs in vLLM's engine core, beside
the served model, as a side model of `AlignLogitsProcessor` (source "model"), and vLLM never
hands out exact full logits for a lockstep loop anyway. So the API process holds only a
description: what `contrastive` checks a request against (vocabulary, context) and what its
steering names (`ServedAmateur(name, model=this)`); `VllmEngine` maps the name to the path
(`amateur_paths`, or this description's `path`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoreAmateur:
    name: str
    path: str
    vocab_size: int
    max_model_len: int

    @classmethod
    def read(cls, name: str, path: str) -> CoreAmateur:
        """Reads the model's config only (the weights load in the engine core on first use)."""
        from transformers import AutoConfig

        from alignserve.engine.native.loader import model_folder

        path, _ = model_folder(path)  # the engine core loads the converted folder, once
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        cfg = getattr(cfg, "text_config", None) or cfg
        return cls(name, path, int(cfg.vocab_size), int(cfg.max_position_embeddings))

    # the app's lifespan starts and closes served amateurs; nothing runs in this process
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
