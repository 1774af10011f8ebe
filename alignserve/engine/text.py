"""Incremental detokenization and stop strings, shared by the engines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROMPT_WINDOW = 6  # prompt tokens that seed the window so the first token decodes in context


class IncrementalText:
    """Turns tokens into text deltas, holding back what could still become a stop string."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int], stop: Sequence[str] = (),
                 initial_text: str = "", include_stop: bool = False):
        self.tok = tokenizer
        self.ids = list(context_ids[-_PROMPT_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = initial_text
        self.emitted = len(initial_text)
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str | None:
        """Add a token; returns the stop string hit, if any (the text is cut before it, or
        after it with `include_stop`)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            start = max(0, len(self.text) - self.holdback)
            self.text += new
            for s in self.stop:
                at = self.text.find(s, start)
                if at >= 0:
                    self.text = self.text[:at + len(s) if self.include_stop else at]
                    return s
        return None

    def delta(self, final: bool) -> str:
        """Text not yet handed out that can no longer turn into a stop string."""
        safe = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out


class DeferredText:
    """IncrementalText's interface for a caller that wants the text only at the end: tokens are
    collected and decoded once, when the sequence finishes (one decode instead of two per token;
    per-token detokenization is most of the host time of wide best-of-n sampling)."""

    def __init__(self, tokenizer: Any, prior_ids: Sequence[int] = (), initial_text: str = ""):
        self.tok = tokenizer
        self.ids = list(prior_ids)  # output tokens before this call, decoded with the new ones
        self.text = initial_text
        self.emitted = len(initial_text)
        self.final = False

    def push(self, token_id: int) -> str | None:
        self.ids.append(token_id)
        return None

    def delta(self, final: bool) -> str:
        if not final or self.final:
            return ""
        self.final = True
        self.text = self.tok.decode(self.ids, skip_special_tokens=True) if self.ids else ""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


class TextCodec:
    """encode / encode_chat / decode over `self.tokenizer`; both engines speak text this way."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        """Text inside a sequence (a chat template's output, a continuation): no special
        tokens added (a template writes its own BOS)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt (completions): with the tokenizer's special tokens, as vLLM encodes
        one, so a Llama-family model sees its BOS first (SmolLM2's tokenizer adds none)."""
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    template_kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
        """The chat template's text and ids: ending with the assistant's turn opening, or
        (`continue_final_message`) in the final message, with no end-of-turn after it.
        `template_kwargs`: extra variables the template reads."""
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False,
            **(template_kwargs or {}))
        return text, self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
