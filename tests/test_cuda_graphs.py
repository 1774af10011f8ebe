"""Piecewise decode (CUDA graphs for the dense parts, attention eagerly between them).

On CPU the runner takes the same split and padded path without capturing: these tests prove it
gives the model's plain decode path (logits, normalized hidden, early-layer hidden, KV writes)
for batches that need padding and batches that do not, that padded rows never reach real rows,
and that the engine's fallbacks (batch too large, capture failure) work. The tests marked
`cuda` capture real graphs and compare them with eager; they run on a GPU machine.
"""

from __future__ import annotations

import asyncio
import copy
import logging

import pytest
import torch

from alignserve.engine.native.attention import DecodePlan, ExtendPlan
from alignserve.engine.native.cuda_graphs import DEFAULT_BUCKETS, DecodeGraphRunner
from alignserve.engine.native.kv_cache import KVCache, Segment
from alignserve.engine.native.model import CausalLM, ModelConfig
from alignserve.engine.protocol import SamplingParams, TokenTally
from tests.tolerance import model_tol

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_config(**kw) -> ModelConfig:
    base = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_layers": 4,
            "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False,
            "attention_bias": True}
    base.update(kw)
    return ModelConfig(**base)


TINY_TOL = model_tol(tiny_config())  # fp32 runs of the tiny model in two orders


def tiny_model(cfg: ModelConfig | None = None, device="cpu", dtype=torch.float32, seed=0,
               std=0.15) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(cfg or tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = model.inv_freq.float()  # as the loader keeps it
    return model


# ----------------------------------------------------------------------------------------------
# a tree of KV built with the model itself
# ----------------------------------------------------------------------------------------------

def _extend(model: CausalLM, cache: KVCache, chain: list[Segment], tokens: list[int], start: int):
    before = Segment()
    before.slots = list(chain[-1].slots)
    slots = cache.append_slots(chain, len(tokens))
    plan = ExtendPlan(cache, [chain[:-1] + [before]], [len(tokens)], slots, model.cfg.head_dim ** -0.5)
    dev = cache.device
    positions = torch.arange(start, start + len(tokens), device=dev)
    model.hidden_states(torch.tensor(tokens, device=dev), positions, plan)


def build_tree(model: CausalLM, n: int, seed: int, prompt: int = 21
               ) -> tuple[KVCache, list[list[Segment]], list[int]]:
    """n sequences: a shared prompt, two sub-trees sharing a few more tokens each, leaves of
    different lengths (some empty). Returns (cache, chains, lengths)."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, cfg.vocab_size, (k,), generator=g).tolist()
    cache = KVCache(cfg.num_layers, 1024, cfg.num_kv_heads, cfg.head_dim, dtype, dev)
    root = cache.new_chain(0)
    _extend(model, cache, root, rand(prompt), 0)
    half = max(1, n // 2)
    mids = cache.fork(root, 0, [1, 2])
    lengths_mid = [prompt + 5, prompt + 3]
    for chain, extra in zip(mids, (5, 3)):
        _extend(model, cache, chain, rand(extra), prompt)
    chains, lengths = [], []
    kids_a = cache.fork(mids[0], 1, list(range(10, 10 + half)))
    kids_b = cache.fork(mids[1], 2, list(range(100, 100 + n - half))) if n - half else []
    for j, chain in enumerate(kids_a + kids_b):
        base = lengths_mid[0] if j < half else lengths_mid[1]
        extra = j % 3  # 0, 1 or 2 tokens of its own before the step
        if extra:
            _extend(model, cache, chain, rand(extra), base)
        chains.append(chain)
        lengths.append(base + extra)
    return cache, chains, lengths


def decode_both(model, runner, n, steps=3, seed=0, early=(1, 2), poison=False, kv_tol=None,
                for_graphs=False):
    """Run `steps` decode steps on two copies of one KV tree: the plain model path and the
    runner (given plans laid out `for_graphs`, which lets it run steps whole). Returns per step
    (eager, runner) pairs of (normed, logits, early dict)."""
    cache, chains, lengths = build_tree(model, n, seed)
    dev = cache.device
    scale = model.cfg.head_dim ** -0.5
    cache2, chains2 = copy.deepcopy((cache, chains))
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist()
    results = []
    for _ in range(steps):
        pos = torch.tensor(lengths, device=dev)
        tok = torch.tensor(tokens, device=dev)
        plan = DecodePlan(cache, chains, [cache.append_slots(c, 1)[0] for c in chains], scale)
        plan2 = DecodePlan(cache2, chains2, [cache2.append_slots(c, 1)[0] for c in chains2], scale,
                           for_graphs=for_graphs)
        cap = {e: None for e in early}
        normed, logits = model.head(model.hidden_states(tok, pos, plan, cap))
        cap2 = {e: None for e in early}
        assert runner.prepare(n)
        if poison:
            bk = runner._buckets[runner.bucket_for(n)]
            bk.attn[n:] = float("nan")
            bk.tokens[n:] = model.cfg.vocab_size - 1
            bk.positions[n:] = 999
        normed2, logits2 = runner.run(tok, pos, plan2, cap2)
        results.append(((normed, logits, cap), (normed2, logits2, cap2)))
        # the same KV written by both paths
        kv_tol = kv_tol or model_tol(model.cfg, next(model.parameters()).dtype)
        torch.testing.assert_close(cache.k, cache2.k, **kv_tol)
        torch.testing.assert_close(cache.v, cache2.v, **kv_tol)
        tokens = logits.argmax(-1).tolist()
        lengths = [x + 1 for x in lengths]
    return results


def assert_step_close(pair, rtol, atol):
    (normed, logits, cap), (normed2, logits2, cap2) = pair
    assert logits2.shape == logits.shape and normed2.shape == normed.shape
    torch.testing.assert_close(logits2, logits, rtol=rtol, atol=atol)
    torch.testing.assert_close(normed2, normed, rtol=rtol, atol=atol)
    assert cap.keys() == cap2.keys()
    for e in cap:
        torch.testing.assert_close(cap2[e], cap[e], rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# CPU: the split and padded path equals the plain path
# ----------------------------------------------------------------------------------------------

def test_buckets():
    r = DecodeGraphRunner(tiny_model(), capture=False)
    assert DEFAULT_BUCKETS[:5] == (1, 2, 4, 8, 16) and r.max_batch == 256
    assert [r.bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 17, 250, 256)] == [1, 2, 4, 8, 8, 16, 24, 256, 256]
    assert r.bucket_for(257) is None and not r.prepare(257) and not r.prepare(0)
    with pytest.raises(ValueError):
        DecodeGraphRunner(tiny_model(), capture=True)  # no CUDA here: capture needs it


@pytest.mark.parametrize("n", [1, 3, 5, 8, 11])
def test_piecewise_matches_plain_decode(n):
    model = tiny_model()
    runner = DecodeGraphRunner(model, capture=False)
    with torch.inference_mode():
        for pair in decode_both(model, runner, n, steps=3, seed=n):
            assert_step_close(pair, **model_tol(model.cfg))
    assert runner.steps == 3 and runner.captured == []  # eager pieces: nothing recorded


def test_padded_rows_never_reach_real_rows():
    model = tiny_model()
    runner = DecodeGraphRunner(model, capture=False)
    with torch.inference_mode():
        decode_both(model, runner, 7, steps=1, seed=5)  # leaves stale rows 5..7 in bucket 8
        for pair in decode_both(model, runner, 5, steps=2, seed=6, poison=True):
            assert_step_close(pair, **model_tol(model.cfg))
            assert torch.isfinite(pair[1][1]).all()
        bk = runner._buckets[8]
        # the poison did flow through the padded rows: had rows mixed, real rows would be NaN
        assert torch.isnan(bk.outs[-1][1][5:]).all()
        assert torch.isfinite(bk.outs[-1][1][:5]).all()


def test_piecewise_on_the_embedded_model(native_engine):
    model = native_engine.model
    runner = DecodeGraphRunner(model, capture=False, buckets=(4, 8))
    with torch.inference_mode():
        for pair in decode_both(model, runner, 6, steps=2, seed=3, early=(10,)):
            assert_step_close(pair, **model_tol(model.cfg))


# ----------------------------------------------------------------------------------------------
# CPU: whole steps (static buffers, the plan bound to them) equal the plain path
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 6])
def test_whole_steps_match_plain_decode(n):
    model = tiny_model()
    runner = DecodeGraphRunner(model, capture=False, whole_after=1)
    with torch.inference_mode():
        # 20 steps: leaves cross page boundaries (new pages arrive as data, not as a new layout)
        for pair in decode_both(model, runner, n, steps=20, seed=n, for_graphs=True):
            assert_step_close(pair, **model_tol(model.cfg))
    assert runner.steps == 20 and runner.whole_steps == 20 and runner.whole_built == 1


def test_whole_steps_wait_for_a_repeated_layout():
    model = tiny_model()
    runner = DecodeGraphRunner(model, capture=False)  # whole_after=2
    with torch.inference_mode():
        for pair in decode_both(model, runner, 5, steps=4, seed=2, for_graphs=True):
            assert_step_close(pair, **model_tol(model.cfg))
        assert (runner.steps, runner.whole_steps, runner.whole_built) == (4, 3, 1)
        # plans without a layout key (for_graphs off) always run piecewise
        decode_both(model, runner, 5, steps=3, seed=2)
    assert (runner.steps, runner.whole_steps, runner.whole_built) == (7, 3, 1)


def _chains_with_leaves(leaf_lengths: list[int], prompt: int = 40):
    cache = KVCache(2, 4096, 2, 16, torch.float32, torch.device("cpu"))
    root = cache.new_chain(0)
    cache.append_slots(root, prompt)
    chains = cache.fork(root, 0, list(range(1, len(leaf_lengths) + 1)))
    for c, k in zip(chains, leaf_lengths):
        cache.append_slots(c, k)
    return cache, chains


def _plan(cache, chains, for_graphs=True):
    return DecodePlan(cache, chains, [cache.append_slots(c, 1)[0] for c in chains], 0.25,
                      for_graphs=for_graphs)


def test_canonical_device():
    from alignserve.engine.native.kv_cache import canonical_device

    assert canonical_device("cpu") == torch.device("cpu") == canonical_device(torch.device("cpu"))
    assert KVCache(2, 64, 2, 16, torch.float32, "cpu").device == torch.device("cpu")


def test_decode_plan_layout_key():
    cache, chains = _chains_with_leaves([3, 30, 0])
    first = _plan(cache, chains)  # leaves of 4, 31 and 1 slots
    assert first.width == 256 and first.key is not None
    assert _plan(cache, chains, for_graphs=False).key is None  # 32 slots: two full pages
    # the leaves grew (the second into a third page): the same layout, other data
    pages = len(chains[1][-1].pages)
    second = _plan(cache, chains)
    assert len(chains[1][-1].pages) == pages + 1
    assert second.key == first.key and not torch.equal(second.host, first.host)
    # a row gone, a leaf past the width, a shared segment changed: each a new layout
    assert _plan(cache, chains[1:]).key != first.key
    cache.append_slots(chains[0], 260)
    wide = _plan(cache, chains)
    assert wide.width == 512 and wide.key != first.key
    cache2, chains2 = _chains_with_leaves([3, 30, 0])
    a = _plan(cache2, chains2)
    shared = chains2[0][0]
    shared.changed()  # its slot tensor is built anew: a graph must not read the old address
    b = _plan(cache2, chains2)
    assert a.key[:2] == b.key[:2] and a.key != b.key


# ----------------------------------------------------------------------------------------------
# the engine: the runner on its decode steps, and the fallbacks
# ----------------------------------------------------------------------------------------------

def _engine(cuda_graphs, device="cpu", dtype=torch.float32, model=None):
    from alignserve.engine.native.engine import NativeEngine
    from tests.fakes.fake_engine import FakeTokenizer

    model = model or tiny_model(device=device, dtype=dtype)
    tok = FakeTokenizer([f" w{i}" for i in range(model.cfg.vocab_size)], eos=0)
    engine = NativeEngine(model, tok, "tiny", torch.device(device), kv_cache_gib=0.01,
                          cuda_graphs=cuda_graphs)
    # these tests are about batch layouts: greedy forks would be twins (twins.py), one row
    engine.twin_rows = False
    return engine


def _generate_run(engine, n=5, max_tokens=6, early_layer=2, steer=None):
    """Prefill, fork n, greedy generate with an observer that records what it is given;
    `steer(step, logits)`, when given, may then change the logits in place (a test-only lever:
    the engine samples a group without steering from the tensor its observer is shown; EOS is
    honoured then)."""
    seen = []

    def observer(seqs, logits, inputs):
        seen.append((logits.clone(), inputs.hidden.clone(), inputs.early_logits.clone()))
        if steer is not None:
            steer(len(seen) - 1, logits)
        return logits

    async def go():
        await engine.start()
        try:
            root = await engine.prefill(list(range(3, 40)), early_layer=early_layer)
            seqs = await engine.fork(root, n)
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=steer is None)
            async for _ in engine.generate(seqs, params, observer=observer):
                pass
            out = [s.output_ids for s in seqs]
            await engine.release(seqs + [root])
            return out
        finally:
            await engine.close()

    return asyncio.run(go()), seen


def _compare_runs(a, b, rtol, atol):
    (out_a, seen_a), (out_b, seen_b) = a, b
    assert out_a == out_b
    assert len(seen_a) == len(seen_b)
    for x, y in zip(seen_a, seen_b):
        for u, v in zip(x, y):
            torch.testing.assert_close(v, u, rtol=rtol, atol=atol)


def test_engine_decode_through_the_runner_matches_eager():
    eager = _engine(cuda_graphs=False)
    assert eager.decode_runner is None
    piecewise = _engine(cuda_graphs=True)  # on CPU: the same split and padding, no capture
    assert piecewise.decode_runner is not None and not piecewise.decode_runner.capture
    assert _engine(cuda_graphs=None).decode_runner is None  # auto: off without CUDA
    a, b = _generate_run(eager), _generate_run(piecewise)
    _compare_runs(a, b, **TINY_TOL)
    # 6 tokens: the first sampled from the prefill's logits, then 5 decode steps of 5 rows;
    # one layout throughout: piecewise twice, then whole
    runner = piecewise.decode_runner
    assert runner.steps == 5 and len(b[1]) == 6
    assert runner.whole_steps == 4 and runner.whole_built == 1


def test_engine_falls_back_to_eager(caplog):
    # a batch larger than every bucket runs eagerly
    big = _engine(cuda_graphs=True)
    big.decode_runner.buckets = (1, 2, 4)
    ref = _generate_run(_engine(cuda_graphs=False), n=5, max_tokens=3)
    _compare_runs(ref, _generate_run(big, n=5, max_tokens=3), **TINY_TOL)
    assert big.decode_runner.steps == 0
    # a capture that fails: one warning, then eager for good
    broken = _engine(cuda_graphs=True)
    calls = []

    def fail(size):
        calls.append(size)
        raise RuntimeError("operation not permitted when stream is capturing")

    broken.decode_runner._build = fail
    with caplog.at_level(logging.WARNING, logger="alignserve.engine.native.cuda_graphs"):
        run = _generate_run(broken, n=5, max_tokens=3)
    _compare_runs(ref, run, **TINY_TOL)
    assert calls == [8] and broken.decode_runner.steps == 0
    assert "not permitted" in broken.decode_runner.failed
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1


def test_engine_whole_steps_follow_rows_that_finish():
    """Candidates that stop at different steps change the layout; every step still matches
    the eager engine, and new layouts are set up as they repeat."""

    def end_one(step, logits):
        if 2 <= step <= 4:  # from the third step on, one more candidate ends (EOS is 0)
            logits[0] = -1e9
            logits[0, 0] = 1e9

    eager = _generate_run(_engine(cuda_graphs=False), max_tokens=12, steer=end_one)
    graphs = _engine(cuda_graphs=True)
    steps = _generate_run(graphs, max_tokens=12, steer=end_one)
    assert [len(o) for o in eager[0]] == [len(o) for o in steps[0]]
    assert sorted(len(o) for o in eager[0])[:3] == [3, 4, 5]  # three stopped early
    _compare_runs(eager, steps, **TINY_TOL)
    runner = graphs.decode_runner
    assert runner.whole_built >= 2 and 0 < runner.whole_steps < runner.steps


def test_whole_step_failure_falls_back_to_pieces(caplog):
    ref = _generate_run(_engine(cuda_graphs=False), n=5, max_tokens=6)
    engine = _engine(cuda_graphs=True)
    calls = []

    def fail(plan, tokens, positions):
        calls.append(plan.batch)
        raise RuntimeError("operation not permitted when stream is capturing")

    engine.decode_runner._build_whole = fail
    with caplog.at_level(logging.WARNING, logger="alignserve.engine.native.cuda_graphs"):
        run = _generate_run(engine, n=5, max_tokens=6)
    _compare_runs(ref, run, **TINY_TOL)
    runner = engine.decode_runner
    assert calls == [5] and runner.steps == 5 and runner.whole_steps == 0
    assert "not permitted" in runner.whole_failed and runner.failed is None
    assert len([r for r in caplog.records if "whole-step" in r.getMessage()]) == 1


def test_whole_step_layouts_are_bounded():
    model = tiny_model()
    runner = DecodeGraphRunner(model, capture=False, whole_after=1, max_whole=2, payback=1)
    with torch.inference_mode():
        for seed in range(4):  # four trees: four layouts, the two most recent kept
            decode_both(model, runner, 3, steps=2, seed=seed, for_graphs=True)
    assert runner.whole_built == 4 and len(runner._whole) == 2 and runner.after == 1


def test_whole_step_threshold_follows_how_long_layouts_last():
    model = tiny_model()
    runner = DecodeGraphRunner(model, capture=False, whole_after=1, payback=5, max_after=8)
    built = []
    with torch.inference_mode():
        # short-lived layouts (3 steps each): captures that never pay raise the bar until
        # they stop
        for seed in range(6):
            decode_both(model, runner, 3, steps=3, seed=seed, for_graphs=True)
            built.append((runner.whole_built, runner.after))
        assert built[:4] == [(1, 1), (2, 2), (3, 4), (3, 4)] and runner.whole_built == 3
        # long-lived layouts are still captured, and bring the bar back down
        for seed in range(10, 13):
            for pair in decode_both(model, runner, 3, steps=12, seed=seed, for_graphs=True):
                assert_step_close(pair, **model_tol(model.cfg))
            built.append((runner.whole_built, runner.after))
    assert built[6:] == [(4, 8), (5, 4), (6, 2)]


# ----------------------------------------------------------------------------------------------
# GPU: recorded graphs replay the eager pieces
# ----------------------------------------------------------------------------------------------

def _smollm2_config(layers=30) -> ModelConfig:
    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=layers,
                       num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                       max_position_embeddings=8192, tie_word_embeddings=True)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_match_eager_pieces_and_plain_path(dtype):
    model = tiny_model(_smollm2_config(layers=6), device="cuda", dtype=dtype, std=0.05)
    graphs = DecodeGraphRunner(model, capture=True)
    pieces = DecodeGraphRunner(model, capture=False)
    fp32 = dtype == torch.float32
    same = {"rtol": 1e-4, "atol": 1e-4} if fp32 else {"rtol": 1e-2, "atol": 1e-2}
    tol = {"rtol": 1e-4, "atol": 1e-4} if fp32 else {"rtol": 5e-2, "atol": 5e-2}
    with torch.inference_mode():
        for n in (1, 3, 16, 33):
            steps_g = decode_both(model, graphs, n, steps=3, seed=n, kv_tol=tol)
            steps_p = decode_both(model, pieces, n, steps=3, seed=n, kv_tol=tol)
            for (plain, g), (_, p) in zip(steps_g, steps_p):
                assert_step_close((p, g), **same)  # replayed graphs = the same pieces run eagerly
                assert_step_close((plain, g), **tol)  # = the model's plain path
    assert graphs.captured == [1, 4, 16, 40] and graphs.failed is None
    assert pieces.captured == []


@cuda
def test_cuda_graphs_padded_rows_and_reuse_across_buckets():
    model = tiny_model(_smollm2_config(layers=4), device="cuda", dtype=torch.float32)
    runner = DecodeGraphRunner(model, capture=True, buckets=(4, 8, 16))
    with torch.inference_mode():
        for n in (7, 3, 16, 5, 8, 2):  # buckets replayed out of capture order, stale padding
            for pair in decode_both(model, runner, n, steps=2, seed=10 + n, poison=n == 5):
                assert_step_close(pair, rtol=1e-4, atol=1e-4)
    assert runner.captured == [4, 8, 16]
    with torch.inference_mode():
        assert not runner.prepare(17)  # beyond the biggest bucket: the caller runs eagerly


@cuda
def test_cuda_engine_uses_graphs_by_default():
    model = tiny_model(device="cuda", dtype=torch.float32)
    eager = _engine(cuda_graphs=False, device="cuda", model=model)
    auto = _engine(cuda_graphs=None, device="cuda", model=model)
    assert auto.decode_runner is not None and auto.decode_runner.capture
    _compare_runs(_generate_run(eager), _generate_run(auto), rtol=1e-4, atol=1e-4)
    assert auto.decode_runner.steps == 5 and auto.decode_runner.captured == [8]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_whole_steps_match_pieces_and_plain_path(dtype):
    model = tiny_model(_smollm2_config(layers=6), device="cuda", dtype=dtype, std=0.05)
    whole = DecodeGraphRunner(model, capture=True, whole_after=1)
    pieces = DecodeGraphRunner(model, capture=False, whole=False)
    fp32 = dtype == torch.float32
    same = {"rtol": 1e-4, "atol": 1e-4} if fp32 else {"rtol": 1e-2, "atol": 1e-2}
    tol = {"rtol": 1e-4, "atol": 1e-4} if fp32 else {"rtol": 5e-2, "atol": 5e-2}
    with torch.inference_mode():
        for n in (1, 5, 33):
            steps_w = decode_both(model, whole, n, steps=20, seed=n, kv_tol=tol, for_graphs=True)
            steps_p = decode_both(model, pieces, n, steps=20, seed=n, kv_tol=tol, for_graphs=True)
            for (plain, w), (_, p) in zip(steps_w, steps_p):
                assert_step_close((p, w), **same)  # the replayed whole step = the pieces
                assert_step_close((plain, w), **tol)  # = the model's plain path
    assert whole.whole_failed is None and whole.failed is None
    assert whole.whole_built == 3 and whole.whole_steps == 60
    assert all(e.graph is not None for e in whole._whole.values())


@cuda
def test_cuda_engine_runs_repeated_layouts_whole():
    model = tiny_model(device="cuda", dtype=torch.float32)
    eager = _engine(cuda_graphs=False, device="cuda", model=model)
    auto = _engine(cuda_graphs=None, device="cuda", model=model)
    _compare_runs(_generate_run(eager, max_tokens=12), _generate_run(auto, max_tokens=12),
                  rtol=1e-4, atol=1e-4)
    runner = auto.decode_runner
    assert runner.whole_failed is None and runner.whole_steps == 10 and runner.whole_built == 1


@cuda
def test_cuda_slot_tensors_are_built_once_whatever_the_device_spelling():
    # "cuda" and "cuda:0" name one device: a rebuilt tensor would cost a copy per layer and
    # give whole-step graphs a new address (a new layout) on every step
    seg = Segment()
    seg.slots = list(range(40))
    t = seg.slot_tensor(torch.device("cuda"))
    assert seg.slot_tensor(torch.device("cuda", torch.cuda.current_device())) is t
    assert seg.slot_tensor(t.device) is t
    cache = KVCache(2, 64, 2, 16, torch.float32, torch.device("cuda"))
    assert cache.device == t.device


# ----------------------------------------------------------------------------------------------
# twin rows (twins.py) through the runner: computed once, KV copied, read back exactly
# ----------------------------------------------------------------------------------------------

def _twins_run(device: str):
    from tests.test_engine_twins import branch_logprobs

    engine = _engine(cuda_graphs=True, device=device)
    engine.twin_rows = True
    prompt = list(range(3, 40))

    async def go():
        await engine.start()
        try:
            tally = TokenTally()
            root = await engine.prefill(prompt, tally)
            seqs = await engine.fork(root, 8)
            await engine.release([root])
            # cool enough that the first tokens coincide, warm enough that branches part
            params = SamplingParams(temperature=0.5, max_tokens=10, ignore_eos=True, seed=5,
                                    logprobs=0)
            async for _ in engine.generate(seqs, params, tally=tally):
                pass
            branches, fresh = await branch_logprobs(engine, seqs, prompt)
            return branches, fresh, tally, engine.decode_runner.steps
        finally:
            await engine.close()

    return asyncio.run(go())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_cuda_engine_twins_read_exact_kv(device):
    """Twins share their first tokens, are computed once through the runner (captured on
    CUDA), get copies of the representative's KV, and after they part every token's log-prob
    matches a fresh pass over the branch."""
    branches, fresh, tally, steps = _twins_run(device)
    outputs = [o for o, _ in branches]
    assert tally.decode == sum(len({tuple(o[:t]) for o in outputs}) for t in range(1, 10))
    assert tally.decode < 8 * 9 and steps == 9
    assert any(a[0] == b[0] and a != b for a in outputs for b in outputs)
    for (_, sampled), again in zip(branches, fresh):
        torch.testing.assert_close(torch.tensor(sampled), torch.tensor(again), **TINY_TOL)
