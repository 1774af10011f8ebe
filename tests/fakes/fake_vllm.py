"""A fake of vLLM 0.25's AsyncLLM that behaves like the real one, for CPU tests of the adapter.

What it keeps of the real thing (the parts the adapter relies on):
- `generate(prompt, sampling_params, request_id)` is an async generator of RequestOutput-like
  objects; `TokensPrompt` is a dict with `prompt_token_ids`; with `output_kind` DELTA each
  output carries the new token ids, text delta, per-token logprobs dicts ({token: Logprob
  (logprob, rank)}, the sampled token plus the top `logprobs`), `finish_reason`; `n` children
  are separate rows of the batch, each with its own `num_cached_tokens`, and the stream ends
  with an output whose `finished` is true once every child is done.
- cancelling the consumer aborts the request (as AsyncLLM.generate does), `abort(ids)` ends
  requests with finish_reason "abort"; validation errors raise before the first output.
- one step loop runs every live row as a persistent batch: rows leave (removed), join in the
  holes first (added), and the batch is condensed by one-way moves, and a V1 logits processor
  (`core`, e.g. AlignProcessorCore) sees those BatchUpdates, the live output token lists, and
  the raw logits, between vLLM's min_tokens masking and sampling; logprobs are the raw ones.
- a prefix cache of 16-token blocks: a prompt's full blocks computed by an earlier row hit.
- with a `metrics_registry`, a few of vLLM's `vllm:*` metrics (scheduler gauges, token
  counters) registered there as the real one registers them in prometheus_client's global
  registry, and unregistered at shutdown.
The model is a tiny random Llama in the native engine's model code, run without a KV cache
(every step recomputes the context), so tests can recompute any step independently.

`install_fake_vllm` puts a fake `vllm` package in sys.modules (the names VllmEngine.load and
start import), so `alignserve serve --engine vllm`'s construction path runs on CPU too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignserve.engine.native.model import CausalLM, ModelConfig, rope_frequencies
from alignserve.engine.vllm.engine import VllmApi
from alignserve.engine.vllm.logits_processor import SideResources
from alignserve.kernels.attention import attention_lse_reference

DELTA = "DELTA"


# the data types -------------------------------------------------------------------------------
@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    output_kind: Any = "CUMULATIVE"
    detokenize: bool = True
    skip_special_tokens: bool = True
    extra_args: dict | None = None

    def __post_init__(self) -> None:  # vLLM validates at construction
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be non-negative")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 or positive")


def fake_tokens_prompt(prompt_token_ids: list[int]) -> dict:
    return {"prompt_token_ids": list(prompt_token_ids)}


FAKE_API = VllmApi(FakeSamplingParams, fake_tokens_prompt, DELTA)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None
    # vLLM: on the first output when asked; None for the first token, then a dict per position
    # (the prompt's token plus the top `prompt_logprobs`)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class FakeBatchUpdate:
    batch_size: int
    removed: list[int]
    added: list[tuple[int, Any, list[int], list[int]]]
    moved: list[tuple[int, int, str]]


class Direction:
    """Stands for vllm's MoveDirectionality enum (the core reads `.name`)."""

    def __init__(self, name: str):
        self.name = name


UNIDIRECTIONAL, SWAP = Direction("UNIDIRECTIONAL"), Direction("SWAP")


# the model ------------------------------------------------------------------------------------
class _FullPlan:
    """Causal attention over the whole context, no cache."""

    def __init__(self, scale: float):
        self.scale = scale

    def attend(self, layer: int, q, k, v):
        return attention_lse_reference(q, k, v, self.scale, causal_offset=0)[0]


class TinyLM:
    """A tiny random Llama (native model code) with the tokenizer's vocabulary."""

    def __init__(self, vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
        cfg = ModelConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
                          rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                          tie_word_embeddings=False)
        torch.manual_seed(seed)
        m = CausalLM(cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif name.startswith(("embed", "lm_head")):
                    p.normal_(0.0, 1.0)
                else:
                    p.normal_(0.0, 0.3)
        m.inv_freq = rope_frequencies(cfg)
        self.model = m.eval()
        self.cfg = cfg

    @torch.no_grad()
    def forward(self, model: CausalLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [V], normalized hidden [H]) after `ids`, for `model` (this one or a truncation)."""
        plan = _FullPlan(self.cfg.head_dim ** -0.5)
        h = model.hidden_states(torch.tensor(ids), torch.arange(len(ids)), plan)
        normed, logits = model.head(h[-1:])
        return logits[0].float(), normed[0].float()

    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.forward(self.model, ids)[0]


# the engine -----------------------------------------------------------------------------------
@dataclass(eq=False)
class _Child:
    request_id: str
    index: int
    prompt: list[int]
    params: FakeSamplingParams
    queue: asyncio.Queue
    output: list[int] = field(default_factory=list)  # the live list the processor reads
    text: str = ""
    cumulative: float = 0.0
    cached: int = 0
    reported_cached: bool = False
    done: bool = False
    generator: torch.Generator | None = None


@dataclass
class SeenRequest:
    request_id: str
    prompt_ids: list[int]
    params: FakeSamplingParams


class FakeAsyncLLM:
    def __init__(self, lm: TinyLM, tokenizer: Any, *, max_model_len: int = 512,
                 block_size: int = 16, core: Any = None, step_delay: float = 0.0,
                 fail_after_steps: int | None = None, eos_token_id: int | None = None,
                 metrics_registry: Any = None):
        self.lm, self.tok = lm, tokenizer
        self.max_model_len, self.block_size = max_model_len, block_size
        self.core = core
        self.step_delay = step_delay
        self.fail_after_steps = fail_after_steps
        self.eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.requests: list[SeenRequest] = []
        self.aborted: list[str] = []
        self.batch_updates: list[FakeBatchUpdate] = []
        self.max_batch = 0
        self.steps = 0
        self.errored = False
        self.shut_down = False
        self._rows: list[_Child | None] = []
        self._removed: list[int] = []
        self._new: list[_Child] = []
        self._children: dict[str, list[_Child]] = {}
        self.outputs: dict[tuple[str, int], list[int]] = {}  # (request, child) -> its tokens
        self.cached: dict[tuple[str, int], int] = {}  # (request, child) -> prompt tokens it found
        self._cache: set[tuple[int, ...]] = set()
        self._task: asyncio.Task | None = None
        self._seeds = itertools.count(1000)
        self.metrics = _FakeMetrics(metrics_registry) if metrics_registry is not None else None

    # the AsyncLLM surface ---------------------------------------------------------------------
    async def generate(self, prompt: dict, sampling_params: FakeSamplingParams, request_id: str):
        ids = list(prompt["prompt_token_ids"])
        sp = sampling_params
        if self.errored:
            raise RuntimeError("EngineDeadError: the engine core died")
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(ids) + (sp.max_tokens or 0) > self.max_model_len:
            raise ValueError(f"This model's maximum model length is {self.max_model_len} tokens; "
                             f"the request asks for {len(ids) + (sp.max_tokens or 0)}")
        if self.core is not None:
            from alignserve.engine.vllm.logits_processor import AlignLogitsProcessor

            AlignLogitsProcessor.validate_params(sp)  # vLLM's frontend does this
        self.requests.append(SeenRequest(request_id, ids, sp))
        queue: asyncio.Queue = asyncio.Queue()
        children = []
        for i in range(sp.n):
            g = None
            if sp.temperature > 1e-5:
                g = torch.Generator().manual_seed(sp.seed + i if sp.seed is not None else next(self._seeds))
            children.append(_Child(request_id, i, ids, sp, queue, generator=g))
        self._children[request_id] = children
        for c in children:
            self.outputs[(request_id, c.index)] = c.output
        self._new.extend(children)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request_id)
            raise

    async def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            children = self._children.pop(rid, None)
            if children is None:
                continue
            self.aborted.append(rid)
            live = [c for c in children if not c.done]
            for c in live:
                c.done = True
                self._new = [x for x in self._new if x is not c]
                if c in self._rows:
                    i = self._rows.index(c)
                    self._rows[i] = None
                    self._removed.append(i)
            if live:
                outs = [CompletionOutput(c.index, "", [], None, None, "abort") for c in live]
                for k, o in enumerate(outs):
                    live[0].queue.put_nowait(RequestOutput(rid, children[0].prompt, [o],
                                                           finished=k == len(outs) - 1))

    def shutdown(self) -> None:
        self.shut_down = True
        if self.metrics is not None:
            self.metrics.unregister()
        if self._task is not None:
            self._task.cancel()

    @property
    def live_rows(self) -> int:
        return sum(r is not None for r in self._rows) + len(self._new)

    # the step loop ----------------------------------------------------------------------------
    def _batch_update(self) -> FakeBatchUpdate | None:
        removed = sorted(self._removed)
        self._removed = []
        holes = sorted(i for i, r in enumerate(self._rows) if r is None)
        added = []
        for c in self._new:
            if holes:
                i = holes.pop(0)
                self._rows[i] = c
            else:
                i = len(self._rows)
                self._rows.append(c)
            added.append((i, c.params, c.prompt, c.output))
            self._admit(c)
        self._new = []
        moved = []
        rows = self._rows
        while True:  # condense: the last row moves into the lowest hole
            while rows and rows[-1] is None:
                rows.pop()
            hole = next((i for i, r in enumerate(rows) if r is None), None)
            if hole is None:
                break
            last = len(rows) - 1
            rows[hole] = rows.pop()
            moved.append((last, hole, UNIDIRECTIONAL))
        if not (removed or added or moved):
            return None
        bu = FakeBatchUpdate(len(self._rows), removed, added, moved)
        self.batch_updates.append(bu)
        return bu

    def _admit(self, c: _Child) -> None:
        """Prefix cache: the leading full blocks some earlier row computed."""
        b = self.block_size
        hit = 0
        while hit + b <= len(c.prompt) - 1 and tuple(c.prompt[: hit + b]) in self._cache:
            hit += b
        c.cached = hit
        self.cached[(c.request_id, c.index)] = hit
        if self.metrics is not None:
            self.metrics.prompt.inc(len(c.prompt) - hit)
        for end in range(b, len(c.prompt) + 1, b):
            self._cache.add(tuple(c.prompt[:end]))

    async def _loop(self) -> None:
        while self._new or any(r is not None for r in self._rows):
            await asyncio.sleep(self.step_delay)
            if self.fail_after_steps is not None and self.steps >= self.fail_after_steps:
                self.errored = True
                for c in [r for r in self._rows if r is not None] + self._new:
                    c.queue.put_nowait(RuntimeError("EngineCore encountered an issue"))
                self._rows, self._new = [], []
                return
            bu = self._batch_update()
            rows = [r for r in self._rows if r is not None]
            if not rows:
                continue
            self.steps += 1
            self.max_batch = max(self.max_batch, len(rows))
            if self.metrics is not None:
                self.metrics.step(len(rows), len(self._new), len(rows) / max(8, self.max_batch))
            if self.core is not None:
                self.core.update_state(bu)
            raw = torch.stack([self.lm.logits(c.prompt + c.output) for c in self._rows])
            logits = raw.clone()
            for i, c in enumerate(self._rows):  # vLLM's built-in min_tokens runs before
                if len(c.output) < c.params.min_tokens:
                    for t in self._stop_ids(c):
                        logits[i, t] = float("-inf")
            for i, c in enumerate(self._rows):  # vLLM's logit_bias, also before sampling
                for t, v in (c.params.logit_bias or {}).items():
                    logits[i, t] += v
            if self.core is not None:
                logits = self.core.apply(logits)
            self._sample_and_emit(raw, logits)

    def _prompt_logprobs(self, c: _Child) -> list[dict[int, Logprob] | None]:
        """As vLLM: position i > 0 gets the prompt token's raw log-prob and rank, plus the
        top k of the logits before it."""
        k = c.params.prompt_logprobs or 0
        out: list[dict[int, Logprob] | None] = [None]
        for pos in range(1, len(c.prompt)):
            lps = torch.log_softmax(self.lm.logits(c.prompt[:pos]), dim=-1)
            tok = c.prompt[pos]
            entry = {tok: Logprob(float(lps[tok]), int((lps > lps[tok]).sum()) + 1)}
            if k:
                vals, idx = torch.topk(lps, k)
                for r, (t, v) in enumerate(zip(idx.tolist(), vals.tolist())):
                    entry.setdefault(t, Logprob(v, r + 1))
            out.append(entry)
        return out

    def _stop_ids(self, c: _Child) -> set[int]:
        ids = set(c.params.stop_token_ids or ())
        if not c.params.ignore_eos and self.eos is not None:
            ids.add(self.eos)
        return ids

    def _sample_and_emit(self, raw: torch.Tensor, logits: torch.Tensor) -> None:
        lps = torch.log_softmax(raw, dim=-1)
        for i, c in enumerate(list(self._rows)):
            sp = c.params
            if sp.temperature <= 1e-5:
                tok = int(torch.argmax(logits[i]))
            else:
                scores = logits[i] / sp.temperature
                if sp.top_k and sp.top_k > 0:
                    kth = torch.topk(scores, sp.top_k).values[-1]
                    scores = torch.where(scores < kth, torch.full_like(scores, float("-inf")), scores)
                probs = torch.softmax(scores, dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=c.generator))
            c.output.append(tok)
            lp = float(lps[i, tok])
            c.cumulative += lp
            entry = None
            if sp.logprobs is not None:
                rank = int((lps[i] > lps[i, tok]).sum()) + 1
                entry = {tok: Logprob(lp, rank)}
                if sp.logprobs:
                    vals, idx = torch.topk(lps[i], sp.logprobs)
                    for r, (t, v) in enumerate(zip(idx.tolist(), vals.tolist())):
                        entry.setdefault(t, Logprob(v, r + 1))
            reason = None
            full = self.tok.decode(c.output, skip_special_tokens=True)
            if tok in self._stop_ids(c) and len(c.output) > sp.min_tokens - 1:
                reason = "stop"
            for s in sp.stop or ():
                at = full.find(s)
                if at >= 0:  # as vLLM: cut before the stop string, or after it if kept
                    keep = at + len(s) if sp.include_stop_str_in_output else at
                    full, reason = full[:keep], "stop"
            if reason is None and (len(c.output) >= (sp.max_tokens or 1 << 30)
                                   or len(c.prompt) + len(c.output) >= self.max_model_len):
                reason = "length"
            if not sp.detokenize:  # as vLLM: no text at all (stop strings need detokenize)
                full = ""
            delta = full.removeprefix(c.text)
            c.text = full
            out = CompletionOutput(c.index, delta, [tok], c.cumulative if sp.logprobs is not None else None,
                                   [entry] if entry is not None else None, reason)
            cached, scored = None, None
            if not c.reported_cached:
                cached, c.reported_cached = c.cached, True
                if sp.prompt_logprobs is not None:
                    scored = self._prompt_logprobs(c)
            if reason is not None:
                c.done = True
                self._rows[i] = None
                self._removed.append(i)
                for end in range(self.block_size, len(c.prompt) + len(c.output), self.block_size):
                    self._cache.add(tuple((c.prompt + c.output)[:end]))
            siblings = self._children.get(c.request_id, [])
            finished = reason is not None and all(s.done for s in siblings)
            if finished:
                self._children.pop(c.request_id, None)
            c.queue.put_nowait(RequestOutput(c.request_id, c.prompt, [out], finished, cached,
                                             scored))


# vLLM's own metrics ------------------------------------------------------------------------------
class _FakeMetrics:
    """A few of the families vLLM 0.25 registers (names and labels as vLLM writes them)."""

    LABELS = ("model_name", "engine")

    def __init__(self, registry: Any, model_name: str = "tiny"):
        from prometheus_client import Counter, Gauge

        self.registry = registry

        def make(kind: Any, name: str, doc: str) -> Any:
            metric = kind(name, doc, self.LABELS, registry=registry)
            self.collectors.append(metric)
            return metric.labels(model_name, "0")

        self.collectors: list[Any] = []
        self.running = make(Gauge, "vllm:num_requests_running", "Requests in the model's batch.")
        self.waiting = make(Gauge, "vllm:num_requests_waiting", "Requests waiting to be processed.")
        self.kv = make(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt = make(Counter, "vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation = make(Counter, "vllm:generation_tokens", "Generation tokens processed.")

    def step(self, running: int, waiting: int, kv: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv.set(min(1.0, kv))
        self.generation.inc(running)

    def unregister(self) -> None:
        for metric in self.collectors:
            self.registry.unregister(metric)
        self.collectors = []


# the engine core's side models, tiny ------------------------------------------------------------
EXPERT = "/models/tiny-expert"  # the served model's path as the engine core sees it


class TinyResources(SideResources):
    """Engine-core resources whose models are the test's tiny ones: EXPERT (or `expert_path`)
    is `lm`, any other path one of `models`."""

    def __init__(self, lm: TinyLM, models: dict[str, Any] | None = None,
                 expert_path: str = EXPERT):
        super().__init__(expert_path, "cpu", torch.float32, kv_gib=0.01)
        self.lm, self.models = lm, models or {}
        self.loaded: list[str] = []

    def load_model(self, path):
        self.loaded.append(path)
        return self.lm.model if path == self.model_path else self.models[path]

    def load_value(self, path):
        self.loaded.append(str(path))
        return super().load_value(path)

    def token_matrix(self):
        return self.lm.model.lm_head.weight.detach().float()


def tiny_value_model(directory: Path, lm: TinyLM, seed: int):
    """A random value head for `lm`, saved in `directory` and loaded back (it has its path)."""
    from alignserve.rewardmodels.value.model import (
        ValueHead,
        ValueModel,
        ValueModelConfig,
        load_value_model,
    )

    torch.manual_seed(seed)
    head = ValueHead(lm.cfg.hidden_size, rank=0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.5)
    cfg = ValueModelConfig(base_model="tiny", hidden_size=lm.cfg.hidden_size,
                           vocab_size=lm.cfg.vocab_size)
    path = ValueModel(head, cfg, name=f"v{seed}").save(Path(directory) / f"v{seed}")
    return load_value_model(path, f"v{seed}")


def write_model_dir(directory: Path, lm: TinyLM, tokenizer: Any) -> Path:
    """A model folder vLLM (and transformers' AutoConfig) would accept for `lm`: its config and
    the tokenizer, no weights (the fake's model is `lm` itself)."""
    from transformers import LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    c = lm.cfg
    LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                max_position_embeddings=512, rms_norm_eps=c.rms_norm_eps,
                rope_theta=c.rope_theta, tie_word_embeddings=False,
                eos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"],
                ).save_pretrained(directory)
    return directory


# a fake `vllm` package: what VllmEngine.load and start import ------------------------------------
@dataclass
class FakeModelConfig:
    model: str
    max_model_len: int
    hf_config: Any
    dtype: Any = torch.float32

    def get_vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass
class FakeVllmConfig:
    model_config: FakeModelConfig
    additional_config: dict
    args: dict  # every AsyncEngineArgs keyword, for tests to check


class FakeAsyncEngineArgs:
    seen: list[dict] = []  # noqa: RUF012  (a record across instances, on purpose)

    def __init__(self, **kw: Any):
        self.kw = kw
        FakeAsyncEngineArgs.seen.append(kw)

    def create_engine_config(self) -> FakeVllmConfig:
        kw = self.kw
        if kw.get("load_format", "auto") not in ("auto", "dummy", "safetensors"):
            raise ValueError(f"unknown load_format {kw['load_format']!r}")
        cfg = json.loads((Path(kw["model"]) / "config.json").read_text())
        hf = types.SimpleNamespace(**cfg)
        mml = kw.get("max_model_len") or cfg["max_position_embeddings"]
        return FakeVllmConfig(FakeModelConfig(kw["model"], mml, hf),
                              dict(kw.get("additional_config") or {}), dict(kw))


def install_fake_vllm(monkeypatch: Any, make_llm: Callable[[FakeVllmConfig], Any]) -> None:
    """sys.modules gets a `vllm` whose AsyncLLM.from_vllm_config(config) is `make_llm(config)`."""
    FakeAsyncEngineArgs.seen = []

    class FakeAsyncLLMFactory:
        @staticmethod
        def from_vllm_config(vllm_config: Any, disable_log_stats: bool = True) -> Any:
            if disable_log_stats:
                raise AssertionError("the served AsyncLLM must keep its stats (vllm:* metrics)")
            return make_llm(vllm_config)

    mods = {
        "vllm": {"SamplingParams": FakeSamplingParams, "__version__": "0.25.0+fake"},
        "vllm.inputs": {"TokensPrompt": fake_tokens_prompt},
        "vllm.sampling_params": {"RequestOutputKind": types.SimpleNamespace(DELTA=DELTA)},
        "vllm.engine": {},
        "vllm.engine.arg_utils": {"AsyncEngineArgs": FakeAsyncEngineArgs},
        "vllm.v1": {},
        "vllm.v1.engine": {},
        "vllm.v1.engine.async_llm": {"AsyncLLM": FakeAsyncLLMFactory},
        # the GPU build (the CPU build's set-up is tested on real vLLM: test_vllm_live.py)
        "vllm.platforms": {"current_platform": types.SimpleNamespace(is_cpu=lambda: False)},
    }
    for name, attrs in mods.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
