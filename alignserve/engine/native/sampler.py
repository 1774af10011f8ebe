"""Turn one generate group's pending logits into tokens: processors, constraints, sampling."""

from __future__ import annotations

import torch

from alignserve.engine.grammar import (
    GrammarState,
    allowed_argmax,
    apply_bitmask,
    fill_bitmasks,
    new_bitmask,
)
from alignserve.engine.native.sequence import GenGroup, SeqState
from alignserve.engine.protocol import StepInputs
from alignserve.kernels import dispatch
from alignserve.kernels.sampling import row_seed


def apply_penalties(logits: torch.Tensor, states: list[SeqState], params) -> torch.Tensor:
    """OpenAI presence/frequency penalties and the multiplicative repetition penalty."""
    if not (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0):
        return logits
    logits = logits.clone()
    for i, st in enumerate(states):
        out = st.handle.output_ids
        if not out:
            continue
        ids = torch.tensor(out, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[1]).to(logits.dtype)
        seen = counts > 0
        if params.repetition_penalty != 1.0:
            rp = params.repetition_penalty
            row = logits[i]
            logits[i] = torch.where(seen, torch.where(row > 0, row / rp, row * rp), row)
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * seen.to(logits.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """OpenAI's logit_bias: each listed token's logit moves by its value, in every row."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), device=logits.device)
    values = torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
    logits = logits.clone()
    logits[:, ids] += values
    return logits


def prompt_logprob_entries(logits: torch.Tensor, next_ids: list[int], k: int) -> list[dict]:
    """Log-probs of `next_ids[i]` under row i of `logits` (plus each row's top k), as the
    engine's logprob entries {"token_id", "logprob", "top": [(id, logprob)]}."""
    lps = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(next_ids, device=lps.device)
    chosen = lps.gather(1, ids.view(-1, 1)).squeeze(1).tolist()
    tops: list[list] = [[] for _ in next_ids]
    if k:
        vals, idx = torch.topk(lps, min(k, lps.shape[1]), dim=-1)
        tops = [list(zip(i.tolist(), v.tolist())) for i, v in zip(idx, vals)]
    return [{"token_id": t, "logprob": lp, "top": top}
            for t, lp, top in zip(next_ids, chosen, tops)]


def step_inputs(states: list[SeqState]) -> StepInputs:
    def stack(values):
        return torch.stack(values).float() if values and all(v is not None for v in values) else None

    followers = [st.follower for st in states]
    return StepInputs(
        hidden=stack([st.hidden for st in states]),
        early_logits=stack([st.early_logits for st in states]),
        follower_logits=stack([f.logits if f is not None else None for f in followers]),
    )


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


def sample_rows(states: list[SeqState], group: GenGroup, vocab: int) -> list[tuple[int, float, list | None]]:
    """[(token, logprob of the token under the model, top logprobs or None)] per state."""
    params = group.params
    raw = torch.stack([st.logits for st in states]).float()
    logits = raw
    grammars = grammar_states(states, params)
    masked: list[int] = []
    if grammars is not None:
        # one bitmask buffer per generate group, reused every step (grown when rows join),
        # filled once and applied twice: before steering, so that a processor chooses among
        # allowed tokens only (VAS's top-k candidates, contrastive's plausible set, DeAL's
        # captured next-token distributions; vLLM's bitmask precedes its logits processors
        # too), and last, so that nothing after it revives a disallowed token
        if group.bitmask is None or group.bitmask.shape[0] < len(grammars):
            group.bitmask = new_bitmask(len(grammars), logits.shape[-1])
        masked = fill_bitmasks([None if g.broken else g for g in grammars], group.bitmask)
        if masked:
            logits = apply_bitmask(raw.clone(), group.bitmask[: len(states)], masked)
    if group.processor is not None:
        logits = group.processor([st.handle for st in states], logits, step_inputs(states))
    logits = apply_penalties(logits, states, params)
    logits = apply_logit_bias(logits, params.logit_bias)
    # min_tokens never masks the stop token of a row whose grammar allows nothing else
    early = [i for i, st in enumerate(states) if st.handle.num_output < params.min_tokens
             and not (grammars and grammars[i].completed)]
    if early and group.stop_ids:
        logits = logits.clone() if logits is raw else logits
        stop = torch.tensor(sorted(group.stop_ids), device=logits.device)
        rows = torch.tensor(early, device=logits.device)
        logits[rows.unsqueeze(1), stop.unsqueeze(0)] = float("-inf")
    if masked:
        logits = apply_bitmask(logits.clone() if logits is raw else logits,
                               group.bitmask[: len(states)], masked)
    b = len(states)
    dev = logits.device
    tokens = dispatch.sample(
        logits,
        torch.full((b,), params.temperature, device=dev),
        torch.full((b,), params.top_k, device=dev, dtype=torch.int64),
        torch.full((b,), params.top_p, device=dev),
        torch.full((b,), params.min_p, device=dev),
        [row_seed(st.rng_seed, st.handle.num_output) for st in states],
    )
    # The chosen tokens' logprobs without writing out the whole log-softmax, and tokens and
    # logprobs read back together: one device-to-host copy per step, not two (float64 holds
    # every token id exactly).
    chosen = raw.gather(1, tokens.view(-1, 1)).squeeze(1) - torch.logsumexp(raw, dim=-1)
    ids, lps = torch.stack((tokens.double(), chosen.double())).tolist()
    for i, (state, token) in enumerate(zip(grammars or (), ids)):
        if state.broken or state.terminated or state.try_accept(int(token)):
            continue
        # sampled outside the mask: steering left no finite score on an allowed token (or NaN);
        # fall back to the model's own best allowed token, or end the row (engine: "abort")
        fallback = allowed_argmax(raw[i], group.bitmask[i])
        if fallback is not None and state.try_accept(fallback):
            ids[i] = fallback
            lps[i] = float(raw[i, fallback] - torch.logsumexp(raw[i], dim=-1))
        else:
            state.broken = True
    tops: list[list | None] = [None] * b
    if params.logprobs:
        vals, idx = torch.topk(torch.log_softmax(raw, dim=-1), min(params.logprobs, vocab), dim=-1)
        tops = [list(zip(i.tolist(), v.tolist())) for i, v in zip(idx, vals)]
    return list(zip(map(int, ids), lps, tops))
