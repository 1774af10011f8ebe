"""The native engine: continuous batching over a shared-prefix KV cache.

One asyncio task owns the schedule. Each iteration it takes the work queued since the last
one (prompt chunks to prefill, tokens to extend, sequences being generated), runs it as one or
two forward passes in a worker thread, and hands results back to the waiting coroutines.
Requests arriving mid-flight join at the next step; finished or cancelled sequences leave at
once. Bookkeeping that touches the KV chains (fork, release, truncate) waits for the step in
flight through one asyncio lock, so the worker never sees chains change under it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignserve.engine import compute_thread
from alignserve.engine.native import cpu_linear
from alignserve.engine.native.amateurs import open_contexts
from alignserve.engine.native.attention import DecodePlan, ExtendPlan
from alignserve.engine.native.cpu_linear import use_bf16_for_few_rows
from alignserve.engine.native.cuda_graphs import DecodeGraphRunner
from alignserve.engine.native.host_memory import keep_freed_memory
from alignserve.engine.native.kv_cache import KVCache, OutOfKVMemory, Segment
from alignserve.engine.native.loader import load_model
from alignserve.engine.native.model import CausalLM
from alignserve.engine.native.prompt_cache import PromptCache
from alignserve.engine.native.sampler import prompt_logprob_entries, sample_rows
from alignserve.engine.native.sequence import GenGroup, SeqState
from alignserve.engine.native.twins import twin_of
from alignserve.engine.protocol import (
    CapacityError,
    EngineError,
    EngineStats,
    Observer,
    SamplingParams,
    SeqHandle,
    TokenEvent,
    TokenTally,
    check_prefill,
)
from alignserve.engine.steering import AmateurPrompt, ServedAmateur, Steering
from alignserve.engine.text import DeferredText, IncrementalText, TextCodec
from alignserve.kernels import dispatch
from alignserve.kernels.cpu_build import enabled

log = logging.getLogger(__name__)


@dataclass
class _Feed:
    """Tokens to feed into sequences; resolves `future` once their new logits are pending."""

    states: list[SeqState]
    tokens: list[list[int]]
    future: asyncio.Future
    tally: TokenTally | None
    kind: str
    done: list[int] = field(default_factory=list)  # tokens fed so far, per sequence
    prompt_logprobs: int | None = None  # k: record each fed token's log-prob (top k too)

    def __post_init__(self) -> None:
        self.done = [0] * len(self.states)


@dataclass
class _StepResult:
    events: list[tuple[GenGroup, list[TokenEvent]]] = field(default_factory=list)
    finished_feeds: list[_Feed] = field(default_factory=list)
    failed: list[tuple[asyncio.Future | GenGroup, Exception]] = field(default_factory=list)
    amateur_feeds: list[tuple[GenGroup, SeqState, int]] = field(default_factory=list)


class NativeEngine(TextCodec):
    kind = "native"  # what GET /v1/alignment reports as the serving engine

    def __init__(self, model: CausalLM, tokenizer, name: str, device: torch.device,
                 kv_cache_gib: float | None = None, max_model_len: int | None = None,
                 prefill_chunk: int | None = None, cuda_graphs: bool | None = None,
                 prompt_cache: bool = False):
        """`cuda_graphs`: run decode steps through piecewise CUDA graphs (`cuda_graphs.py`).
        None means on for CUDA, off elsewhere; True on a CPU runs the same split and padded
        path without capture (for tests). `prompt_cache`: keep prompts' KV after their
        requests (up to a quarter of the pool), so a repeated prompt skips its prefill
        (`prompt_cache.py`)."""
        cfg = model.cfg
        self.model, self.tokenizer, self.model_name = model, tokenizer, name
        self.device = device
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = frozenset(eos)
        dtype = next(model.parameters()).dtype
        if device.type == "cpu" and cpu_linear.bf16_rows(model) == cpu_linear.ALL_ROWS:
            # bf16 units run every linear in bf16: the KV pool follows (half the bytes a decode
            # step reads; `set_exact` converts it back for exact fp32)
            dtype = torch.bfloat16
        self._kv_dtype = dtype
        per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        gib = kv_cache_gib if kv_cache_gib is not None else (2.0 if device.type == "cpu" else 16.0)
        self.kv = KVCache(cfg.num_layers, int(gib * 2**30) // per_token, cfg.num_kv_heads, cfg.head_dim,
                          dtype, device)
        self.scale = cfg.head_dim ** -0.5
        # A CPU pass of 2048 tokens takes about a second; one chunk per prompt up to that
        # length skips the chunks' merges and lets its attention run without log-sum-exp.
        self.prefill_chunk = prefill_chunk or (2048 if device.type == "cpu" else 8192)
        self._ids = itertools.count(1)
        self._states: dict[int, SeqState] = {}
        self._chains: dict[int, list[Segment]] = {}
        self._prefills: deque[tuple[_Feed, bool]] = deque()  # (feed, admitted)
        self._feeds: list[_Feed] = []
        self._generating: dict[int, SeqState] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._crashed: BaseException | None = None
        self._stats = EngineStats(kv_total_slots=self.kv.num_slots)
        # twins.py: a request's identical rows computed once (off: every row, as benches compare)
        self.twin_rows = enabled("ALIGNSERVE_TWIN_ROWS")
        self.prompt_cache = (PromptCache(self.kv, self._chains, self.kv.num_slots // 4)
                             if prompt_cache else None)
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        self.decode_runner = (DecodeGraphRunner(model, capture=device.type == "cuda")
                              if cuda_graphs else None)

    # construction -----------------------------------------------------------------------
    @classmethod
    @compute_thread.pinned
    def load(cls, model: str | None = None, device: str = "cpu", kv_cache_gib: float | None = None,
             max_model_len: int | None = None, random_weights: bool = False,
             cuda_graphs: bool | None = None, cpu_bf16_decode: bool | None = None,
             prompt_cache: bool = False) -> NativeEngine:
        """`cpu_bf16_decode` (None: on for a CPU): few-row steps use bf16 weight copies
        (`cpu_linear.py`). `prompt_cache`: see `__init__`. Runs on the compute thread: loading
        and packing weights and zeroing the KV cache run parallel regions too, and their
        OpenMP team must be the one the steps use."""
        dev = torch.device(device)
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        if dev.type == "cpu":
            keep_freed_memory()
        m, tok, name = load_model(model, dev, dtype, random_weights=random_weights)
        if dev.type == "cpu" and cpu_bf16_decode is not False:
            use_bf16_for_few_rows(m)
        if dev.type == "cpu":
            dispatch.prepare_cpu_kernels()  # compiled now, not on the first request
        return cls(m, tok, name, dev, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len,
                   cuda_graphs=cuda_graphs, prompt_cache=prompt_cache)

    @compute_thread.pinned
    def set_exact(self, exact: bool) -> None:
        """Exact fp32 linears and KV pool (True) or this CPU's default (False), at run time:
        what holds the engine to transformers' numbers in the tests. The pool is converted in
        place (values kept; back to bf16 they round), on the compute thread, between steps."""
        cpu_linear.set_few_rows(self.model, 0 if exact else None)
        self.kv.convert(next(self.model.parameters()).dtype if exact else self._kv_dtype)

    async def start(self) -> None:
        if self._task is None:
            self.loop = asyncio.get_running_loop()  # tests and processors submit work to it
            self._task = asyncio.create_task(self._run(), name="alignserve-engine-loop")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # the loop died of a bug: closing goes on, but say so
                log.exception("the engine loop had failed")
            self._task = None
        # The compute thread is the process's, not this engine's: it stays; a step in flight
        # finishes before close returns (what the thread runs next waits behind it).
        await compute_thread.run(lambda: None)

    def healthy(self) -> bool:
        return self._task is not None and not self._task.done() and self._crashed is None

    def stats(self) -> EngineStats:
        s = self._stats
        s.running_sequences = len(self._generating)
        s.waiting_requests = len(self._prefills)
        s.kv_used_slots = self.kv.used_slots
        return s

    # the protocol -----------------------------------------------------------------------
    def _new_state(self, prompt_ids: Sequence[int]) -> SeqState:
        sid = next(self._ids)
        chain = self.kv.new_chain(sid)
        handle = SeqHandle(key=sid, prompt_len=len(prompt_ids), token_ids=list(prompt_ids))
        st = SeqState(id=sid, handle=handle, chain=chain)
        self._states[sid], self._chains[sid] = st, chain
        return st

    def _state(self, seq: SeqHandle) -> SeqState:
        st = self._states.get(seq.key)
        if st is None or st.released:
            raise EngineError(f"sequence {seq.key} was released")
        return st

    async def prefill(self, prompt_ids: Sequence[int], tally: TokenTally | None = None,
                      early_layer: int | None = None,
                      prompt_logprobs: int | None = None) -> SeqHandle:
        check_prefill(prompt_ids, early_layer, self.max_model_len, self.cfg.num_layers)
        if len(prompt_ids) + 16 > self.kv.num_slots:
            raise CapacityError("prompt larger than the KV cache")
        if self.prompt_cache is not None and early_layer is None and prompt_logprobs is None:
            async with self._lock:
                handle = self._cached_prefill(prompt_ids)
            if handle is not None:
                return handle
        st = self._new_state([])
        st.handle.prompt_len = len(prompt_ids)
        st.early_layer = early_layer
        feed = _Feed([st], [list(prompt_ids)], asyncio.get_running_loop().create_future(), tally,
                     "prefill", prompt_logprobs=prompt_logprobs)
        st.busy = True
        self._prefills.append((feed, False))
        self._wake.set()
        try:
            await feed.future
        except BaseException:
            await self.release([st.handle])
            raise
        return st.handle

    def _prompt_key(self, prompt_ids: Sequence[int]) -> tuple:
        # KV computed with bf16 linears is not the exact fp32 mode's (tests switch modes)
        return (cpu_linear.bf16_rows(self.model), tuple(prompt_ids))

    def _cached_prefill(self, prompt_ids: Sequence[int]) -> SeqHandle | None:
        """A new sequence on a kept prompt's KV, or None when the prompt is not kept. No model
        tokens are counted: none are computed (vLLM's prefix-cache hits count none either)."""
        entry = self.prompt_cache.lookup(self._prompt_key(prompt_ids))
        if entry is None:
            return None
        sid = next(self._ids)
        chain = self.kv.fork(entry.chain, entry.owner, [sid])[0]
        handle = SeqHandle(key=sid, prompt_len=len(prompt_ids), token_ids=list(prompt_ids))
        st = SeqState(id=sid, handle=handle, chain=chain, logits=entry.logits, hidden=entry.hidden)
        self._states[sid], self._chains[sid] = st, chain
        return handle

    async def fork(self, seq: SeqHandle, n: int) -> list[SeqHandle]:
        async with self._lock:
            parent = self._state(seq)
            children = []
            ids = [next(self._ids) for _ in range(n)]
            chains = self.kv.fork(parent.chain, parent.id, ids)
            grammars = parent.grammar.fork(n) if parent.grammar is not None else [None] * n
            for cid, chain, grammar in zip(ids, chains, grammars):
                h = seq.branch(cid)
                st = SeqState(id=cid, handle=h, chain=chain, logits=parent.logits, hidden=parent.hidden,
                              early_layer=parent.early_layer, early_logits=parent.early_logits,
                              grammar=grammar)
                self._states[cid], self._chains[cid] = st, chain
                children.append(h)
            return children

    async def extend(self, seqs: list[SeqHandle], tokens: list[list[int]], tally: TokenTally | None = None,
                     kind: str = "decode", prompt_logprobs: int | None = None) -> None:
        if len(seqs) != len(tokens):
            raise EngineError("one token list per sequence")
        states = [self._state(s) for s in seqs]
        for st, toks in zip(states, tokens):
            if st.length + len(toks) > self.max_model_len:
                raise CapacityError("extension beyond the model's context")
        for st in states:
            st.busy = True
        feed = _Feed(states, [list(t) for t in tokens], asyncio.get_running_loop().create_future(), tally, kind,
                     prompt_logprobs=prompt_logprobs)
        self._feeds.append(feed)
        self._wake.set()
        await feed.future

    async def logits(self, seqs: list[SeqHandle]) -> torch.Tensor:
        rows = []
        for s in seqs:
            st = self._state(s)
            if st.logits is None:
                raise EngineError("no pending logits: extend or prefill first")
            rows.append(st.logits)
        return torch.stack(rows).float().cpu()

    async def truncate(self, seq: SeqHandle, length: int) -> None:
        async with self._lock:
            st = self._state(seq)
            # From the KV's length, not the token list's: after `generate` the last sampled
            # token of a finished sequence is in token_ids but was never fed (has no KV).
            fed = self.kv.chain_length(st.chain)
            leaf_start = fed - len(st.chain[-1])
            if length < leaf_start:
                raise EngineError("truncate reaches into KV shared with other sequences")
            if length < st.length:
                if length > fed:
                    raise EngineError("truncate would keep a token that was never fed")
                st.handle.finished, st.handle.finish_reason = False, None
                self.kv.truncate_leaf(st.chain, length - leaf_start)
                del st.handle.token_ids[length:]
                if st.grammar is not None:
                    st.grammar.truncate(max(length - st.handle.prompt_len, 0))
                st.handle.logprobs = st.handle.logprobs[: max(0, length - st.handle.prompt_len)]
                st.logits = st.hidden = st.early_logits = None

    async def release(self, seqs: list[SeqHandle]) -> None:
        async with self._lock:
            for s in seqs:
                st = self._states.get(s.key)
                if st is None or st.released:
                    continue
                st.released = True
                self._generating.pop(st.id, None)
                self.kv.release(st.chain, st.id, self._chains)
                del self._states[st.id]
                del self._chains[st.id]

    async def generate(self, seqs: list[SeqHandle], params: SamplingParams,
                       steering: Steering | None = None, tally: TokenTally | None = None,
                       kind: str = "decode", observer: Observer | None = None,
                       ) -> AsyncIterator[list[TokenEvent]]:
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        group = GenGroup(params, steering or None, observer, asyncio.Queue(), tally, kind, stop_ids)
        base = params.seed if params.seed is not None else random.getrandbits(62)
        from alignserve.kernels.sampling import row_seed

        states = [self._state(s) for s in seqs]
        for i, st in enumerate(states):
            if st.logits is None:
                raise EngineError("no pending logits to sample from")
            st.group, st.rng_seed = group, row_seed(base, i)
            initial = self.decode(st.handle.output_ids) if st.handle.num_output else ""
            if params.per_token_text:
                st.text = IncrementalText(self.tokenizer, st.handle.token_ids, params.stop, initial,
                                          include_stop=params.include_stop_str_in_output)
            else:
                st.text = DeferredText(self.tokenizer, st.handle.output_ids, initial)
            group.live += 1
        try:
            contexts = await self._open_amateurs(states, group)
        except BaseException:
            for st in states:
                st.group = None
            raise
        for st in states:
            self._generating[st.id] = st
        self._wake.set()
        try:
            while group.live > 0:
                item = await group.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            for st in states:
                if self._generating.pop(st.id, None) is not None:
                    st.handle.finished, st.handle.finish_reason = True, "abort"
                    if isinstance(st.text, DeferredText):  # a finished handle's text is whole
                        st.text.delta(final=True)
                        st.handle.text = st.text.text
                st.group = None
                st.follower = None
                st.amateur, st.amateur_pending = None, False
            await self._close_amateurs(group, contexts)

    # contrastive amateurs (steering) --------------------------------------------------------
    async def _open_amateurs(self, states: list[SeqState], group: GenGroup) -> list[SeqHandle]:
        """The contexts the group's amateur reads (see amateurs.py), attached to the states."""
        steer = group.steering.contrastive if group.steering is not None else None
        amateur = steer.amateur if steer is not None else None
        handles = [st.handle for st in states]
        if isinstance(amateur, AmateurPrompt):
            prompt = list(amateur.prompt_ids)
            contexts = await open_contexts(self, handles, lambda h: prompt + h.output_ids,
                                           group.tally)
            for st, h in zip(states, contexts):
                st.follower = self._state(h)  # fed what st samples, charged to the group
            return contexts
        if isinstance(amateur, ServedAmateur):
            engine = amateur.model
            if engine is None or not hasattr(engine, "extend"):
                raise EngineError(f"amateur {amateur.name!r} is not an engine this one can drive")
            if engine.vocab_size != self.vocab_size:
                raise EngineError(f"amateur {amateur.name!r} has another vocabulary")
            group.amateur = engine
            contexts = await open_contexts(engine, handles, lambda h: list(h.token_ids),
                                           group.tally)
            for st, h in zip(states, contexts):
                st.amateur, st.amateur_pending = h, False
            return contexts
        return []

    async def _close_amateurs(self, group: GenGroup, contexts: list[SeqHandle]) -> None:
        for task in list(group.feeding):
            task.cancel()
        if group.feeding:
            await asyncio.gather(*group.feeding, return_exceptions=True)
        if contexts:
            await (group.amateur or self).release(contexts)

    def _served_logits(self, st: SeqState) -> torch.Tensor | None:
        """A served amateur's pending logits for `st` (read while it is idle: not pending)."""
        group = st.group
        if group is None or group.amateur is None or st.amateur is None:
            return None
        return group.amateur._state(st.amateur).logits

    def _feed_amateurs(self, feeds: list[tuple[GenGroup, SeqState, int]]) -> None:
        """Extend each served amateur with the tokens its sequences just sampled; they sample
        again once it is done (event loop)."""
        by_group: dict[int, tuple[GenGroup, list[tuple[SeqState, int]]]] = {}
        for group, st, tok in feeds:
            by_group.setdefault(id(group), (group, []))[1].append((st, tok))
        for group, items in by_group.values():
            task = asyncio.ensure_future(self._feed_amateur(group, items))
            group.feeding.add(task)
            task.add_done_callback(group.feeding.discard)

    async def _feed_amateur(self, group: GenGroup, items: list[tuple[SeqState, int]]) -> None:
        try:
            await group.amateur.extend([st.amateur for st, _ in items],
                                       [[tok] for _, tok in items], group.tally)
        except Exception as exc:  # noqa: BLE001  (the generate call raises it)
            if group.live > 0:
                group.live = 0
                group.queue.put_nowait(EngineError(f"the amateur failed: {exc}"))
        finally:
            for st, _ in items:
                st.amateur_pending = False
            self._wake.set()

    # the loop ---------------------------------------------------------------------------
    def _has_work(self) -> bool:
        # a sequence waiting for its served amateur is not work until the amateur is fed
        return bool(self._feeds or self._prefills
                    or any(not st.amateur_pending for st in self._generating.values()))

    async def _run(self) -> None:
        while True:
            if not self._has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._lock:
                prefills = self._admit_prefills()
                # An extend whose caller was cancelled is dropped: its sequences are being
                # released, and feeding them would hand KV pages to a dead chain.
                feeds = [f for f in self._feeds if not f.future.done()]
                self._feeds = []
                gen = [st for st in self._generating.values() if not st.released]
                try:
                    # steps run on the process's compute thread (shared by every engine)
                    result = await compute_thread.run(self._step, prefills, feeds, gen)
                except Exception as exc:  # a bug in a step must not take the server down
                    log.exception("engine step failed")
                    result = _StepResult()
                    for f in prefills + feeds:
                        result.failed.append((f.future, EngineError(f"engine step failed: {exc}")))
                    for st in gen:
                        if st.group is not None:
                            result.failed.append((st.group, EngineError(f"engine step failed: {exc}")))
                            self._generating.pop(st.id, None)
            self._deliver(result, prefills)
            await asyncio.sleep(0)  # let callers enqueue before the next step

    def _admit_prefills(self) -> list[_Feed]:
        """Chunks of queued prompts for this step, within a token budget and free KV."""
        out, budget = [], self.prefill_chunk
        free = self.kv.free_slots()
        for i, (feed, admitted) in enumerate(self._prefills):
            if budget <= 0:
                break
            if feed.future.done():  # cancelled while waiting
                continue
            remaining = len(feed.tokens[0]) - feed.done[0]
            if not admitted:
                need = remaining + 64
                if need > free and self.prompt_cache:  # kept prompts yield to new ones
                    free += self.prompt_cache.clear()
                if need > free:
                    break  # first come, first served: wait for memory to free up
                free -= need
                self._prefills[i] = (feed, True)
            out.append(feed)
            budget -= remaining
        return out

    def _deliver(self, result: _StepResult, prefills: list[_Feed]) -> None:
        if result.amateur_feeds:
            self._feed_amateurs(result.amateur_feeds)
        for group, events in result.events:
            group.queue.put_nowait(events)
        for feed in result.finished_feeds:
            for st in feed.states:
                st.busy = False
            if not feed.future.done():
                feed.future.set_result(None)
        for target, exc in result.failed:
            if isinstance(target, GenGroup):
                target.live = 0
                target.queue.put_nowait(exc)
            elif not target.done():
                target.set_exception(exc)
        finished = {id(f) for f in result.finished_feeds} | {id(t) for t, _ in result.failed}
        self._prefills = deque(
            (f, a) for f, a in self._prefills if id(f) not in finished and id(f.future) not in finished
            and not f.future.done()
        )
        self._stats.steps += 1

    # the step (worker thread) -------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, prefills: list[_Feed], feeds: list[_Feed], gen: list[SeqState]) -> _StepResult:
        result = _StepResult()
        # A feed that wants its tokens' log-probs needs every row's logits: the extend pass.
        single = [f for f in feeds if all(len(t) == 1 for t in f.tokens) and f.prompt_logprobs is None]
        multi = [f for f in feeds if f not in single]
        self._run_extends(prefills, multi, result)
        # (state, token to feed, whom it is charged to: its extend call or its generate group)
        decode_rows: list[tuple[SeqState, int, Any]] = []
        for feed in single:
            decode_rows.extend((st, toks[0], feed) for st, toks in zip(feed.states, feed.tokens))
        decode_rows.extend(self._sample(gen, result))
        if decode_rows:
            self._run_decode(decode_rows, result)
        for feed in single:
            result.finished_feeds.append(feed)
        return result

    def _count(self, tally: TokenTally | None, kind: str, n: int) -> None:
        if tally is not None:
            tally.add(kind, n)
        self._stats.model_tokens[kind] = self._stats.model_tokens.get(kind, 0) + n
        if kind == "prefill":
            self._stats.prefill_tokens += n

    def _run_extends(self, prefills: list[_Feed], feeds: list[_Feed], result: _StepResult) -> None:
        """Prompt chunks and multi-token extends: one forward pass with causal self-attention."""
        work = []  # (feed, index in feed, tokens this pass)
        for feed in prefills:
            toks = feed.tokens[0][feed.done[0] : feed.done[0] + self.prefill_chunk]
            work.append((feed, 0, toks))
        for feed in feeds:
            work.extend((feed, i, toks) for i, toks in enumerate(feed.tokens))
        if not work:
            return
        contexts, counts, slots, tokens, positions = [], [], [], [], []
        ok = []
        scored = []  # (state, first row in the batch, tokens, k): feeds that want log-probs
        for feed, i, toks in work:
            st = feed.states[i]
            if not toks:
                ok.append((feed, i, toks))
                continue
            leaf = st.chain[-1]
            before = Segment()
            before.slots = list(leaf.slots)
            try:
                new = self.kv.append_slots(st.chain, len(toks))
            except OutOfKVMemory as exc:
                result.failed.append((feed.future, EngineError(f"out of KV memory: {exc}")))
                continue
            contexts.append(st.chain[:-1] + [before])
            if feed.prompt_logprobs is not None:
                scored.append((st, len(tokens), toks, feed.prompt_logprobs))
            counts.append(len(toks))
            slots.extend(new)
            tokens.extend(toks)
            positions.extend(range(st.length, st.length + len(toks)))
            ok.append((feed, i, toks))
        if tokens:
            bf16 = len(tokens) <= cpu_linear.bf16_rows(self.model)  # attention follows the linears
            plan = ExtendPlan(self.kv, contexts, counts, slots, self.scale,
                              dtype=torch.bfloat16 if bf16 else None)
            ends = [e - 1 for e in itertools.accumulate(counts)]
            fed = [feed.states[i] for feed, i, toks in ok if toks]  # in the batch's order
            self._forward(tokens, positions, plan, fed, ends, scored=scored)
        failed = {id(f) for f, _ in result.failed}
        for feed, i, toks in ok:
            if id(feed.future) in failed:
                continue
            st = feed.states[i]
            if toks:
                st.handle.token_ids.extend(toks)
                feed.done[i] += len(toks)
                self._count(feed.tally, feed.kind, len(toks))
        for feed in prefills + feeds:
            if id(feed.future) in failed:
                continue
            if all(d == len(t) for d, t in zip(feed.done, feed.tokens)):
                if feed.kind == "prefill":
                    st = feed.states[0]
                    self.kv.seal(st.chain, st.id)  # the prompt becomes a shareable segment
                    if (self.prompt_cache is not None and feed.prompt_logprobs is None
                            and st.early_layer is None and st.logits is not None):
                        self.prompt_cache.remember(
                            self._prompt_key(st.handle.token_ids), st.chain, st.id,
                            lambda: next(self._ids), st.logits, st.hidden)
                result.finished_feeds.append(feed)

    def _sample(self, gen: list[SeqState], result: _StepResult) -> list[tuple[SeqState, int, Any]]:
        """Sample a token for every generating sequence; returns those that go on (with the
        group their token is charged to)."""
        # Groups are read once: a cancelled `generate` clears st.group (and st.follower) from
        # the event loop while this step runs in the worker thread.
        by_group: dict[int, tuple[GenGroup, list[SeqState]]] = {}
        for st in gen:
            group = st.group
            if group is not None and st.logits is not None and not st.amateur_pending:
                by_group.setdefault(id(group), (group, []))[1].append(st)
        cont: list[tuple[SeqState, int, Any]] = []
        for group, states in by_group.values():
            rows = sample_rows(states, group, self.vocab_size, self._served_logits)
            events = []
            for st, (tok, lp, top) in zip(states, rows):
                ev = self._commit(st, tok, lp, top, group)
                events.append(ev)
                if ev.finished:
                    group.live -= 1
                    self._generating.pop(st.id, None)
                else:
                    cont.append((st, tok, group))
                    follower = st.follower
                    if follower is not None and not follower.released:
                        cont.append((follower, tok, group))
                    if st.amateur is not None:
                        st.amateur_pending = True
                        result.amateur_feeds.append((group, st, tok))
            result.events.append((group, events))
        return cont

    def _commit(self, st: SeqState, tok: int, lp: float, top,
                group: GenGroup | None = None) -> TokenEvent:
        h, group = st.handle, group or st.group
        params = group.params
        h.token_ids.append(tok)
        h.cumulative_logprob += lp
        if params.logprobs is not None:
            h.logprobs.append({"token_id": tok, "logprob": lp, "top": top or []})
        reason = None
        if params.grammar is not None and st.grammar is not None and st.grammar.broken:
            reason = "abort"  # the output left its grammar (sampler.py): end it, never raise
        elif tok in group.stop_ids and h.num_output > params.min_tokens - 1 or st.text.push(tok) is not None:
            reason = "stop"
        elif params.grammar is not None and st.grammar is not None and st.grammar.terminated:
            reason = "stop"  # the grammar took its stop token (min_tokens yields to it)
        if reason is None and (h.num_output >= params.max_tokens or len(h.token_ids) >= self.max_model_len):
            reason = "length"
        finished = reason is not None
        delta = st.text.delta(final=finished)
        h.text = st.text.text
        if finished:
            h.finished, h.finish_reason = True, reason
            st.logits = st.hidden = st.early_logits = None
        return TokenEvent(seq=h, token_id=tok, logprob=lp, text_delta=delta, finished=finished,
                          finish_reason=reason, top_logprobs=top)

    def _run_decode(self, rows: list[tuple[SeqState, int, Any]], result: _StepResult) -> None:
        """One token for each row: twins (twins.py) are computed once, the rest in one pass;
        each owner (an extend call or a generate group) is charged the rows computed."""
        fed: list[tuple[SeqState, int, Any]] = []
        slots = []
        for st, tok, owner in rows:
            try:
                if self.prompt_cache and self.kv.free_slots() == 0:
                    self.prompt_cache.clear()  # kept prompts yield to running sequences
                slots.append(self.kv.append_slots(st.chain, 1)[0])
            except OutOfKVMemory:
                self._out_of_memory(st, result)
                continue
            if st.group is None:  # fed by `extend`: the token is recorded here
                st.handle.token_ids.append(tok)
            fed.append((st, tok, owner))
        if not fed:
            return
        twin = twin_of(fed) if self.twin_rows else list(range(len(fed)))
        computed = [i for i, t in enumerate(twin) if t == i]
        states = [fed[i][0] for i in computed]
        positions = [st.length - 1 for st in states]
        plan = DecodePlan(self.kv, [st.chain for st in states], [slots[i] for i in computed],
                          self.scale, for_graphs=self.decode_runner is not None)
        self._forward([fed[i][1] for i in computed], positions, plan, states,
                      list(range(len(states))), decode=True)
        copies = [(slots[t], slots[i]) for i, t in enumerate(twin) if t != i]
        if copies:
            src, dst = (torch.tensor(x, device=self.kv.device) for x in zip(*copies))
            self.kv.k[:, dst] = self.kv.k[:, src]
            self.kv.v[:, dst] = self.kv.v[:, src]
            for i, t in enumerate(twin):
                if t != i:
                    st, rep = fed[i][0], fed[t][0]
                    st.logits, st.hidden, st.early_logits = rep.logits, rep.hidden, rep.early_logits
            self._stats.twin_tokens += len(copies)
        charged: dict[int, tuple[Any, int]] = {}
        for i in computed:
            owner = fed[i][2]
            charged[id(owner)] = (owner, charged.get(id(owner), (owner, 0))[1] + 1)
        for owner, n in charged.values():
            self._count(owner.tally, owner.kind, n)

    def _forward(self, tokens: list[int], positions: list[int], plan, states: list[SeqState],
                 rows: list[int], decode: bool = False, scored: list | None = None) -> None:
        """One forward pass; states[i] gets the logits (and hidden state) of token rows[i].
        A decode step (one token per state, rows in order) goes through the piecewise CUDA
        graph runner when there is one and the batch fits a bucket; early-layer captures come
        from it too (the hidden state between two pieces), so no step needs to fall back."""
        capture = {st.early_layer: None for st in states if st.early_layer is not None}
        tok = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        # A decode step's rows are all of them, in order: nothing to pick.
        index = None if decode else torch.tensor(rows, device=self.device)
        runner = self.decode_runner if decode else None
        if runner is not None and runner.prepare(len(tokens)):
            normed, logits = runner.run(tok, pos, plan, capture or None)
        else:
            hidden = self.model.hidden_states(tok, pos, plan, capture or None)
            if scored:
                self._score_fed_tokens(hidden, scored)
            normed, logits = self.model.head(hidden if index is None else hidden.index_select(0, index))
        for st, row_logits, row_hidden in zip(states, logits.unbind(0), normed.unbind(0)):
            st.logits, st.hidden = row_logits, row_hidden
        for layer, h in capture.items():
            picks = [i for i, st in enumerate(states) if st.early_layer == layer]
            at = [rows[i] for i in picks]
            early = self.model.logits(h.index_select(0, torch.tensor(at, device=self.device)))
            for st_index, row_logits in zip(picks, early.unbind(0)):
                states[st_index].early_logits = row_logits

    _SCORE_ROWS = 256  # rows of full-vocabulary logits held at once while scoring a prompt

    def _score_fed_tokens(self, hidden: torch.Tensor, scored: list) -> None:
        """Prompt log-probs: each fed token's log-prob under the logits before it. The first
        token of a chunk is scored by the sequence's pending logits (the previous chunk's, or
        a fork parent's); a sequence's very first token has none (None, as vLLM)."""
        for st, start, toks, k in scored:
            out = st.handle.prompt_logprobs
            if st.logits is not None:
                out.extend(prompt_logprob_entries(st.logits.view(1, -1), toks[:1], k))
            elif not out:
                out.append(None)
            for a in range(0, len(toks) - 1, self._SCORE_ROWS):
                b = min(a + self._SCORE_ROWS, len(toks) - 1)
                _, logits = self.model.head(hidden[start + a : start + b])
                out.extend(prompt_logprob_entries(logits, toks[a + 1 : b + 1], k))

    def _out_of_memory(self, st: SeqState, result: _StepResult) -> None:
        """No KV left to go on: the sequence ends here rather than the server failing."""
        log.warning("out of KV memory: sequence %d stops early", st.id)
        st.handle.finished, st.handle.finish_reason = True, "length"
        st.logits = None
        group = st.group
        if group is not None and self._generating.pop(st.id, None) is not None:
            group.live -= 1
            ev = TokenEvent(st.handle, -1, 0.0, st.text.delta(final=True), True, "length")
            result.events.append((group, [ev]))
