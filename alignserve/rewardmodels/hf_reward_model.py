"""A reward model served from a local directory: any Hugging Face
`AutoModelForSequenceClassification` checkpoint plus its tokenizer.

Loaded once at server start (`--reward-model NAME=PATH`), shared by every request. Nothing
is fetched: `local_files_only=True`.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import torch

MAX_BATCH = 16  # pairs per forward pass: bounds activation memory for long candidates
DEFAULT_MAX_TOKENS = 4096  # truncation when the tokenizer does not state a usable limit


class HFRewardModel:
    """Scores (prompt, text) pairs; the reward is the logit of label 0 (the only logit for
    a single-output head, which is what reward models have)."""

    def __init__(self, name: str, path: str | Path, device: str = "cpu") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"reward model {name!r}: {path} is not a local directory")
        self.name = name
        self.path = path
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True
        ).to(self.device)
        self.model.eval()
        if self.tokenizer.pad_token is None:
            # Decoder-only reward models often lack a pad token; padding is masked anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            # Decoder classification heads find each row's last real token by pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_tokens = self._max_tokens()
        # Tokenizers may emit token_type_ids that a decoder-only model's forward rejects.
        accepted = inspect.signature(self.model.forward).parameters
        self._drop_type_ids = "token_type_ids" not in accepted
        self._lock = threading.Lock()  # one forward at a time: the model is shared

    def _max_tokens(self) -> int:
        limits = [DEFAULT_MAX_TOKENS]
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
            limits.append(tok_limit)
        pos_limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(pos_limit, int) and pos_limit > 0:
            limits.append(pos_limit)
        return min(limits)

    @torch.inference_mode()
    def _forward(self, prompts: list[str], texts: list[str]) -> list[float]:
        # Pairs go in as the tokenizer's text pair (segment ids / separators as the model
        # was trained); with no prompt the text alone.
        pair = prompts if any(prompts) else None
        enc = self.tokenizer(
            pair if pair is not None else texts,
            texts if pair is not None else None,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        if self._drop_type_ids:
            enc.pop("token_type_ids", None)
        logits = self.model(**enc).logits
        return logits[:, 0].float().tolist()

    def score(self, texts: list[str], prompt: str = "") -> list[float]:
        out: list[float] = []
        with self._lock:
            for start in range(0, len(texts), MAX_BATCH):
                chunk = texts[start : start + MAX_BATCH]
                out.extend(self._forward([prompt] * len(chunk), chunk))
        return out
