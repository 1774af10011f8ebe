"""A tiny engine for strategy tests without a model: next-token probabilities from a bigram
table (they depend only on the last token), greedy `generate`, and bookkeeping a test can check
(live sequences, calls). Speaks the engine protocol as far as the strategies use it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from alignserve.engine.protocol import SeqHandle, StepInputs, TokenEvent, TokenTally
from alignserve.engine.steering import EarlyLayers, ServedAmateur
from alignserve.kernels.logits_ops import Contrastive, process_logits_reference


class FakeTokenizer:
    def __init__(self, words: Sequence[str], eos: int = 0, bos: int | None = None):
        self.words = list(words)
        self.eos_token_id = eos
        self.bos_token_id = bos

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.words[i] for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.words.index(" " + w) for w in text.split()]
        return ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None
                else []) + ids


class FakeEngine:
    def __init__(self, words: Sequence[str], table: dict[int, Sequence[float]], eos: int = 0,
                 max_model_len: int = 64, num_layers: int = 4, early_table=None):
        self.tokenizer = FakeTokenizer(words, eos)
        self.model_name = "fake"
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset({eos})
        self.vocab_size = len(words)
        self.num_layers = num_layers
        self.table = table
        self.early_table = early_table  # probabilities of the `early_layer` amateur, if any
        self._ids = itertools.count(1)
        self.live: dict[int, SeqHandle] = {}
        self.calls: dict[str, int] = {}

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _row(self, table, seq: SeqHandle) -> torch.Tensor:
        probs = table[seq.token_ids[-1]]
        return torch.tensor([math.log(p) if p > 0 else float("-inf") for p in probs])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    template_kwargs: dict | None = None) -> tuple[str, list[int]]:
        text = " ".join(m["content"] for m in messages)
        return text, self.encode(text)

    async def prefill(self, prompt_ids, tally: TokenTally | None = None, early_layer=None):
        self._call("prefill")
        h = SeqHandle(key=next(self._ids), prompt_len=len(prompt_ids), token_ids=list(prompt_ids))
        h.user = early_layer
        self.live[h.key] = h
        if tally:
            tally.add("prefill", len(prompt_ids))
        return h

    async def fork(self, seq: SeqHandle, n: int) -> list[SeqHandle]:
        self._call("fork")
        assert seq.key in self.live
        kids = []
        for _ in range(n):
            h = SeqHandle(key=next(self._ids), prompt_len=seq.prompt_len,
                          token_ids=list(seq.token_ids), user=seq.user)
            self.live[h.key] = h
            kids.append(h)
        return kids

    async def extend(self, seqs, tokens, tally=None, kind="decode") -> None:
        self._call("extend")
        for s, t in zip(seqs, tokens):
            assert s.key in self.live
            s.token_ids.extend(t)
            if tally:
                tally.add(kind, len(t))

    async def logits(self, seqs) -> torch.Tensor:
        return torch.stack([self._row(self.table, s) for s in seqs])

    def _amateur(self, steering, live) -> Contrastive | None:
        """Steering's contrastive part on the fake's tables: `EarlyLayers` reads the early
        table, `ServedAmateur` another fake engine's table on the same tokens (the fake has no
        other amateur)."""
        c = steering.contrastive if steering is not None else None
        if c is None:
            return None
        if isinstance(c.amateur, EarlyLayers):
            assert self.early_table is not None and all(s.user == c.amateur.layers for s in live)
            rows = [self._row(self.early_table, s) for s in live]
        else:
            assert isinstance(c.amateur, ServedAmateur), "the fake serves no other amateur"
            rows = [c.amateur.model._row(c.amateur.model.table, s) for s in live]
        b = len(live)
        return Contrastive(torch.stack(rows), torch.arange(b), torch.full((b,), c.alpha),
                           torch.full((b,), c.beta))

    async def generate(self, seqs, params, steering=None, tally=None, kind="decode",
                       observer=None):
        self._call("generate")
        assert params.greedy, "the fake engine only decodes greedily"
        assert steering is None or steering.value is None, "the fake engine has no value models"
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        live = list(seqs)
        while live:
            logits = torch.stack([self._row(self.table, s) for s in live])
            if observer is not None:
                observer(live, logits, StepInputs())
            for i, s in enumerate(live):  # min_tokens: no stop token before it
                if s.num_output < params.min_tokens:
                    logits[i, sorted(stop_ids)] = float("-inf")
            logits = process_logits_reference(logits, contrastive=self._amateur(steering, live))
            lp = torch.log_softmax(torch.stack([self._row(self.table, s) for s in live]), -1)
            events, nxt = [], []
            for s, row, lrow in zip(live, logits, lp):
                tok = int(torch.argmax(row))
                reason = None
                if tok in stop_ids and s.num_output + 1 >= params.min_tokens:
                    reason = "stop"
                elif s.num_output + 1 >= params.max_tokens:
                    reason = "length"
                events.append(self.commit(s, tok, float(lrow[tok]), reason))
                if reason is None:
                    nxt.append(s)
            if tally:
                tally.add(kind, len(nxt))
            live = nxt
            yield events

    def commit(self, s: SeqHandle, tok: int, logprob: float, reason: str | None) -> TokenEvent:
        """Append a sampled token to `s` (text, log-likelihood, finish) and make its event."""
        s.token_ids.append(tok)
        s.text = self.tokenizer.decode(s.output_ids)
        s.cumulative_logprob += logprob
        s.finished, s.finish_reason = reason is not None, reason
        return TokenEvent(s, tok, logprob, self.tokenizer.decode([tok]), reason is not None, reason)

    async def truncate(self, seq: SeqHandle, length: int) -> None:
        self._call("truncate")
        del seq.token_ids[length:]
        seq.finished, seq.finish_reason = False, None

    async def release(self, seqs) -> None:
        for s in seqs:
            self.live.pop(s.key, None)
