"""Fused logit processing and sampling in Triton, beside `sampling.py` / `logits_ops.py` (the
PyTorch references). `dispatch.sample` picks this on CUDA tensors. Import it only where triton is
installed; on CPU it runs under `TRITON_INTERPRET=1` (set before this module is first imported).

No sort and no workspace. Each program takes ROWS rows (1 on a GPU with a real vocabulary; many
for small vocabularies and under the interpreter, whose cost is per operation, not per element).
A row's processed score of token i is x_i = (contrastive combination of the logit) / temperature,
recomputed from the inputs at every pass. Sampling is Gumbel-max: token = argmax over the kept set
K of y_i = x_i + g_i, with g_i = -log(-log(u_i)) and u_i a counter-based hash of (seed, i), so the
noise of a row depends only on its seed.

The kept set of min-p, top-k and top-p is an upper set in x (K = {x >= T} for a threshold T), so
the kernel never needs T itself:

- pass 1 (streaming): the row's max m, its normaliser Z = sum exp(x - m), and the candidate
  c = argmax_i y_i over the whole row;
- c is in K iff x_c >= m + log(min_p), #(x > x_c) < top_k and sum_{x > x_c} exp(x - m) <
  top_p * Z (the top token always is). If so, c = argmax_K y and the row is done: no more passes
  when top-k and top-p are off, one when they are on;
- if c is not in K, every token with x <= x_c is outside K, so argmax_K y = argmax_{x > x_c} y,
  which that same pass computed: the next candidate. The pass also tests a pivot q halfway
  between x_c and m; when q is outside K too, it jumps to argmax_{x > q} y (a value bisection
  that bounds the number of passes when K is small and the distribution flat).

The result is exactly argmax_K y for the row's noise, hence the distribution of the sort-based
reference. The first candidate is kept with probability >= the kept mass, so typical rows take
1 pass (no top-k/top-p) or 2. Ties at the top-k / top-p boundary keep all tied tokens (the
reference keeps the first ones in its sort order).

Sparse inputs are applied before, in place on the logits, by `_sparse_update_kernel`: the
penalties, the logit bias, and the VAS values of rows that keep the non-candidates (rows that also have an
amateur fall back to the reference in `dispatch`). VAS rows that mask the non-candidates are
sampled over their K candidates only (pairwise comparisons instead of passes over the vocab).

The allowed-token mask (a packed int32 bitmask [B, ceil(V / 32)], xgrammar's layout: a grammar,
min_tokens' banned stop tokens) is one more load beside each expert logit: a disallowed token
reads as -inf, in the plausibility max too, as `logits_ops` step 0 defines it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logits_ops import Contrastive, LogitBias, Penalties, ValueGuidance

_GUMBEL_MAX = 17.0  # an upper bound of the noise of `_gumbel` (16.64 and rounding)
_MAX_ITERS = 64  # a safety cap; each candidate test strictly raises the candidate's score


@triton.jit
def _sparse_update_kernel(
    logits_ptr, stride_l, V,
    pen_ids_ptr, pen_cnt_ptr, stride_pi, stride_pc, P, rep_ptr, freq_ptr, pres_ptr,
    vas_ids_ptr, vas_vals_ptr, stride_vi, stride_vv, K, vas_beta_ptr, vas_on_ptr,
    bias_ids_ptr, bias_vals_ptr, stride_bi, stride_bv, NB,
    HAS_PEN: tl.constexpr, HAS_VAS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row, in place: penalties on the generated tokens, the logit bias, then VAS values
    where flagged."""
    row = tl.program_id(0).to(tl.int64)
    l_row = logits_ptr + row * stride_l
    if HAS_PEN:
        rep = tl.load(rep_ptr + row).to(tl.float32)
        freq = tl.load(freq_ptr + row).to(tl.float32)
        pres = tl.load(pres_ptr + row).to(tl.float32)
        for p0 in range(0, P, BLOCK):
            pp = p0 + tl.arange(0, BLOCK)
            ok = pp < P
            ids = tl.load(pen_ids_ptr + row * stride_pi + pp, mask=ok, other=-1)
            cnt = tl.load(pen_cnt_ptr + row * stride_pc + pp, mask=ok, other=0).to(tl.float32)
            valid = ok & (ids >= 0) & (ids < V) & (cnt > 0)
            x = tl.load(l_row + ids, mask=valid, other=0.0)
            xf = x.to(tl.float32)
            xf = tl.where(xf > 0, xf / rep, xf * rep)
            xf = xf - freq * cnt - pres
            tl.store(l_row + ids, xf.to(x.dtype), mask=valid)
    if HAS_BIAS:
        for b0 in range(0, NB, BLOCK):
            bb = b0 + tl.arange(0, BLOCK)
            ok = bb < NB
            ids = tl.load(bias_ids_ptr + row * stride_bi + bb, mask=ok, other=-1)
            vals = tl.load(bias_vals_ptr + row * stride_bv + bb, mask=ok, other=0.0)
            valid = ok & (ids >= 0) & (ids < V)
            x = tl.load(l_row + ids, mask=valid, other=0.0)
            tl.store(l_row + ids, (x.to(tl.float32) + vals.to(tl.float32)).to(x.dtype),
                     mask=valid)
    if HAS_VAS:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if tl.load(vas_on_ptr + row) != 0:
            beta = tl.load(vas_beta_ptr + row).to(tl.float32)
            for k0 in range(0, K, BLOCK):
                kk = k0 + tl.arange(0, BLOCK)
                ok = kk < K
                ids = tl.load(vas_ids_ptr + row * stride_vi + kk, mask=ok, other=-1)
                vals = tl.load(vas_vals_ptr + row * stride_vv + kk, mask=ok, other=0.0)
                valid = ok & (ids >= 0) & (ids < V)
                x = tl.load(l_row + ids, mask=valid, other=0.0)
                xf = x.to(tl.float32) + beta * vals.to(tl.float32)
                tl.store(l_row + ids, xf.to(x.dtype), mask=valid)


@triton.jit
def _mix_seed(seed):
    """SplitMix64's finaliser of the row seeds: nearby seeds get unrelated noise streams."""
    z = seed.to(tl.uint64) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB
    z = (z ^ (z >> 31)) * 0x9E3779B97F4A7C15
    return z ^ (z >> 29)


@triton.jit
def _gumbel(key, offs):
    """Gumbel noise of tokens `offs` for rows whose mixed seeds are `key` (uint64).

    The uniforms are SplitMix64 outputs at counter `offs` (state key + (offs + 1) * golden
    gamma, then its finaliser), a counter-based generator that passes BigCrush at about a third
    of Philox4x32-10's integer work per token; this matters because every pass that needs noise
    regenerates it for the row. From the top 23 bits k: u = (k + 1/2) / 2^23 and v = 1 - u, both
    exact in fp32 and inside (0, 1); the exponential E = -log(u) is taken from its series in v
    where u is near 1 (a fast log of a number that close to 1 may return 0, which would make the
    noise infinite), so E > 0 and the noise -log(E) stays below -log(2^-24) < 16.7."""
    z = key + (offs.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    k = (z >> 41).to(tl.float32)
    u = (k + 0.5) * 1.1920928955078125e-07
    v = ((8388607.0 - k) + 0.5) * 1.1920928955078125e-07
    e = tl.where(v < 1e-3, v * (1.0 + v * (0.5 + v * 0.3333333432674408)), -tl.log(u))
    return -tl.log(e)


@triton.jit
def _expert(l_row, m_row, cols, ok, HAS_MASK: tl.constexpr):
    """The expert's logits [ROWS, N] of tokens `cols`, -inf where masked off or not `ok`."""
    e = tl.load(l_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if HAS_MASK:
        word = tl.load(m_row + (cols >> 5), mask=ok, other=0)
        e = tl.where(((word >> (cols & 31)) & 1) != 0, e, float("-inf"))
    return e


@triton.jit
def _scores(l_row, a_row, m_row, cols, V, row_ok, cd_on, cd_cut, cd_beta, inv_t, any_cd,
            HAS_CD: tl.constexpr, HAS_MASK: tl.constexpr):
    """Processed, temperature-scaled scores [ROWS, N] of tokens `cols` (-inf past V)."""
    ok = row_ok & (cols < V)
    e = _expert(l_row, m_row, cols, ok, HAS_MASK)
    x = e
    if HAS_CD:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if any_cd:
            a = tl.load(a_row + cols, mask=ok & cd_on, other=0.0).to(tl.float32)
            contrast = tl.where(e >= cd_cut, (1.0 + cd_beta) * e - cd_beta * a, float("-inf"))
            x = tl.where(cd_on, contrast, e)
    return x * inv_t


@triton.jit
def _pick(x, y, cols, best_y, best_i, best_x):
    """Fold a tile into running per-row argmaxes of y (first index on ties), carrying x there."""
    ty, ti = tl.max(y, axis=1, return_indices=True)
    at = tl.arange(0, y.shape[1])[None, :] == ti[:, None]
    tx = tl.sum(tl.where(at, x, 0.0), axis=1)
    tc = tl.sum(tl.where(at, cols, 0), axis=1)
    upd = ty > best_y
    return tl.where(upd, ty, best_y), tl.where(upd, tc, best_i), tl.where(upd, tx, best_x)


@triton.jit
def _full_rows(
    l_row, a_row, m_row, V, r_mask, key, greedy, inv_t, log_mp, kk, top_p,
    cd_on, cd_cut, cd_beta, any_cd,
    HAS_CD: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    GUMBEL_MAX: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    """Streaming path: pass 1, then candidate tests until each row's candidate is kept."""
    row_ok = r_mask[:, None]
    vb = tl.arange(0, BLOCK_V)[None, :]
    # ---- pass 1: max, normaliser and the unconstrained Gumbel argmax ----
    m = tl.full([ROWS], -1.0e30, tl.float32)
    z = tl.zeros([ROWS], tl.float32)
    best_y = tl.full([ROWS], float("-inf"), tl.float32)
    best_i = tl.zeros([ROWS], tl.int32)
    best_x = tl.full([ROWS], float("-inf"), tl.float32)
    for t0 in range(0, V, BLOCK_V):
        cols = t0 + vb
        x = _scores(l_row, a_row, m_row, cols, V, row_ok, cd_on, cd_cut, cd_beta, inv_t, any_cd,
                    HAS_CD, HAS_MASK)
        tmax = tl.max(x, axis=1)
        m_new = tl.maximum(m, tmax)
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        y = x
        noisy = (~greedy) & (tmax + GUMBEL_MAX > best_y)  # else no token of the tile can win
        if tl.max(noisy.to(tl.int32), axis=0) > 0:
            y = tl.where(noisy[:, None], x + _gumbel(key[:, None], cols), x)
        best_y, best_i, best_x = _pick(x, y, cols, best_y, best_i, best_x)
    token = best_i
    # ---- candidate tests (only where top-k / top-p / min-p can reject) ----
    cut = m + log_mp
    use_p = top_p < 1.0
    pz = tl.where(use_p, top_p * z, float("inf"))
    need_pass = (kk <= V) | use_p
    c_i = best_i
    c_x = best_x
    active = r_mask & (~greedy) & (best_y > float("-inf")) & ((c_x < cut) | need_pass)
    it = 0
    while (tl.max(active.to(tl.int32), axis=0) > 0) & (it < MAX_ITERS):
        q = 0.5 * (c_x + m)
        cnt_c = tl.zeros([ROWS], tl.int32)
        mass_c = tl.zeros([ROWS], tl.float32)
        bc_y = tl.full([ROWS], float("-inf"), tl.float32)
        bc_i = c_i
        bc_x = tl.full([ROWS], float("-inf"), tl.float32)
        cnt_q = tl.zeros([ROWS], tl.int32)
        mass_q = tl.zeros([ROWS], tl.float32)
        bq_y = tl.full([ROWS], float("-inf"), tl.float32)
        bq_i = c_i
        bq_x = tl.full([ROWS], float("-inf"), tl.float32)
        for t0 in range(0, V, BLOCK_V):
            cols = t0 + vb
            x = _scores(l_row, a_row, m_row, cols, V, row_ok, cd_on, cd_cut, cd_beta, inv_t,
                        any_cd, HAS_CD, HAS_MASK)
            live = active & (tl.max(x, axis=1) > c_x)  # rows with a token above the candidate
            if tl.max(live.to(tl.int32), axis=0) > 0:
                y = x + _gumbel(key[:, None], cols)
                w = tl.exp(x - m[:, None])
                above_c = x > c_x[:, None]
                cnt_c += tl.sum(above_c.to(tl.int32), axis=1)
                mass_c += tl.sum(tl.where(above_c, w, 0.0), axis=1)
                bc_y, bc_i, bc_x = _pick(x, tl.where(above_c, y, float("-inf")), cols,
                                         bc_y, bc_i, bc_x)
                above_q = x > q[:, None]
                cnt_q += tl.sum(above_q.to(tl.int32), axis=1)
                mass_q += tl.sum(tl.where(above_q, w, 0.0), axis=1)
                bq_y, bq_i, bq_x = _pick(x, tl.where(above_q, y, float("-inf")), cols,
                                         bq_y, bq_i, bq_x)
        accept = (c_x >= cut) & ((cnt_c == 0) | ((cnt_c < kk) & (mass_c < pz)))
        q_out = (cnt_q > 0) & ((q < cut) | (cnt_q >= kk) | (mass_q >= pz))
        n_i = tl.where(q_out, bq_i, bc_i)
        n_x = tl.where(q_out, bq_x, bc_x)
        stuck = (~accept) & (~(n_x > c_x))  # cannot happen with finite noise; ends the loop
        token = tl.where(active, tl.where(accept | stuck, c_i, n_i), token)
        c_i = tl.where(active, n_i, c_i)
        c_x = tl.where(active, n_x, c_x)
        active = active & (~(accept | stuck))
        it += 1
    return token


@triton.jit
def _cand_scores(l_row, a_row, m_row, ids, vals, valid, cd_on, cd_cut, cd_beta, v_beta, inv_t,
                 any_cd, HAS_CD: tl.constexpr, HAS_MASK: tl.constexpr):
    """Scores [ROWS, N] of VAS candidates `ids` (gathered): contrastive, + beta * value, / T."""
    e = _expert(l_row, m_row, ids, valid, HAS_MASK)
    x = e
    if HAS_CD:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if any_cd:
            a = tl.load(a_row + ids, mask=valid & cd_on, other=0.0).to(tl.float32)
            contrast = tl.where(e >= cd_cut, (1.0 + cd_beta) * e - cd_beta * a, float("-inf"))
            x = tl.where(cd_on, contrast, e)
    x = (x + v_beta * vals) * inv_t
    return tl.where(valid, x, float("-inf"))


@triton.jit
def _cand_rows(
    l_row, a_row, m_row, vk_ids, vk_vals, K, row_ok, key, greedy, inv_t, log_mp, kk, top_p,
    cd_on, cd_cut, cd_beta, v_beta, any_cd,
    HAS_CD: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KB: tl.constexpr,
):
    """VAS rows that mask the non-candidates: their support is K candidates, compared pairwise."""
    kb = tl.arange(0, BLOCK_K)[None, :]
    ids_i = tl.load(vk_ids + kb, mask=row_ok & (kb < K), other=-1)
    valid_i = ids_i >= 0
    vals_i = tl.load(vk_vals + kb, mask=valid_i, other=0.0).to(tl.float32)
    x_i = _cand_scores(l_row, a_row, m_row, ids_i, vals_i, valid_i, cd_on, cd_cut, cd_beta,
                       v_beta, inv_t, any_cd, HAS_CD, HAS_MASK)
    if HAS_CD:
        # a row whose candidates are all outside the plausible set drops the contrastive part
        empty = tl.max(x_i, axis=1) == float("-inf")
        cd_on = cd_on & (~empty[:, None])
        x_i = _cand_scores(l_row, a_row, m_row, ids_i, vals_i, valid_i, cd_on, cd_cut, cd_beta,
                           v_beta, inv_t, any_cd, HAS_CD, HAS_MASK)
    m = tl.max(x_i, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    z = tl.sum(tl.exp(x_i - m_safe[:, None]), axis=1)
    cnt = tl.zeros(x_i.shape, tl.int32)
    mass = tl.zeros(x_i.shape, tl.float32)
    for j0 in range(0, K, BLOCK_KB):
        jj = j0 + tl.arange(0, BLOCK_KB)[None, :]
        ids_j = tl.load(vk_ids + jj, mask=row_ok & (jj < K), other=-1)
        valid_j = ids_j >= 0
        vals_j = tl.load(vk_vals + jj, mask=valid_j, other=0.0).to(tl.float32)
        x_j = _cand_scores(l_row, a_row, m_row, ids_j, vals_j, valid_j, cd_on, cd_cut, cd_beta,
                           v_beta, inv_t, any_cd, HAS_CD, HAS_MASK)
        above = x_j[:, None, :] > x_i[:, :, None]
        cnt += tl.sum(above.to(tl.int32), axis=2)
        w_j = tl.exp(x_j - m_safe[:, None])
        mass += tl.sum(tl.where(above, w_j[:, None, :], 0.0), axis=2)
    pz = tl.where(top_p < 1.0, top_p * z, float("inf"))
    kept = valid_i & (x_i >= (m + log_mp)[:, None]) & (
        (cnt == 0) | ((cnt < kk[:, None]) & (mass < pz[:, None])))
    y = tl.where(kept, x_i + _gumbel(key[:, None], tl.maximum(ids_i, 0)), float("-inf"))
    y = tl.where(greedy[:, None], x_i, y)
    _, pos = tl.max(y, axis=1, return_indices=True)
    return tl.sum(tl.where(kb == pos[:, None], ids_i, 0), axis=1)


@triton.jit
def _sample_kernel(
    logits_ptr, stride_l, V, B,
    temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, out_ptr,
    am_ptr, stride_a, A, am_idx_ptr, cd_alpha_ptr, cd_beta_ptr,
    vas_ids_ptr, vas_vals_ptr, stride_vi, stride_vv, K, vas_beta_ptr, vas_mask_ptr,
    mask_ptr, stride_m,
    HAS_CD: tl.constexpr, HAS_VAS: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KB: tl.constexpr,
    GUMBEL_MAX: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < B
    row_ok = r_ok[:, None]
    l_row = (logits_ptr + rows * stride_l)[:, None]
    m_row = (mask_ptr + rows * stride_m)[:, None]
    temp = tl.load(temp_ptr + rows, mask=r_ok, other=1.0).to(tl.float32)
    greedy = temp <= 1e-5
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.maximum(temp, 1e-5))
    key = _mix_seed(tl.load(seed_ptr + rows, mask=r_ok, other=0))
    top_k = tl.load(topk_ptr + rows, mask=r_ok, other=0)
    top_p = tl.load(topp_ptr + rows, mask=r_ok, other=1.0).to(tl.float32)
    min_p = tl.load(minp_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
    log_mp = tl.where(min_p > 0.0, tl.log(tl.minimum(tl.maximum(min_p, 1e-30), 1.0)),
                      float("-inf"))
    kk = tl.where((top_k > 0) & (top_k < V), top_k, V + 1)

    # ---- contrastive: the plausibility cut needs the expert's max (one extra pass) ----
    cd_on = row_ok & False
    cd_cut = 0.0
    cd_beta = 0.0
    a_row = l_row
    any_cd = False
    if HAS_CD:
        arow = tl.load(am_idx_ptr + rows, mask=r_ok, other=-1)
        cd_on = (r_ok & (arow >= 0) & (arow < A))[:, None]  # out of range: no amateur
        any_cd = tl.max(cd_on.to(tl.int32)) > 0
        a_row = (am_ptr + tl.maximum(arow, 0).to(tl.int64) * stride_a)[:, None]
        cd_beta = tl.load(cd_beta_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
        log_alpha = tl.log(tl.load(cd_alpha_ptr + rows, mask=r_ok, other=1.0).to(tl.float32))
        cd_cut = log_alpha[:, None]
        if any_cd:
            mvec = tl.full([ROWS, BLOCK_V], -1.0e30, tl.float32)
            for t0 in range(0, V, BLOCK_V):
                cols = t0 + tl.arange(0, BLOCK_V)[None, :]
                e = _expert(l_row, m_row, cols, cd_on & (cols < V), HAS_MASK)
                mvec = tl.maximum(mvec, e)
            cd_cut = (log_alpha + tl.max(mvec, axis=1))[:, None]

    if HAS_VAS:
        vas_only = r_ok & (tl.load(vas_mask_ptr + rows, mask=r_ok, other=0) != 0)
        tok_c = tl.zeros([ROWS], tl.int32)
        if tl.max(vas_only.to(tl.int32), axis=0) > 0:
            v_beta = tl.load(vas_beta_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
            tok_c = _cand_rows(
                l_row, a_row, m_row, (vas_ids_ptr + rows * stride_vi)[:, None],
                (vas_vals_ptr + rows * stride_vv)[:, None], K, vas_only[:, None], key, greedy,
                inv_t[:, None], log_mp, kk, top_p, cd_on, cd_cut, cd_beta, v_beta[:, None],
                any_cd, HAS_CD, HAS_MASK, BLOCK_K, BLOCK_KB)
        streamed = r_ok & (~vas_only)
        tok_f = tl.zeros([ROWS], tl.int32)
        if tl.max(streamed.to(tl.int32), axis=0) > 0:
            tok_f = _full_rows(l_row, a_row, m_row, V, streamed, key, greedy, inv_t[:, None],
                               log_mp, kk, top_p, cd_on, cd_cut, cd_beta, any_cd,
                               HAS_CD, HAS_MASK, ROWS, BLOCK_V, GUMBEL_MAX, MAX_ITERS)
        token = tl.where(vas_only, tok_c, tok_f)
    else:
        token = _full_rows(l_row, a_row, m_row, V, r_ok, key, greedy, inv_t[:, None], log_mp,
                           kk, top_p, cd_on, cd_cut, cd_beta, any_cd,
                           HAS_CD, HAS_MASK, ROWS, BLOCK_V, GUMBEL_MAX, MAX_ITERS)
    tl.store(out_ptr + rows, token.to(tl.int64), mask=r_ok)


# ----------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------

def kernel_gumbel_numpy(seed: int, vocab: int):
    """The noise `_sample_kernel` adds to a row with this seed, recomputed on the host in numpy
    (for tests and GPU checks: with it, the kernel's token is argmax over the kept set of
    scores / T + noise, token for token)."""
    import numpy as np

    u64, f32 = np.uint64, np.float32
    with np.errstate(over="ignore"):
        z = u64(seed) * u64(0xBF58476D1CE4E5B9) + u64(0x94D049BB133111EB)
        z = (z ^ (z >> u64(31))) * u64(0x9E3779B97F4A7C15)
        key = z ^ (z >> u64(29))
        z = key + (np.arange(vocab, dtype=np.uint64) + u64(1)) * u64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
        z = z ^ (z >> u64(31))
    k = (z >> u64(41)).astype(f32)
    u = (k + f32(0.5)) * f32(2.0 ** -23)
    v = ((f32(8388607.0) - k) + f32(0.5)) * f32(2.0 ** -23)
    series = v * (f32(1.0) + v * (f32(0.5) + v * f32(1 / 3)))
    e = np.where(v < f32(1e-3), series, -np.log(u)).astype(f32)
    return -np.log(e)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _rows_of(x, b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-row parameter as a contiguous [b] tensor (a scalar is broadcast)."""
    t = torch.as_tensor(x, device=device)
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"a per-row parameter has shape {tuple(t.shape)}, expected ({b},)")
    return t.to(dtype).contiguous()


def _check_rows(t: torch.Tensor, b: int, what: str) -> None:
    if t.dim() != 2 or t.shape[0] != b:
        raise ValueError(f"{what} must be [{b}, K], got {tuple(t.shape)}")


def vas_masking_rows(vas: ValueGuidance) -> torch.Tensor:
    """Rows sampled over their candidates only: with a candidate and not keeping the others."""
    return (vas.ids >= 0).any(dim=1) & ~vas.keep_others.bool()


def vas_keeping_rows(vas: ValueGuidance) -> torch.Tensor:
    return (vas.ids >= 0).any(dim=1) & vas.keep_others.bool()


def apply_sparse_updates_triton(
    logits: torch.Tensor, penalties: Penalties | None, vas: ValueGuidance | None = None,
    vas_rows: torch.Tensor | None = None, bias: LogitBias | None = None,
) -> torch.Tensor:
    """In place on `logits` [B, V] (last dim contiguous): the penalties, the logit bias, then
    for the rows flagged by `vas_rows` the VAS values (beta * value added to each candidate)."""
    b, v = logits.shape
    dev = logits.device
    has_pen = penalties is not None and penalties.ids.numel() > 0
    has_vas = vas is not None and vas_rows is not None and vas.ids.numel() > 0
    has_bias = bias is not None and bias.ids.numel() > 0
    if b == 0 or not (has_pen or has_vas or has_bias):
        return logits
    i32, f32 = torch.int32, torch.float32
    if has_pen:
        _check_rows(penalties.ids, b, "penalties.ids")
        _check_rows(penalties.counts, b, "penalties.counts")
        pids = penalties.ids.to(device=dev, dtype=i32).contiguous()
        pcnt = penalties.counts.to(device=dev, dtype=i32).contiguous()
        p = pids.shape[1]
        rep = _rows_of(penalties.repetition, b, f32, dev)
        freq = _rows_of(penalties.frequency, b, f32, dev)
        pres = _rows_of(penalties.presence, b, f32, dev)
    else:
        pids = pcnt = torch.zeros((b, 1), dtype=i32, device=dev)
        p = 0
        rep = freq = pres = torch.zeros((b,), dtype=f32, device=dev)
    if has_vas:
        _check_rows(vas.ids, b, "vas.ids")
        _check_rows(vas.values, b, "vas.values")
        vids = vas.ids.to(device=dev, dtype=i32).contiguous()
        vvals = vas.values.to(device=dev, dtype=f32).contiguous()
        k = vids.shape[1]
        vbeta = _rows_of(vas.beta, b, f32, dev)
        von = _rows_of(vas_rows, b, i32, dev)
    else:
        vids = torch.zeros((b, 1), dtype=i32, device=dev)
        vvals = torch.zeros((b, 1), dtype=f32, device=dev)
        k = 0
        vbeta = torch.zeros((b,), dtype=f32, device=dev)
        von = torch.zeros((b,), dtype=i32, device=dev)
    if has_bias:
        _check_rows(bias.ids, b, "bias.ids")
        _check_rows(bias.values, b, "bias.values")
        bids = bias.ids.to(device=dev, dtype=i32).contiguous()
        bvals = bias.values.to(device=dev, dtype=f32).contiguous()
        nb = bids.shape[1]
    else:
        bids = torch.zeros((b, 1), dtype=i32, device=dev)
        bvals = torch.zeros((b, 1), dtype=f32, device=dev)
        nb = 0
    _sparse_update_kernel[(b,)](
        logits, logits.stride(0), v, pids, pcnt, pids.stride(0), pcnt.stride(0), p, rep, freq,
        pres, vids, vvals, vids.stride(0), vvals.stride(0), k, vbeta, von,
        bids, bvals, bids.stride(0), bvals.stride(0), nb,
        HAS_PEN=has_pen, HAS_VAS=has_vas, HAS_BIAS=has_bias,
        BLOCK=min(256, max(16, _next_pow2(max(p, k, nb)))), num_warps=4,
    )
    return logits


def sample_triton(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, seeds: torch.Tensor, *, penalties: Penalties | None = None,
    contrastive: Contrastive | None = None, vas: ValueGuidance | None = None,
    bias: LogitBias | None = None, allowed: torch.Tensor | None = None,
    block_v: int | None = None, rows_per_program: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Token ids [B] (int64). `logits` [B, V] (any float dtype) is scratch: penalties, the bias
    and the VAS values of rows that keep the non-candidates are written into it. `seeds` [B]
    (int64): the noise key of each row. `allowed`: a packed int32 bitmask [B, ceil(V / 32)]
    of the tokens each row may take, or None. Rows with both an amateur and VAS keep_others are not supported here
    (`dispatch.sample` sends such batches to the reference)."""
    b, v = logits.shape
    dev = logits.device
    out = torch.empty((b,), dtype=torch.int64, device=dev)
    if b == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    i32, f32 = torch.int32, torch.float32
    has_vas = vas is not None and vas.ids.numel() > 0
    keep_rows = vas_keeping_rows(vas).to(dev) if has_vas else None
    has_cd = contrastive is not None
    if has_cd and has_vas:
        with_am = _rows_of(contrastive.amateur_index, b, i32, dev) >= 0
        if bool((with_am & keep_rows).any()):
            raise NotImplementedError("a row with an amateur and VAS keep_others")
    apply_sparse_updates_triton(logits, penalties, vas, keep_rows, bias)
    temp = _rows_of(temperature, b, f32, dev)
    tk = _rows_of(top_k, b, i32, dev)
    tp = _rows_of(top_p, b, f32, dev)
    mp = _rows_of(min_p, b, f32, dev)
    sd = _rows_of(seeds, b, torch.int64, dev)
    if has_cd:
        am = contrastive.amateur_logits.to(dev)
        if am.dim() != 2 or am.shape[1] != v:
            raise ValueError(f"amateur_logits must be [A, {v}], got {tuple(am.shape)}")
        if am.stride(1) != 1:
            am = am.contiguous()
        am_idx = _rows_of(contrastive.amateur_index, b, i32, dev)
        cd_alpha = _rows_of(contrastive.alpha, b, f32, dev)
        cd_beta = _rows_of(contrastive.beta, b, f32, dev)
        stride_a, n_am = am.stride(0), am.shape[0]
    else:
        am, am_idx, cd_alpha, cd_beta, stride_a, n_am = logits, tk, tp, tp, 0, 0
    if has_vas:
        _check_rows(vas.ids, b, "vas.ids")
        _check_rows(vas.values, b, "vas.values")
        vids = vas.ids.to(device=dev, dtype=i32).contiguous()
        vvals = vas.values.to(device=dev, dtype=f32).contiguous()
        k = vids.shape[1]
        vbeta = _rows_of(vas.beta, b, f32, dev)
        vmask = _rows_of(vas_masking_rows(vas).to(dev), b, i32, dev)
        stride_vi, stride_vv = vids.stride(0), vvals.stride(0)
    else:
        vids, vvals, k, vbeta, vmask, stride_vi, stride_vv = tk, tp, 0, tp, tk, 0, 0
    has_mask = allowed is not None
    if has_mask:
        words = (v + 31) // 32
        if allowed.dim() != 2 or allowed.shape[0] != b or allowed.shape[1] < words:
            raise ValueError(f"allowed must be [{b}, >= {words}], got {tuple(allowed.shape)}")
        mask = allowed.to(device=dev, dtype=i32)
        if mask.stride(1) != 1:
            mask = mask.contiguous()
        stride_m = mask.stride(0)
    else:
        mask, stride_m = tk, 0
    if dev.type == "cuda":
        # one row per program for a real vocabulary, 16-byte loads of bf16 (8 per thread);
        # configurations checked free of register spills by ptxas for sm_90
        block_v = block_v or (2048 if v > 4096 else min(1024, max(16, _next_pow2(v))))
        rows_per_program = rows_per_program or (
            1 if v > 4096 else max(1, min(_next_pow2(b), 1024 // block_v)))
        num_warps = num_warps or 8
    else:
        # the interpreter pays per operation, not per element: pack many rows per program
        block_v = block_v or min(256, max(16, _next_pow2(v)))
        rows_per_program = rows_per_program or max(1, min(_next_pow2(b), 8192 // block_v, 256))
        num_warps = num_warps or 4
    block_k = max(16, _next_pow2(k))
    block_kb = min(block_k, 16)
    _sample_kernel[(triton.cdiv(b, rows_per_program),)](
        logits, logits.stride(0), v, b, temp, tk, tp, mp, sd, out,
        am, stride_a, n_am, am_idx, cd_alpha, cd_beta,
        vids, vvals, stride_vi, stride_vv, k, vbeta, vmask, mask, stride_m,
        HAS_CD=has_cd, HAS_VAS=has_vas, HAS_MASK=has_mask, ROWS=rows_per_program,
        BLOCK_V=block_v,
        BLOCK_K=block_k, BLOCK_KB=block_kb, GUMBEL_MAX=_GUMBEL_MAX, MAX_ITERS=_MAX_ITERS,
        num_warps=num_warps,
    )
    return out
