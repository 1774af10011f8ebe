"""Few-row bf16 linears on CPU (alignserve/engine/native/cpu_linear.py): the choice by row
count, tied weights, and the embedded model's decode staying within bf16 rounding of fp32."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alignserve.engine.native.cpu_linear import (
    ALL_ROWS,
    FEW_ROWS,
    FewRowBf16Linear,
    cpu_has_bf16_units,
    default_max_rows,
    set_few_rows,
    use_bf16_for_few_rows,
)
from alignserve.engine.protocol import SamplingParams


def test_rows_pick_the_weight_copy():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48, bias=True)
    few = FewRowBf16Linear(lin, max_rows=4)
    for shape in [(1, 32), (4, 32), (2, 2, 32)]:
        x = torch.randn(*shape)
        bf = F.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float()
        assert torch.equal(few(x), bf) and few(x).dtype == torch.float32
        assert not torch.equal(few(x), lin(x))  # rounded: another result ...
        torch.testing.assert_close(few(x), lin(x), atol=5e-2, rtol=5e-2)  # ... close to fp32
    for shape in [(5, 32), (3, 2, 32)]:
        x = torch.randn(*shape)
        assert torch.equal(few(x), lin(x))  # more rows: fp32 exactly


def test_bf16_out_hands_on_bf16_and_bf16_inputs_are_taken_as_they_are():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48, bias=False)
    few = FewRowBf16Linear(lin, max_rows=4)
    x = torch.randn(3, 32)
    rounded = F.linear(x.bfloat16(), lin.weight.bfloat16())
    few.bf16_out = True
    assert few(x).dtype == torch.bfloat16 and torch.equal(few(x), rounded)
    assert torch.equal(few(x.bfloat16()), rounded)  # no second rounding of a bf16 input
    many = torch.randn(6, 32).bfloat16()  # past max_rows: fp32 weights, fp32 out, as before
    assert torch.equal(few(many), lin(many.float()))
    few.bf16_out = False
    assert torch.equal(few(x.bfloat16()), rounded.float())

    class Mlp(nn.Module):
        bf16_outputs = ("up",)

        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    m = Mlp()
    use_bf16_for_few_rows(m)
    assert m.up.bf16_out and not m.down.bf16_out


def test_swap_keeps_tied_weights_and_counts():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

    m = Tiny()
    assert use_bf16_for_few_rows(m) == 3
    assert isinstance(m.head, FewRowBf16Linear) and m.head.weight is m.embed.weight
    assert set_few_rows(m, 0) == default_max_rows() and all(
        x.max_rows == 0 for x in m.modules() if isinstance(x, FewRowBf16Linear))
    assert set_few_rows(m, None) == 0 and m.head.max_rows == default_max_rows()
    assert use_bf16_for_few_rows(m) == 0  # nothing left to swap


def test_the_default_follows_the_cpus_bf16_units():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    units = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert cpu_has_bf16_units() is units
    assert default_max_rows() == (ALL_ROWS if units else FEW_ROWS)
    assert FewRowBf16Linear(nn.Linear(4, 4)).max_rows == default_max_rows()


def test_kv_pool_follows_the_linears_and_exact_mode_converts_it(live_server):
    engine = live_server.engine
    default = torch.bfloat16 if cpu_has_bf16_units() else torch.float32
    assert engine.kv.k.dtype == engine.kv.v.dtype == default
    engine.set_exact(True)
    try:
        assert engine.kv.k.dtype == engine.kv.v.dtype == torch.float32
        assert all(m.max_rows == 0 for m in engine.model.modules()
                   if isinstance(m, FewRowBf16Linear))
    finally:
        engine.set_exact(False)
    assert engine.kv.k.dtype == default
    assert all(m.max_rows == default_max_rows() for m in engine.model.modules()
               if isinstance(m, FewRowBf16Linear))


@pytest.mark.parametrize("max_rows", [FEW_ROWS, ALL_ROWS])
def test_embedded_model_decodes_within_bf16_rounding_of_fp32(live_server, max_rows):
    engine = live_server.engine
    ids = engine.encode_chat([{"role": "user", "content": "Name three colors."}])[1]

    async def greedy(max_rows):
        previous = set_few_rows(engine.model, max_rows)
        try:
            seq = await engine.prefill(ids)
            steps = []

            def keep(seqs, logits, inputs):
                steps.append(logits[0].clone())
                return logits

            async for _ in engine.generate([seq], SamplingParams(temperature=0, max_tokens=6,
                                                                 ignore_eos=True), observer=keep):
                pass
            await engine.release([seq])
            return seq.output_ids, steps
        finally:
            set_few_rows(engine.model, previous)

    run = lambda c: asyncio.run_coroutine_threadsafe(c, engine.loop).result(300)
    exact_ids, exact = run(greedy(0))
    fast_ids, fast = run(greedy(max_rows))
    # FEW_ROWS: only the one-row calls (the last prompt token's head, then decode) round to
    # bf16; ALL_ROWS: the prompt's 30 layers too. bf16 keeps 8 significant bits (relative
    # rounding 2**-9 per input), products accumulate in fp32 over 576-1536 terms and the
    # residual stream stays fp32, so the logits (magnitude ~10-30) move by a few tenths at
    # most: 1.0 leaves room for that and still fails a wrong weight or a lost layer (those
    # move logits by whole units).
    diff = max(float((a - b).abs().max()) for a, b in zip(exact, fast))
    assert 0 < diff < (0.5 if max_rows == FEW_ROWS else 1.0), diff
    assert fast_ids == exact_ids
    assert any(isinstance(m, FewRowBf16Linear) for m in engine.model.modules())


@pytest.mark.parametrize("flag", ["--cpu-bf16-decode", "--no-cpu-bf16-decode"])
def test_flag_is_checked_against_the_device(flag):
    import argparse

    from alignserve.server.settings import add_arguments, from_args

    def parse(argv):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return from_args(parser.parse_args(argv))

    ok = parse(["--device", "cpu", flag])
    assert ok.cpu_bf16_decode is (flag == "--cpu-bf16-decode")
    assert parse(["--device", "cpu"]).cpu_bf16_decode is None  # the default: on for a CPU
    if flag == "--cpu-bf16-decode":
        with pytest.raises(ValueError, match="--cpu-bf16-decode"):
            parse(["--device", "cuda", flag]).check()
