"""The fused logit pass's inputs for one generate group, built from its sequences' state.

`sampler.py` hands these to `kernels.dispatch.sample` in one call: the request's penalties and
logit bias, the allowed-token mask (grammar, min_tokens), and the group's Steering as
`Contrastive` (the amateur's logits, which the engine computed beside the expert's) and
`ValueGuidance` (the value models' Q on the final hidden state). All per row; None for a part
nobody asked for.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch

from alignserve.engine.grammar import GrammarState, new_bitmask
from alignserve.engine.native.sequence import GenGroup, SeqState
from alignserve.engine.protocol import EngineError
from alignserve.engine.steering import AmateurPrompt, EarlyLayers, ServedAmateur
from alignserve.kernels.logits_ops import (
    Contrastive,
    LogitBias,
    Penalties,
    ValueGuidance,
    apply_bitmask_reference,
    centred_value_sum,
    top_candidates,
)


def penalties(states: list[SeqState], params, device: torch.device) -> Penalties | None:
    """Counts of each row's generated tokens, with the request's three penalties."""
    if not (params.presence_penalty or params.frequency_penalty
            or params.repetition_penalty != 1.0):
        return None
    counts = [Counter(st.handle.output_ids) for st in states]
    width = max(1, max(len(c) for c in counts))
    ids = torch.full((len(states), width), -1, dtype=torch.int64)
    cnt = torch.zeros((len(states), width), dtype=torch.int64)
    for i, c in enumerate(counts):
        if c:
            ids[i, : len(c)] = torch.tensor(list(c.keys()))
            cnt[i, : len(c)] = torch.tensor(list(c.values()))
    b = len(states)
    return Penalties(ids.to(device), cnt.to(device),
                     torch.full((b,), float(params.repetition_penalty), device=device),
                     torch.full((b,), float(params.frequency_penalty), device=device),
                     torch.full((b,), float(params.presence_penalty), device=device))


def logit_bias(bias: dict[int, float], rows: int, device: torch.device) -> LogitBias | None:
    """OpenAI's logit_bias, the same in every row."""
    if not bias:
        return None
    ids = torch.tensor(list(bias), dtype=torch.int64, device=device)
    values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)
    return LogitBias(ids.expand(rows, -1), values.expand(rows, -1))


def grammar_states(states: list[SeqState], params) -> list[GrammarState] | None:
    """Each row's matcher, brought to its sequence's output (started on the first step of a
    sequence that has none; a fork copied its parent's, a truncate rolled it back). A row whose
    output holds a token its grammar rejects comes back `broken` (never an exception here)."""
    compiled = params.grammar
    if compiled is None:
        return None
    out = []
    for st in states:
        if st.grammar is None:
            st.grammar = compiled.new_state()
        st.grammar.sync(st.handle.output_ids)
        out.append(st.grammar)
    return out


def _packed_words(tokens) -> dict[int, int]:
    """Word index -> the bits of `tokens` in it, as a packed bitmask lays them out."""
    words: dict[int, int] = {}
    for t in tokens:
        words[t >> 5] = words.get(t >> 5, 0) | (1 << (t & 31))
    return words


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64, as the bitmask's signed int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _clear_bits(mask: torch.Tensor, rows: list[int], tokens: list[int]) -> None:
    """Disallow `tokens` in `rows` of a packed int32 bitmask, in place."""
    r = torch.tensor(rows, dtype=torch.long)
    for w, bits in _packed_words(tokens).items():
        cur = mask[r, w].to(torch.int64) & 0xFFFFFFFF
        mask[r, w] = _as_int32(cur & (~bits & 0xFFFFFFFF))


def allowed_tokens(states: list[SeqState], group: GenGroup, grammars: list[GrammarState] | None,
                   vocab: int) -> torch.Tensor | None:
    """The packed bitmask [B, ceil(V / 32)] of the tokens each row may take next (its grammar;
    no stop token before min_tokens, unless the grammar allows nothing else), or None when
    every row may take any token. One CPU buffer per group, reused every step."""
    params = group.params
    early = [i for i, st in enumerate(states) if st.handle.num_output < params.min_tokens
             and not (grammars and grammars[i].completed)]
    only = params.allowed_token_ids
    if grammars is None and not (early and group.stop_ids) and not only:
        return None
    b = len(states)
    if group.bitmask is None or group.bitmask.shape[0] < b:
        group.bitmask = new_bitmask(b, vocab)
    mask = group.bitmask[:b]
    mask.fill_(-1)
    for i, state in enumerate(grammars or ()):
        # a broken row (its output left the grammar) ends this step: no constraint for it
        if not (state.broken or state.terminated) and not state.fill(mask, i):
            mask[i].fill_(-1)  # no constraint this step
    if only:  # vLLM's allowed_token_ids, every row (the API refuses it beside a grammar)
        mask &= _only_mask(tuple(only), vocab)
    stops = [t for t in group.stop_ids if 0 <= t < vocab]
    if early and stops:
        _clear_bits(mask, early, stops)
    return mask


@functools.lru_cache(maxsize=64)
def _only_mask(tokens: tuple[int, ...], vocab: int) -> torch.Tensor:
    """A packed int32 row [ceil(V / 32)] allowing exactly `tokens`."""
    row = torch.zeros((vocab + 31) // 32, dtype=torch.int64)
    for w, bits in _packed_words(t for t in tokens if 0 <= t < vocab).items():
        row[w] = bits
    return _as_int32(row)


def _amateur_rows(states: list[SeqState], amateur, served_logits) -> list[torch.Tensor]:
    rows = []
    for st in states:
        if isinstance(amateur, EarlyLayers):
            if st.early_logits is None or st.early_layer != amateur.layers:
                raise EngineError(f"contrastive with the first {amateur.layers} layers needs the "
                                  f"sequence prefilled with early_layer={amateur.layers}")
            rows.append(st.early_logits)
        elif isinstance(amateur, AmateurPrompt):
            if st.follower is None or st.follower.logits is None:
                raise EngineError("the amateur prompt's context has no pending logits")
            rows.append(st.follower.logits)
        elif isinstance(amateur, ServedAmateur):
            logits = served_logits(st)
            if logits is None:
                raise EngineError(f"amateur {amateur.name!r} has no pending logits")
            rows.append(logits)
        else:
            raise EngineError(f"unknown amateur {amateur!r}")
    return rows


def contrastive(states: list[SeqState], group: GenGroup, device: torch.device,
                served_logits=None) -> Contrastive | None:
    """Each row against its amateur's pending logits. `served_logits(state)`: a served
    amateur's pending logits for the row (the engine reads them from the amateur engine)."""
    steer = group.steering.contrastive if group.steering is not None else None
    if steer is None:
        return None
    rows = _amateur_rows(states, steer.amateur, served_logits or (lambda st: None))
    b = len(states)
    amateur = torch.stack([r.to(device) for r in rows]).float()
    return Contrastive(amateur, torch.arange(b, device=device),
                       torch.full((b,), float(steer.alpha), device=device),
                       torch.full((b,), float(steer.beta), device=device))


def value_guidance(states: list[SeqState], group: GenGroup, raw: torch.Tensor,
                   allowed: torch.Tensor | None) -> ValueGuidance | None:
    """VAS: the top_k allowed tokens of each row's model logits, their centred, weighted Q from
    the value models on the final hidden state."""
    steer = group.steering.value if group.steering is not None else None
    if steer is None:
        return None
    if any(st.hidden is None for st in states):
        raise EngineError("value guidance needs the hidden states behind the logits")
    hidden = torch.stack([st.hidden for st in states]).float()
    scores = raw if allowed is None else apply_bitmask_reference(raw, allowed)
    ids = top_candidates(scores, steer.top_k)
    safe = ids.clamp_min(0)
    qs = [vm.q_values(hidden, safe) for vm, _ in steer.models]
    values = centred_value_sum(qs, [w for _, w in steer.models], ids)
    b, dev = len(states), raw.device
    return ValueGuidance(ids, values.to(dev), torch.full((b,), float(steer.beta), device=dev),
                         torch.full((b,), bool(steer.keep_others), device=dev))
