"""CUDA graphs for the native engine's decode step: piecewise, and whole once a layout repeats.

A decode step of a small model is bound by kernel launches: SmolLM2-135M issues a few hundred
small kernels per step whatever the batch. The dense parts of the step are graph-friendly (fixed
shapes for a fixed batch), but attention follows the step's tree of shared KV segments
(`DecodePlan`: one product per shared segment, one per leaf table, merges), which can change
from step to step. So there are two ways to run a step:

**Piecewise** (any step that fits a bucket), as vLLM does: the step is cut at attention into

    piece 0      embed, rope (cos, sin), layer 0 up to attention (norm, qkv, rope)
    piece i      layer i-1 after attention (o_proj, residual, norm, MLP, residual),
                 layer i up to attention                                    (0 < i < L)
    piece L      layer L-1 after attention, final norm, lm_head

Each piece is recorded once per padded batch size ("bucket") as a `torch.cuda.CUDAGraph`. A step
copies its tokens and positions into the bucket's static inputs, replays piece 0, runs layer 0's
attention eagerly on the real rows (it also writes their KV), copies the result into the static
attention buffer, replays piece 1, and so on. Padded rows carry stale tokens and stale attention
outputs; every op in a piece works row by row (norms, linears, rope, embedding), so they never
reach a real row, and attention only ever sees the real rows.

**Whole** (steps whose layout repeats): best-of-N candidates, beams and rollouts decode many
steps in a row with the same tree: the same rows in the same shared segments, only their leaf
lengths and pages change, which `DecodePlan` sends as data in one packed tensor. Such a layout
(`DecodePlan.key`, built with `for_graphs=True`) seen enough steps in a row is recorded as one
graph, attention included, over exactly its rows; a step replays it after one copy of the packed
table into the graph's static copy (the plan's `bind` ops are inside the graph). The eager
attention between the pieces costs ~7 launches per layer from Python, far more than the GPU work
of a small model; the whole graph is one launch. The `max_whole` most recently used layouts are
kept. A capture costs about a few eager steps, so it pays only for layouts that last: "enough"
starts at `whole_after` repeats and adapts, doubling (up to `max_after`) after a layout that was
replayed fewer than `payback` times before the next capture, halving back after one that was
(a busy server whose batch changes every few steps stops capturing; best-of-N's candidates,
which keep one layout for their whole answer, capture at once).

Graphs are captured lazily on first use and all share one memory pool; a failed capture turns
that kind of graph off with one warning (piecewise: the caller runs the plain eager path; whole:
the step runs piecewise). Batches larger than the biggest bucket run eagerly.

With `capture=False` the runner takes exactly the same paths (the split, the padding, the static
buffers and the plan bound to them), calling the functions instead of replaying them: that is
how CPU tests prove both equal the model's plain path, and the engine can run them on CPU for
testing. The layer math itself lives only in `model.py` (`DecoderLayer.pre_attention` /
`post_attention`, `CausalLM.rope` / `head`).

Early-layer hidden states (contrastive `self:L` amateurs) come for free: piece e's residual
output is the hidden state after e layers. Returned tensors are copies, never views of the
static buffers, which the next replay overwrites.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from alignserve.engine.native.attention import DecodePlan
from alignserve.engine.native.model import AttentionPlan, CausalLM

log = logging.getLogger(__name__)

# Padded batch sizes: fine steps for small batches, multiples of 8 up to 256.
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, *range(8, 257, 8))


@dataclass(eq=False)
class _Bucket:
    """Static inputs and per-piece outputs for one padded batch size."""

    size: int
    tokens: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    attn: torch.Tensor  # [B, H, D] in the model's dtype: the current layer's attention output
    # outs[0] = (x, cos, sin, q, k, v); outs[i] = (x, q, k, v) for 0 < i < L; outs[L] = (normed, logits)
    outs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)


@dataclass(eq=False)
class _WholeStep:
    """One layout's whole step: static inputs and outputs sized to its rows, and its graph."""

    io: _Bucket  # tokens, positions, attention buffer, outputs (`graphs` unused)
    packed: torch.Tensor  # the static device copy of the plan's packed table
    keep: list[torch.Tensor]  # the segment slot tensors the graph reads by address
    graph: torch.cuda.CUDAGraph | None = None
    hits: int = 0  # steps run from it


class DecodeGraphRunner:
    """Runs decode steps piecewise per padded bucket, or whole per repeated layout (from CUDA
    graphs when `capture`)."""

    def __init__(self, model: CausalLM, *, capture: bool = True,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, warmup_runs: int = 2,
                 whole: bool = True, whole_after: int = 2, max_whole: int = 8,
                 payback: int = 8, max_after: int = 64):
        params = next(model.parameters())
        self.model = model
        self.device, self.dtype = params.device, params.dtype
        if capture and self.device.type != "cuda":
            raise ValueError("CUDA graph capture needs the model on a CUDA device")
        self.capture = capture
        self.buckets = tuple(sorted(set(buckets)))
        self.warmup_runs = warmup_runs
        self.num_layers = model.cfg.num_layers
        self._buckets: dict[int, _Bucket] = {}
        self._pool = None
        self.failed: str | None = None  # why capture was given up, once it was
        self.steps = 0  # steps run by the runner (piecewise or whole)
        # whole steps: on/off, after how many repeats of a layout (at least, at most, now),
        # how many layouts kept, how many replays make a capture worth it
        self.whole, self.whole_after, self.max_whole = whole, whole_after, max_whole
        self.max_after, self.payback = max(max_after, whole_after), payback
        self.after = whole_after
        self._whole: OrderedDict[tuple, _WholeStep] = OrderedDict()
        self._newest: _WholeStep | None = None
        self._last_key: tuple | None = None
        self._repeats = 0
        self.whole_failed: str | None = None
        self.whole_steps = 0  # steps run whole
        self.whole_built = 0  # layouts recorded (or, without capture, set up)

    # sizes --------------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, n: int) -> int | None:
        """The smallest bucket that holds n rows, or None when n is larger than all of them."""
        for b in self.buckets:
            if b >= n:
                return b
        return None

    @property
    def captured(self) -> list[int]:
        return sorted(b for b, bk in self._buckets.items() if bk.graphs)

    def prepare(self, n: int) -> bool:
        """Make the bucket for an n-row step ready (capturing it on first use). False when the
        step must run the plain eager path: n too large, or capture failed (now or before)."""
        if self.failed is not None or n < 1:
            return False
        b = self.bucket_for(n)
        if b is None:
            return False
        if b not in self._buckets:
            try:
                self._buckets[b] = self._build(b)
            except Exception as exc:  # noqa: BLE001  (any capture error: go on without graphs)
                self._give_up(exc)
                return False
        return True

    def warmup(self, sizes: tuple[int, ...] | None = None) -> list[int]:
        """Capture buckets ahead of time (e.g. at start-up for the common small batches)."""
        for n in sizes or self.buckets:
            if not self.prepare(n):
                break
        return self.captured

    # the step -----------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan,
            capture: dict[int, torch.Tensor | None] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step over n rows: (normalized final hidden [n, hidden], float32 logits
        [n, V]), both fresh tensors. Layers named in `capture` (layer count -> None, as in
        `CausalLM.hidden_states`) get the hidden state after that many layers. Call `prepare(n)`
        first. A plan with a `key` may run whole; otherwise `plan.attend` runs eagerly between
        the pieces on the n real rows."""
        n = tokens.shape[0]
        if not self.prepare(n):
            raise RuntimeError(f"no decode bucket for a batch of {n}: run the eager path")
        whole = self._whole_for(plan, tokens, positions)
        if whole is not None:
            io = self._run_whole(whole, tokens, positions, plan)
            self.whole_steps += 1
        else:
            io = self._run_pieces(tokens, positions, plan)
        last = self.num_layers
        if capture is not None:
            for i in capture:
                if 0 < i < last:
                    capture[i] = io.outs[i][0][:n].clone()
        normed, logits = io.outs[last]
        self.steps += 1
        return normed[:n].clone(), logits[:n].clone()

    def _run_pieces(self, tokens: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan) -> _Bucket:
        n = tokens.shape[0]
        bk = self._buckets[self.bucket_for(n)]
        bk.tokens[:n].copy_(tokens)
        bk.positions[:n].copy_(positions)
        last = self.num_layers
        for i in range(last + 1):
            if bk.graphs:
                bk.graphs[i].replay()
            else:
                bk.outs[i] = self._piece(i, bk)
            if i < last:
                q, k, v = bk.outs[i][-3:]
                bk.attn[:n].copy_(plan.attend(i, q[:n], k[:n], v[:n]))
        return bk

    # whole steps --------------------------------------------------------------------------
    def _whole_for(self, plan: AttentionPlan, tokens: torch.Tensor, positions: torch.Tensor
                   ) -> _WholeStep | None:
        """The whole step for this plan's layout, recording it once the layout has repeated
        `self.after` times in a row (adapted after each capture); None: run this step
        piecewise."""
        key = getattr(plan, "key", None)
        if not self.whole or self.whole_failed is not None or key is None:
            return None
        entry = self._whole.get(key)
        if entry is not None:
            self._whole.move_to_end(key)
            entry.hits += 1
            return entry
        self._repeats = self._repeats + 1 if key == self._last_key else 1
        self._last_key = key
        if self._repeats < self.after:
            return None
        try:
            entry = self._build_whole(plan, tokens, positions)
        except Exception as exc:  # noqa: BLE001  (any capture error: go on piecewise)
            self.whole_failed = f"{type(exc).__name__}: {exc}"
            self._whole.clear()
            self._newest = None
            log.warning("whole-step CUDA graph capture failed, decode runs piecewise from now on: %s",
                        self.whole_failed)
            return None
        self._whole[key] = entry
        while len(self._whole) > self.max_whole:
            self._whole.popitem(last=False)
        if self._newest is not None:  # did the last capture pay?
            paid = self._newest.hits >= self.payback
            self.after = (max(self.whole_after, self.after // 2) if paid
                          else min(self.max_after, 2 * self.after))
        self._newest = entry
        entry.hits = 1
        return entry

    @staticmethod
    def _fill(entry: _WholeStep, tokens: torch.Tensor, positions: torch.Tensor,
              plan: DecodePlan) -> None:
        """This step's inputs into the whole step's static buffers."""
        entry.io.tokens.copy_(tokens)
        entry.io.positions.copy_(positions)
        entry.packed.copy_(plan.host)

    def _run_whole(self, entry: _WholeStep, tokens: torch.Tensor, positions: torch.Tensor,
                   plan: DecodePlan) -> _Bucket:
        self._fill(entry, tokens, positions, plan)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            self._whole_body(entry, plan)
        return entry.io

    def _whole_body(self, entry: _WholeStep, plan: DecodePlan) -> None:
        """The whole step on the static buffers: what a whole graph records."""
        io, last = entry.io, self.num_layers
        plan.bind(entry.packed)
        for i in range(last + 1):
            io.outs[i] = self._piece(i, io)
            if i < last:
                q, k, v = io.outs[i][-3:]
                io.attn.copy_(plan.attend(i, q, k, v))

    def _build_whole(self, plan: DecodePlan, tokens: torch.Tensor, positions: torch.Tensor
                     ) -> _WholeStep:
        entry = _WholeStep(io=self._new_bucket(plan.batch),
                           packed=torch.zeros(plan.host.shape, dtype=plan.host.dtype, device=self.device),
                           keep=list(plan.segment_tensors))
        self.whole_built += 1
        if not self.capture:
            return entry
        start = time.perf_counter()
        # The warm-up runs this very step on the static inputs (its KV writes are the step's
        # own; the replay that follows rewrites the same values).
        self._fill(entry, tokens, positions, plan)
        self._on_side_stream(lambda: self._whole_body(entry, plan))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._graph_pool(), capture_error_mode="thread_local"):
            self._whole_body(entry, plan)
        torch.cuda.synchronize(self.device)
        entry.graph = g
        log.debug("captured a whole decode step: %d rows, %d shared segments, leaf width %d, "
                  "in %.0f ms", plan.batch, len(entry.keep), plan.width,
                  1000 * (time.perf_counter() - start))
        return entry

    # pieces -------------------------------------------------------------------------------
    def _piece(self, i: int, bk: _Bucket) -> tuple[torch.Tensor, ...]:
        """The dense computation between attention i-1 and attention i, on the whole bucket.
        Reads the bucket's static inputs and the outputs of earlier pieces, never anything else:
        this is the code a graph records."""
        m, layers, last = self.model, self.model.layers, self.num_layers
        if i == 0:
            x = m.embed(bk.tokens)
            cos, sin = m.rope(bk.positions)
            return (x, cos, sin, *layers[0].pre_attention(x, cos, sin))
        x = layers[i - 1].post_attention(bk.outs[i - 1][0], bk.attn)
        if i == last:
            return m.head(x)
        _, cos, sin = bk.outs[0][:3]
        return (x, *layers[i].pre_attention(x, cos, sin))

    def _new_bucket(self, b: int) -> _Bucket:
        cfg = self.model.cfg
        z = torch.zeros
        return _Bucket(
            size=b,
            tokens=z(b, dtype=torch.int64, device=self.device),
            positions=z(b, dtype=torch.int64, device=self.device),
            attn=z(b, cfg.num_heads, cfg.head_dim, dtype=self.dtype, device=self.device),
            outs=[()] * (self.num_layers + 1),
        )

    def _graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _on_side_stream(self, fn) -> None:
        """Run fn on a side stream and wait for it, as the graph docs ask of warm-ups: lazy
        initialisation (cuBLAS handles and workspaces, Triton's first launches) must not
        happen inside a capture."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)

    def _build(self, b: int) -> _Bucket:
        bk = self._new_bucket(b)
        if not self.capture:
            return bk
        start = time.perf_counter()

        def warm() -> None:
            for _ in range(self.warmup_runs):
                for i in range(self.num_layers + 1):
                    bk.outs[i] = self._piece(i, bk)

        self._on_side_stream(warm)
        graphs = []
        # Every piece's outputs stay referenced from bk.outs, so no later capture in the shared
        # pool reuses their memory; only a piece's temporaries are shared, which is safe because
        # graphs replay one after another on one stream and every output is read in the step
        # that wrote it. "thread_local": the event loop's thread may touch CUDA (copying logits
        # to the host) while this worker thread captures.
        for i in range(self.num_layers + 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._graph_pool(), capture_error_mode="thread_local"):
                bk.outs[i] = self._piece(i, bk)
            graphs.append(g)
        torch.cuda.synchronize(self.device)
        bk.graphs = graphs
        log.info("captured decode CUDA graphs for batch bucket %d (%d pieces) in %.0f ms",
                 b, len(graphs), 1000 * (time.perf_counter() - start))
        return bk

    def _give_up(self, exc: BaseException) -> None:
        self.failed = f"{type(exc).__name__}: {exc}"
        self._buckets.clear()
        self._whole.clear()
        self._newest = None
        log.warning("CUDA graph capture failed, decode runs eagerly from now on: %s", self.failed)
