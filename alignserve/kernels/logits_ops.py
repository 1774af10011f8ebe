"""Per-row logit processing beyond temperature and the filters: the PyTorch references.

The order of operations, for every row (each part optional per row):

0. the allowed-token mask (a grammar's bitmask, min_tokens' banned stop tokens): disallowed
   tokens get -inf. Every later step maps -inf to -inf, so this is the same as masking last
   (no steering term can revive a disallowed token), except that the plausibility cut and the
   VAS candidates are taken among the allowed tokens (vLLM's order: its model runner masks
   before the logits processors run), so a steered row never ends up with an empty support.
1. penalties on the model's logits (vLLM's semantics): for each token already generated
   `count` times (count > 0): repetition r divides a positive logit by r and multiplies a
   negative one by r; then `logit -= frequency * count + presence`; then the logit bias
   (OpenAI's `logit_bias`: each listed token's logit moves by its value).
2. contrastive combination with an amateur's logits (Li et al. 2023): with e the expert's
   (penalised) logits and a the amateur's, tokens outside the plausible set
   {e >= log(alpha) + max(e)} (expert log-probs within log(alpha) of the best) get -inf and
   the rest score (1 + beta) * e - beta * a.
3. VAS (value-augmented sampling): candidate token ids [K] with values [K]; each candidate's
   score gets `beta * value` added; non-candidates get -inf unless the row keeps them. A row
   whose candidates all fall outside the contrastive plausible set skips step 2 (so that its
   support is never empty).
4. then temperature, min-p / top-k / top-p and sampling as in `sampling.py`; greedy rows take
   the argmax of the processed scores.

Per-row inputs come in the small dataclasses below, all tensors on the logits' device.
`dispatch.sample` runs the fused Triton kernel on CUDA and these references elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import filter_logits_reference, sample_reference


@dataclass
class Penalties:
    """Counts of each row's generated tokens, sparse: `ids` [B, P] (int, -1 pads; unique within a
    row), `counts` [B, P]; per-row `repetition` (1 = off), `frequency` and `presence` (0 = off)."""

    ids: torch.Tensor
    counts: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor


@dataclass
class LogitBias:
    """Per-row additive biases, sparse: `ids` [B, K] (int, -1 pads; unique within a row) and
    their `values` [B, K]."""

    ids: torch.Tensor
    values: torch.Tensor


@dataclass
class Contrastive:
    """An amateur's logits for some rows: `amateur_logits` [A, V]; `amateur_index` [B] (int) picks
    a row's amateur (-1: the row has none and skips the combination); per-row `alpha` in (0, 1]
    and `beta` >= 0."""

    amateur_logits: torch.Tensor
    amateur_index: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor


@dataclass
class ValueGuidance:
    """VAS: candidate token ids [B, K] (int, -1 pads, unique within a row; a row with no candidate
    skips VAS), their `values` [B, K], per-row `beta`, and `keep_others` [B] (bool): keep the
    non-candidates' scores instead of masking them."""

    ids: torch.Tensor
    values: torch.Tensor
    beta: torch.Tensor
    keep_others: torch.Tensor


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """A packed int32 bitmask [B, ceil(V / 32)] (bit j of word w allows token 32 w + j, as
    xgrammar packs it) as a bool mask [B, vocab]."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where the packed `bitmask` disallows a token (a new fp32 tensor)."""
    x = logits.float()
    allowed = unpack_bitmask(bitmask.to(x.device), x.shape[1])
    return torch.where(allowed, x, torch.full_like(x, float("-inf")))


def apply_logit_bias_reference(logits: torch.Tensor, bias: LogitBias) -> torch.Tensor:
    """Each row's listed tokens moved by their values (a new fp32 tensor)."""
    x = logits.float().clone()
    ids = bias.ids.long()
    valid = (ids >= 0) & (ids < x.shape[1])
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(ids)
    x[rows[valid], ids[valid]] += bias.values.to(x)[valid]
    return x


def apply_penalties_reference(logits: torch.Tensor, pen: Penalties) -> torch.Tensor:
    """Penalised logits (a new fp32 tensor)."""
    x = logits.float().clone()
    ids = pen.ids.long()
    counts = pen.counts.to(x.dtype)
    valid = (ids >= 0) & (ids < x.shape[1]) & (counts > 0)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    cur = torch.gather(x, 1, safe)
    rep = pen.repetition.float().unsqueeze(1)
    new = torch.where(cur > 0, cur / rep, cur * rep)
    new = new - pen.frequency.float().unsqueeze(1) * counts - pen.presence.float().unsqueeze(1)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(ids)
    x[rows[valid], ids[valid]] = new[valid]
    return x


def contrastive_reference(
    expert: torch.Tensor, amateur: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """(1 + beta) * expert - beta * amateur on the plausible set, -inf elsewhere (rows aligned)."""
    e = expert.float()
    a = amateur.float()
    cut = e.max(dim=1, keepdim=True).values + torch.log(alpha.float()).unsqueeze(1)
    b = beta.float().unsqueeze(1)
    return torch.where(e >= cut, (1 + b) * e - b * a, torch.full_like(e, float("-inf")))


def vas_reference(
    scores: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, beta: torch.Tensor,
    keep_others: torch.Tensor,
) -> torch.Tensor:
    """scores [B, V] plus beta * values on each row's candidates; rows without a candidate are
    returned unchanged; non-candidates become -inf unless keep_others."""
    x = scores.float().clone()
    ids = ids.long()
    valid = ids >= 0
    active = valid.any(dim=1)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(ids)
    bonus = torch.zeros_like(x)
    bonus[rows[valid], ids[valid]] = (beta.float().unsqueeze(1) * values.float())[valid]
    is_cand = torch.zeros_like(x, dtype=torch.bool)
    is_cand[rows[valid], ids[valid]] = True
    out = x + bonus
    mask_rows = (active & ~keep_others.bool()).unsqueeze(1)
    return torch.where(mask_rows & ~is_cand, torch.full_like(out, float("-inf")), out)


def process_logits_reference(
    logits: torch.Tensor, penalties: Penalties | None = None,
    contrastive: Contrastive | None = None, vas: ValueGuidance | None = None,
    bias: LogitBias | None = None, allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 0-3 of the module docstring: fp32 scores [B, V] before temperature. `allowed`: a
    packed bitmask [B, ceil(V / 32)] (`unpack_bitmask`), or None."""
    x = logits.float()
    if allowed is not None:
        x = apply_bitmask_reference(x, allowed)
    if penalties is not None:
        x = apply_penalties_reference(x, penalties)
    if bias is not None:
        x = apply_logit_bias_reference(x, bias)
    base = x
    if contrastive is not None:
        idx = contrastive.amateur_index.long()
        has = idx >= 0
        if bool(has.any()):
            am = contrastive.amateur_logits.float()[idx.clamp_min(0)]
            cd = contrastive_reference(x, am, contrastive.alpha, contrastive.beta)
            x = torch.where(has.unsqueeze(1), cd, x)
    if vas is not None:
        x = vas_reference(x, vas.ids, vas.values, vas.beta, vas.keep_others)
        if contrastive is not None:
            # a row whose VAS candidates are all outside the plausible set drops the contrastive
            # part (the only way a row's support can be empty)
            empty = ~torch.isfinite(x).any(dim=1)
            if bool(empty.any()):
                redo = vas_reference(base, vas.ids, vas.values, vas.beta, vas.keep_others)
                x = torch.where(empty.unsqueeze(1), redo, x)
    return x


def sampling_probs_reference(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, *, penalties: Penalties | None = None,
    contrastive: Contrastive | None = None, vas: ValueGuidance | None = None,
    bias: LogitBias | None = None, allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distribution each row samples from [B, V] (one-hot at the argmax for greedy rows)."""
    scores = process_logits_reference(logits, penalties, contrastive, vas, bias, allowed)
    probs = torch.softmax(filter_logits_reference(scores, temperature, top_k, top_p, min_p), dim=1)
    greedy = temperature <= 1e-5
    onehot = torch.nn.functional.one_hot(scores.argmax(dim=1), scores.shape[1]).to(probs.dtype)
    return torch.where(greedy.unsqueeze(1), onehot, probs)


def sample_processed_reference(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, seeds: list[int], *, penalties: Penalties | None = None,
    contrastive: Contrastive | None = None, vas: ValueGuidance | None = None,
    bias: LogitBias | None = None, allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids [B]: steps 0-3, then `sample_reference` (greedy rows: argmax of the scores)."""
    scores = process_logits_reference(logits, penalties, contrastive, vas, bias, allowed)
    return sample_reference(scores, temperature, top_k, top_p, min_p, seeds)


# ----------------------------------------------------------------------------------------------
# building the VAS input (both engines: the native sampler, vLLM's logits processor)
# ----------------------------------------------------------------------------------------------

def top_candidates(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each row's top_k token ids [B, K] (int64); -1 where a row has fewer than K tokens with a
    finite score (a masked-off token is never a candidate)."""
    k = min(top_k, scores.shape[-1])
    vals, ids = torch.topk(scores, k, dim=-1)
    return torch.where(torch.isfinite(vals), ids, torch.full_like(ids, -1))


def centred_value_sum(qs: list[torch.Tensor], weights: list[float],
                      ids: torch.Tensor) -> torch.Tensor:
    """sum_i w_i (Q_i - mean over the row's valid candidates of Q_i): [B, K] fp32, 0 at padding
    (ids < 0). Centring removes each model's state value, the same for every candidate."""
    valid = (ids >= 0).float()
    count = valid.sum(-1, keepdim=True).clamp_min(1.0)
    total = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    for q, w in zip(qs, weights):
        q = q.float().to(ids.device) * valid
        total = total + float(w) * (q - q.sum(-1, keepdim=True) / count) * valid
    return total
