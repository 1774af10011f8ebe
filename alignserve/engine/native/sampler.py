"""Turn one generate group's pending logits into tokens: one fused pass over the logits.

Everything that shapes what a row samples (the request's penalties and logit bias, min_tokens
and its grammar, the group's Steering: contrastive and value guidance) goes to
`kernels.dispatch.sample` as data in a single call (`steering_inputs.py` builds it): the
fused Triton kernel on CUDA, on a CPU the C++ kernel (the Triton kernel's noise, drawn over
the reference's top-k / top-p / min-p kept set where a row has one), the PyTorch reference
where neither is built; the same code path in production and in the tests. Log-probs reported for the chosen tokens are the model's own (the raw
logits), as vLLM reports them.
"""

from __future__ import annotations

import torch

from alignserve.engine.grammar import allowed_argmax
from alignserve.engine.native import steering_inputs as inputs
from alignserve.engine.native.sequence import GenGroup, SeqState
from alignserve.engine.protocol import StepInputs
from alignserve.kernels import dispatch
from alignserve.kernels.sampling import row_seed


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

    return StepInputs(hidden=stack([st.hidden for st in states]),
                      early_logits=stack([st.early_logits for st in states]))


def sample_rows(states: list[SeqState], group: GenGroup, vocab: int,
                served_logits=None) -> list[tuple[int, float, list | None]]:
    """[(token, logprob of the token under the model, top logprobs or None)] per state.
    `served_logits(state)`: a served amateur's pending logits for the row (contrastive)."""
    params = group.params
    raw = torch.stack([st.logits for st in states]).float()
    if group.observer is not None:
        group.observer([st.handle for st in states], raw, step_inputs(states))
    b, dev = len(states), raw.device
    grammars = inputs.grammar_states(states, params)
    allowed = inputs.allowed_tokens(states, group, grammars, raw.shape[-1])
    penalties = inputs.penalties(states, params, dev)
    bias = inputs.logit_bias(params.logit_bias, b, dev)
    contrastive = inputs.contrastive(states, group, dev, served_logits)
    vas = inputs.value_guidance(states, group, raw, allowed)
    # the Triton path writes the sparse inputs into its logits: keep `raw` for the logprobs
    scratch = raw.clone() if (penalties or bias or vas) else raw
    tokens = dispatch.sample(
        scratch,
        torch.full((b,), params.temperature, device=dev),
        torch.full((b,), params.top_k, device=dev, dtype=torch.int64),
        torch.full((b,), params.top_p, device=dev),
        torch.full((b,), params.min_p, device=dev),
        [row_seed(st.rng_seed, st.handle.num_output) for st in states],
        penalties=penalties, bias=bias, contrastive=contrastive, vas=vas,
        allowed=None if allowed is None else allowed.to(dev, non_blocking=True),
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
        fallback = allowed_argmax(raw[i], allowed[i])
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
