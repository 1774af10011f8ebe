"""`alignserve` command line: one argparse subcommand per job.

To add a subcommand (train-value, eval, bench, ...): write `_add_NAME(subparsers)` that builds
its parser and sets `func` to a `(args) -> int` handler, and list it in SUBCOMMANDS. Import
heavy modules inside the handler so `alignserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from alignserve import __version__


def _serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from alignserve.engine import compute_thread
    from alignserve.server.app import create_app
    from alignserve.server.lifecycle import GracefulServer
    from alignserve.server.logs import configure_logging
    from alignserve.server.settings import from_args

    try:
        settings = from_args(args)
        settings.check()
    except ValueError as e:
        print(f"alignserve serve: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("alignserve.server")
    try:
        # Models (served, amateurs, value and reward models) load on the thread that will run
        # their steps: one OpenMP team for the process (engine/compute_thread.py).
        engine = load_engine(settings)
        resources = compute_thread.call(_resources, engine, settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"alignserve serve: {e}", file=sys.stderr)
        return 2
    app = compute_thread.call(create_app, engine, settings, resources=resources)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, log_config=None, access_log=False)
    server = GracefulServer(config, app.state.lifecycle, settings.shutdown_grace)
    log.info("serving %s on http://%s:%d", engine.model_name, settings.host, settings.port,
             extra={"fields": {"auth": bool(settings.api_keys()),
                               "max_running_requests": settings.max_running_requests,
                               "max_waiting_requests": settings.max_waiting_requests,
                               "request_timeout_s": settings.request_timeout}})
    # uvicorn restores the handler that was there before it and re-raises what it caught
    # through it: a SIGTERM that was drained must not kill the process after the fact.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:
        return 1  # e.g. the port was taken
    log.info("shut down cleanly")
    return 0


def load_engine(settings: Any) -> Any:
    """The engine `--engine` names; ValueError (a usage error: exit 2) when it cannot load,
    e.g. vllm without vLLM installed."""
    if settings.engine == "vllm":
        from alignserve.engine.protocol import EngineError
        from alignserve.engine.vllm.engine import VllmEngine

        try:
            return VllmEngine.load(settings.model, **vllm_load_kwargs(settings))
        except EngineError as e:
            raise ValueError(str(e)) from e
    from alignserve.engine.native.engine import NativeEngine

    return NativeEngine.load(model=settings.model, device=settings.device,
                             kv_cache_gib=settings.kv_cache_gib,
                             max_model_len=settings.max_model_len,
                             random_weights=settings.load_format == "dummy",
                             cuda_graphs=settings.cuda_graphs,
                             cpu_bf16_decode=settings.cpu_bf16_decode,
                             prompt_cache=settings.prompt_cache)


def vllm_load_kwargs(settings: Any) -> dict[str, Any]:
    """VllmEngine.load's keywords from the settings: amateurs and value models by name for its
    logits processor, and the vLLM engine arguments the flags set. Only gpu_memory_utilization,
    max_model_len and load_format dummy (VllmEngine.load's engine_kwargs) override those in
    ALIGNSERVE_VLLM_ENGINE_ARGS; the parallel sizes and compile (enforce_eager) are overridden
    by them."""
    kw: dict[str, Any] = {
        "served_model_name": settings.served_model_name,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "data_parallel_size": settings.data_parallel_size,
        "kv_cache_gib": settings.kv_cache_gib,
        "compile": settings.vllm_compile,
        # deal's actions come from the top-k view of the logits: keep it exact to --max-top-k
        "logits_top_k": max(32, settings.max_top_k),
        "amateur_paths": dict(settings.amateur_pairs()),
        "value_model_paths": dict(settings.value_model_pairs()),
    }
    if settings.load_format != "auto":  # vLLM's default; leaves ALIGNSERVE_VLLM_ENGINE_ARGS' own
        kw["load_format"] = settings.load_format
    if settings.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if settings.max_model_len is not None:
        kw["max_model_len"] = settings.max_model_len
    return kw


def _resources(engine: Any, settings: Any) -> Any:
    """Value models (the shipped ones plus --value-model) and --amateur models for strategies:
    engines on native; on vllm descriptions of models its engine core runs (`CoreAmateur`)."""
    from alignserve.decoding.resources import DecodingResources
    from alignserve.rewardmodels.value.registry import ValueModelRegistry

    values = ValueModelRegistry.default().bind(engine)
    for spec in settings.value_models:
        values.add_spec(spec)
    amateurs = {}
    for name, path in settings.amateur_pairs():
        if settings.engine == "vllm":
            from alignserve.engine.vllm.amateurs import CoreAmateur

            amateur = CoreAmateur.read(name, path)
        else:
            from alignserve.engine.native.engine import NativeEngine

            amateur = NativeEngine.load(model=path, device=settings.device,
                                        cpu_bf16_decode=settings.cpu_bf16_decode)
        if amateur.vocab_size != engine.vocab_size:
            raise ValueError(f"--amateur {name}: vocabulary {amateur.vocab_size} differs from the "
                             f"served model's {engine.vocab_size}")
        amateurs[name] = amateur
    return DecodingResources(amateurs=amateurs, value_models=values)


def _add_train_value(sub: Any) -> None:
    from alignserve.rewardmodels.value.train import add_subcommand

    add_subcommand(sub)


def _add_serve(sub: Any) -> None:
    from alignserve.server.settings import add_arguments

    p = sub.add_parser("serve", help="run the OpenAI-compatible server",
                       description="Serve the OpenAI-compatible API with the `alignment` "
                       "extension. Every flag also reads an ALIGNSERVE_* environment variable.")
    add_arguments(p)
    p.set_defaults(func=_serve)


def _model_path(args: argparse.Namespace) -> int:
    from alignserve.engine.native.loader import model_folder

    try:
        folder, _ = model_folder(args.model)
    except (OSError, ValueError) as e:
        print(f"alignserve model-path: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def _add_model_path(sub: Any) -> None:
    p = sub.add_parser("model-path", help="print the Hugging Face folder both engines load",
                       description="Print the Hugging Face model folder that the native engine "
                       "and vLLM load for --model (default: the embedded SmolLM2-135M-Instruct), "
                       "converting a GGUF file into it on first use (~40 s, then cached).")
    p.add_argument("--model", default=None, help="a .gguf file or a model folder")
    p.set_defaults(func=_model_path)


def _add_eval(sub: Any) -> None:
    from alignserve.evaluation.command import add_arguments, main

    p = sub.add_parser("eval", help="evaluate the strategies on task sets through a live server",
                       description="Run the task sets (keywords, length, sentiment, "
                       "continuation) through a live server (--base-url, or --spawn one) with "
                       "each strategy configuration; write JSON, Markdown and an SVG plot of "
                       "reward against model tokens into --out.")
    add_arguments(p)
    p.set_defaults(func=main)


# Each entry adds one subcommand; others add train-value, eval and bench here.
SUBCOMMANDS: list[Callable[[Any], None]] = [_add_serve, _add_eval, _add_train_value,
                                            _add_model_path]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignserve",
                                     description="Decoding-time alignment inference server.")
    parser.add_argument("--version", action="version", version=f"alignserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
