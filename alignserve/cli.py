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
    import uvicorn

    from alignserve.server.app import create_app
    from alignserve.server.settings import from_args

    settings = from_args(args)
    try:
        settings.reward_model_pairs()
    except ValueError as e:
        print(f"alignserve serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.engine == "native":
        from alignserve.engine.native.engine import NativeEngine

        engine = NativeEngine.load(model=settings.model, device=settings.device,
                                   kv_cache_gib=settings.kv_cache_gib,
                                   max_model_len=settings.max_model_len)
    else:  # the vllm adapter plugs in here
        print(f"alignserve serve: engine {settings.engine!r} is not available", file=sys.stderr)
        return 2
    app = create_app(engine, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _add_serve(sub: Any) -> None:
    from alignserve.server.settings import add_arguments

    p = sub.add_parser("serve", help="run the OpenAI-compatible server",
                       description="Serve the OpenAI-compatible API with the `alignment` "
                       "extension. Every flag also reads an ALIGNSERVE_* environment variable.")
    add_arguments(p)
    p.set_defaults(func=_serve)


# Each entry adds one subcommand; others add train-value, eval and bench here.
SUBCOMMANDS: list[Callable[[Any], None]] = [_add_serve]


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
