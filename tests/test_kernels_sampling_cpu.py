"""The CPU sampling kernel (C++, built here at first use): the Triton kernel's noise, token for
token, and the distribution it must sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignserve.kernels import cpu_build, dispatch, sampling_cpu
from alignserve.kernels.sampling_triton import kernel_gumbel_numpy

pytestmark = pytest.mark.skipif(cpu_build.compiler() is None,
                                reason="no C++ compiler on PATH (dispatch keeps the reference)")


def test_the_kernel_builds_where_a_compiler_is():
    assert sampling_cpu.library() is not None


@pytest.mark.parametrize("vocab", [49152, 1007])  # 1007: a tail past the last 16 tokens
def test_tokens_are_argmax_of_scores_plus_the_triton_noise(vocab):
    gen = torch.Generator().manual_seed(vocab)
    rows = 24
    x = torch.randn(rows, vocab, generator=gen) * 3
    temps = torch.tensor([0.7, 1.0, 1.3] * (rows // 3))
    seeds = [int(s) for s in torch.randint(0, 2**62, (rows,), generator=gen)]
    tokens = sampling_cpu.sample(x, temps, seeds)
    decided = 0
    for r in range(rows):
        y = x[r].numpy() / np.float32(temps[r]) + kernel_gumbel_numpy(seeds[r], vocab)
        first, second = np.sort(y)[::-1][:2]
        # the kernel's logarithms may differ from numpy's in the last bit (~1e-6 of y)
        if first - second > 1e-4:
            assert int(tokens[r]) == int(np.argmax(y))
            decided += 1
    assert decided >= rows - 2


def test_greedy_rows_and_masked_tokens():
    x = torch.full((3, 300), float("-inf"))
    x[:, 17], x[:, 250], x[:, 33] = 1.0, 2.0, 0.5
    tokens = sampling_cpu.sample(x, torch.tensor([0.0, 1.0, 5.0]), [1, 2, 3])
    assert int(tokens[0]) == 250  # greedy
    assert set(tokens.tolist()[1:]) <= {17, 250, 33}  # -inf is never drawn


@pytest.mark.parametrize("vocab", [5, 37])  # all tail; vectors and a tail
def test_draws_follow_the_softmax(vocab):
    """Frequencies of 20,000 seeds within 5 binomial standard deviations of softmax(x / T)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, vocab, generator=gen) * 1.5
    t = 0.8
    n = 20_000
    tokens = sampling_cpu.sample(x.expand(n, vocab), torch.full((n,), t), list(range(7, 7 + n)))
    freq = torch.bincount(tokens, minlength=vocab).double() / n
    p = torch.softmax(x[0].double() / t, dim=0)
    sd = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 5 * sd + 1e-9).all()), (freq, p)


def test_dispatch_draws_every_cpu_row_with_the_kernels_noise():
    """Unfiltered rows: the kernel on the scores. Filtered rows: the reference's kept set, then
    the same noise, so a row's token does not depend on whether a filter ran (top_k = vocab
    keeps every token: the same draw as no filter)."""
    b, v = 4, 64
    logits = torch.randn(b, v)
    temps = torch.tensor([1.0, 0.7, 0.0, 1.3])
    seeds = [1, 2, 3, 4]
    plain = (torch.zeros(b, dtype=torch.int64), torch.ones(b), torch.zeros(b))
    out = dispatch.sample(logits.clone(), temps, *plain, seeds)
    assert dispatch.LAST_SAMPLE.path == "cpu"
    assert torch.equal(out, sampling_cpu.sample(logits, temps, seeds))
    everything = (torch.full((b,), v), torch.ones(b), torch.zeros(b))
    assert torch.equal(dispatch.sample(logits.clone(), temps, *everything, seeds), out)
    assert dispatch.LAST_SAMPLE.path == "cpu"
    top2 = dispatch.sample(logits.clone(), temps, torch.full((b,), 2), torch.ones(b),
                           torch.zeros(b), seeds)
    best2 = torch.topk(logits, 2, dim=1).indices
    assert bool((top2[:, None] == best2).any(dim=1).all())
    assert int(top2[2]) == int(logits[2].argmax())  # temperature 0: greedy
    dispatch.sample(logits.clone(), temps, *plain, seeds, force="reference")
    assert dispatch.LAST_SAMPLE.path == "reference"
