"""VAS and contrastive decoding inside vLLM: a V1 logits processor.

Loaded with the engine (`AsyncEngineArgs(logits_processors=[PROCESSOR])`), it runs in vLLM's
engine-core process on every step, between the forward pass and vLLM's penalties and sampling
(the same place as the native engine's processors). A request opts in through
`SamplingParams.extra_args["alignserve"]` (format: `alignserve.engine.vllm.spec`); every other
request's row passes through untouched.

vLLM keeps a persistent batch and tells processors how it changes before each step
(`BatchUpdate`: removed, then added, then moved rows). What a request carries is its
`engine.steering.Steering`, which the adapter wrote with `spec.from_steering`. `AlignProcessorCore` keeps one `_Row`
per steered request keyed by its batch index, with the request's prompt and a live reference
to its output token ids, and follows those changes; side sequences are opened on a row's first
step and closed when it leaves (preempted requests come back as new rows and are replayed).

`apply` then, for the steered rows only:
1. contrastive: feeds each row's new tokens to its amateur (`SideRunner`, a model run with the
   native engine's code on the same GPU) and takes the amateur's next-token logits;
2. vas: recovers the served model's final hidden state from the logits (`HiddenFromLogits`),
   takes the top_k candidates of the row, their Q values from each value model, centred per
   model over the candidates and summed with the per-request weights;
3. applies `alignserve.kernels.logits_ops.process_logits_reference` (the native engine's
   reference math: plausibility cut and (1+beta)e - beta a, then beta * values on the
   candidates, non-candidates masked unless keep_others) and writes the rows back in place.
A row whose side computation fails is logged and left unsteered rather than failing the engine.

The class vLLM loads, `AlignLogitsProcessor`, derives from vLLM's base class when vLLM is
importable and from `object` otherwise, so this module imports (and the core is tested) on a
machine without vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from alignserve.engine.vllm import spec as wire
from alignserve.engine.vllm.side_model import (
    HiddenFromLogits,
    SideRunner,
    load_token_matrix,
    truncated,
)
from alignserve.kernels.logits_ops import (
    Contrastive,
    ValueGuidance,
    centred_value_sum,
    process_logits_reference,
)

log = logging.getLogger(__name__)

PROCESSOR = "alignserve.engine.vllm.logits_processor:AlignLogitsProcessor"


def _is_swap(direction: Any) -> bool:
    return getattr(direction, "name", direction) in ("SWAP", "swap")


class SideResources:
    """Loads, once per engine-core process, what steered rows need: amateur runners and value
    models bound to the served model's token matrix. Subclass or pass loaders to change where
    models come from (the tests use tiny models)."""

    def __init__(self, model_path: str | None, device: torch.device | str, dtype: torch.dtype,
                 kv_gib: float = 1.0, max_side_models: int = 4, random_weights: bool = False):
        self.model_path = model_path
        self.random_weights = random_weights  # vLLM runs load_format "dummy": no weights on disk
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_gib = kv_gib
        self.max_side_models = max_side_models
        self._expert = None
        self._runners: dict[tuple, SideRunner] = {}
        self._values: dict[str, Any] = {}
        self._hidden: HiddenFromLogits | None = None
        self._token_matrix: torch.Tensor | None = None

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, device: torch.device | str) -> SideResources:
        mc = vllm_config.model_config
        extra = (getattr(vllm_config, "additional_config", None) or {}).get("alignserve", {})
        dtype = mc.dtype if isinstance(mc.dtype, torch.dtype) else torch.bfloat16
        return cls(mc.model, device, dtype, kv_gib=float(extra.get("side_kv_gib", 1.0)),
                   max_side_models=int(extra.get("max_side_models", 4)),
                   random_weights=bool(extra.get("random_weights", False)))

    # loaders (override in tests) ------------------------------------------------------------
    def load_model(self, path: str):
        from alignserve.engine.native.loader import load_model

        model, _, _ = load_model(path, self.device, self.dtype, random_weights=self.random_weights)
        return model

    def load_value(self, path: str):
        from alignserve.rewardmodels.value.model import load_value_model

        return load_value_model(path)

    def token_matrix(self) -> torch.Tensor:
        if self._token_matrix is None:
            if self._expert is not None or self.random_weights:
                self._token_matrix = self.expert().lm_head.weight.detach().float()
            else:
                self._token_matrix = load_token_matrix(self.model_path, self.device)
        return self._token_matrix

    # what rows use ----------------------------------------------------------------------
    def expert(self):
        if self._expert is None:
            self._expert = self.load_model(self.model_path)
        return self._expert

    def runner(self, amateur: wire.AmateurSpec) -> SideRunner:
        key = amateur.side_key()
        r = self._runners.get(key)
        if r is None:
            if len(self._runners) >= self.max_side_models:
                raise RuntimeError(f"more than {self.max_side_models} amateur models in use")
            if amateur.source == "self":
                model = truncated(self.expert(), amateur.layers)
            elif amateur.source == "expert":
                model = self.expert()
            else:
                model = self.load_model(amateur.path)
            r = SideRunner(model, SideRunner.slots_for(model, self.kv_gib), self.device)
            self._runners[key] = r
        return r

    def value_model(self, path: str):
        vm = self._values.get(path)
        if vm is None:
            vm = self.load_value(path).bind(self.token_matrix())
            self._values[path] = vm
        return vm

    def hidden(self) -> HiddenFromLogits:
        if self._hidden is None:
            self._hidden = HiddenFromLogits(self.token_matrix())
        return self._hidden


@dataclass(eq=False)
class _Row:
    spec: wire.AlignSpec
    prompt_ids: list[int] | None
    output_ids: list[int]  # vLLM's live list: grows as the request samples
    runner: SideRunner | None = None
    sid: int | None = None
    failed: bool = False


class AlignProcessorCore:
    """The processor's logic, free of vLLM types (BatchUpdate is duck-typed)."""

    def __init__(self, resources: SideResources):
        self.resources = resources
        self.rows: dict[int, _Row] = {}

    # batch changes ------------------------------------------------------------------------
    def _close(self, row: _Row | None) -> None:
        if row is not None and row.runner is not None and row.sid is not None:
            row.runner.close(row.sid)
            row.runner = row.sid = None

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._close(self.rows.pop(index, None))
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._close(self.rows.pop(index, None))  # an added request replaces what was there
            try:
                spec = wire.parse(getattr(params, "extra_args", None))
            except ValueError:
                log.exception("alignserve: malformed extra_args; row left unsteered")
                continue
            if spec is not None:
                self.rows[index] = _Row(spec, list(prompt_ids) if prompt_ids is not None else None,
                                        output_ids)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if _is_swap(direction):
                if rb is not None:
                    self.rows[a] = rb
            else:
                self._close(rb)  # a one-way move overwrites the target
            if ra is not None:
                self.rows[b] = ra

    # the step -----------------------------------------------------------------------------
    def _fail(self, row: _Row, what: str) -> None:
        log.exception("alignserve: %s failed; the request continues unsteered", what)
        row.failed = True
        self._close(row)

    def _amateur_logits(self, rows: list[_Row]) -> dict[int, torch.Tensor]:
        """Amateur next-token logits for the contrastive rows that can be served this step."""
        out: dict[int, torch.Tensor] = {}
        by_runner: dict[int, list[tuple[_Row, list[int]]]] = {}
        for row in rows:
            c = row.spec.contrastive
            try:
                if row.runner is None:
                    if c.amateur.source == "expert":
                        prompt = list(c.amateur.prompt_ids)
                    elif row.prompt_ids:
                        prompt = row.prompt_ids
                    else:
                        raise ValueError("the request carries no prompt token ids")
                    row.runner = self.resources.runner(c.amateur)
                    row.sid = row.runner.open(prompt)
            except Exception:  # noqa: BLE001  (a failed row goes on unsteered, logged)
                self._fail(row, "opening the amateur")
                continue
            fed = row.runner.fed(row.sid)
            new = list(row.output_ids[fed:])
            if any(t < 0 for t in new):  # async scheduling placeholder: not known yet
                continue
            by_runner.setdefault(id(row.runner), []).append((row, new))
        for group in by_runner.values():
            runner = group[0][0].runner
            try:
                logits = runner.step([r.sid for r, _ in group], [t for _, t in group])
            except Exception:  # noqa: BLE001  (a failed row goes on unsteered, logged)
                for r, _ in group:
                    self._fail(r, "the amateur step")
                continue
            for i, (r, _) in enumerate(group):
                out[id(r)] = logits[i]
        return out

    def _vas(self, rows: list[_Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ids [n, K], values [n, K]) for `rows` with their logits [n, V]; -1 pads ids."""
        kmax = max(r.spec.vas.top_k for r in rows)
        k_all = min(kmax, logits.shape[1])
        top = torch.topk(logits, k_all, dim=1)
        width = torch.tensor([min(r.spec.vas.top_k, k_all) for r in rows], device=logits.device)
        valid = (torch.arange(k_all, device=logits.device).unsqueeze(0) < width.unsqueeze(1))
        valid = valid & torch.isfinite(top.values)
        ids = torch.where(valid, top.indices, torch.full_like(top.indices, -1))
        hidden = self.resources.hidden()(logits)
        safe = torch.where(valid, ids, torch.zeros_like(ids))
        values = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
        paths = sorted({m.path for r in rows for m in r.spec.vas.value_models})
        for path in paths:  # one batched evaluation per value model
            weights = [sum(m.weight for m in r.spec.vas.value_models if m.path == path) for r in rows]
            users = [i for i, r in enumerate(rows) if any(m.path == path for m in r.spec.vas.value_models)]
            t = torch.tensor(users, device=logits.device)
            q = self.resources.value_model(path).q_values(hidden[t], safe[t]).to(logits.device)
            w = [weights[i] for i in users]
            values[t] += centred_value_sum([q * torch.tensor(w, device=q.device).unsqueeze(1)],
                                           [1.0], ids[t])
        return ids, values

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        index = sorted(i for i, r in self.rows.items() if not r.failed and i < logits.shape[0])
        if not index:
            return logits
        rows = [self.rows[i] for i in index]
        amateurs = self._amateur_logits([r for r in rows if r.spec.contrastive is not None])
        # rows steered this step: contrastive rows need their amateur's logits
        keep = [k for k, r in enumerate(rows)
                if not r.failed and (r.spec.contrastive is None or id(r) in amateurs)]
        if not keep:
            return logits
        rows = [rows[k] for k in keep]
        index_t = torch.tensor([index[k] for k in keep], device=logits.device)
        raw = logits.index_select(0, index_t).float()
        dev = raw.device
        n = len(rows)

        vas = None
        vk = [k for k, r in enumerate(rows) if r.spec.vas is not None]
        if vk:
            try:  # from the raw logits: the hidden state is recovered from them
                ids_v, values_v = self._vas([rows[k] for k in vk], raw[vk])
                kt = torch.tensor(vk, device=dev)
                ids = torch.full((n, ids_v.shape[1]), -1, dtype=torch.long, device=dev)
                values = torch.zeros((n, ids_v.shape[1]), dtype=torch.float32, device=dev)
                ids[kt], values[kt] = ids_v, values_v
                vbeta = torch.tensor([r.spec.vas.beta if r.spec.vas else 0.0 for r in rows], device=dev)
                keep_others = torch.tensor([bool(r.spec.vas and r.spec.vas.keep_others) for r in rows],
                                           device=dev)
                vas = ValueGuidance(ids, values, vbeta, keep_others)
            except Exception:  # noqa: BLE001  (a failed row goes on unsteered)
                for k in vk:
                    self._fail(rows[k], "value guidance")

        sub = raw
        contrastive = None
        am_rows = [k for k, r in enumerate(rows) if r.spec.contrastive is not None and not r.failed]
        if am_rows:
            am = torch.stack([amateurs[id(rows[k])].to(dev).float() for k in am_rows])
            if am.shape[1] != raw.shape[1]:
                log.error("alignserve: the amateur's vocabulary (%d) is not the served model's "
                          "(%d); its requests continue unsteered", am.shape[1], raw.shape[1])
                for k in am_rows:
                    rows[k].failed = True
                    self._close(rows[k])
            else:
                # both sides as log-probs, as the strategy combines them (alignserve.decoding.
                # contrastive.contrast_scores), so that what follows (penalties) sees the same
                kt = torch.tensor(am_rows, device=dev)
                sub = raw.clone()
                sub.index_copy_(0, kt, torch.log_softmax(raw.index_select(0, kt), dim=-1))
                amateur_index = torch.full((n,), -1, dtype=torch.long, device=dev)
                amateur_index[kt] = torch.arange(len(am_rows), device=dev)
                alpha = torch.tensor([r.spec.contrastive.alpha if r.spec.contrastive else 1.0
                                      for r in rows], device=dev)
                beta = torch.tensor([r.spec.contrastive.beta if r.spec.contrastive else 0.0
                                     for r in rows], device=dev)
                contrastive = Contrastive(torch.log_softmax(am, dim=-1), amateur_index, alpha, beta)
        if contrastive is None and vas is None:
            return logits
        new = process_logits_reference(sub, None, contrastive, vas)
        logits.index_copy_(0, index_t, new.to(logits.dtype))
        return logits


def _vllm_base() -> type:
    try:
        from vllm.v1.sample.logits_processor import LogitsProcessor

        return LogitsProcessor
    except Exception:  # noqa: BLE001  (vLLM absent or broken: a plain base, the same core)
        return object


def __getattr__(name: str) -> Any:
    """`AlignLogitsProcessor` is built on first access (PEP 562): it subclasses vLLM's
    LogitsProcessor, and importing vLLM takes ~15 s on CPU, which neither the native engine
    nor the adapter's process should pay for a name it only passes to vLLM as a string."""
    if name != "AlignLogitsProcessor":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = type("AlignLogitsProcessor", (_AlignLogitsProcessorMethods, _vllm_base()),
               {"__module__": __name__,
                "__doc__": _AlignLogitsProcessorMethods.__doc__})
    globals()[name] = cls
    return cls


class _AlignLogitsProcessorMethods:
    """What vLLM loads: the V1 LogitsProcessor interface over `AlignProcessorCore`."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool = False):
        self.core = AlignProcessorCore(SideResources.from_vllm_config(vllm_config, device))

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        wire.parse(getattr(sampling_params, "extra_args", None))  # ValueError if malformed

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is best: it must run before greedy sampling

    def update_state(self, batch_update: Any) -> None:
        self.core.update_state(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.core.apply(logits)
