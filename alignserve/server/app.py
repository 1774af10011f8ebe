"""The FastAPI application: routes of API.md wired to the preparer, the runner and the renderers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from alignserve import __version__
from alignserve.decoding.base import STRATEGIES
from alignserve.engine.protocol import Engine
from alignserve.server.errors import APIError, api_error_body, as_api_error, install_error_handlers
from alignserve.server.metrics import ServerMetrics
from alignserve.server.prepare import Prepared, Preparer
from alignserve.server.protocol import (
    STREAM_MODES,
    AlignmentInfo,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    StrategyInfo,
)
from alignserve.server.render import Renderer
from alignserve.server.runner import ClientGone, DecodeRun, collect
from alignserve.server.settings import ServerSettings
from alignserve.server.streaming import stream_events

log = logging.getLogger("alignserve.server")

# nginx's code for "client closed request": never seen by the client, only by access logs.
CLIENT_CLOSED = 499


def default_rewards(settings: ServerSettings) -> Any:
    """The built-in rewards plus the reward models named on the command line."""
    from alignserve.rewardmodels.compose import RewardRegistry

    registry = RewardRegistry.default()
    for name, path in settings.reward_model_pairs():
        registry.add_model(name, path, settings.device)
    return registry


def _named(resources: Any, attr: str) -> list[dict[str, Any]]:
    """The names a DecodingResources offers under `attr` (none without resources)."""
    return [{"name": name} for name in getattr(resources, attr, None) or {}]


def create_app(engine: Engine, settings: ServerSettings, rewards: Any = None,
               resources: Any = None) -> FastAPI:
    """`rewards`: a RewardRegistry (default: built-ins plus --reward-model); `resources`: the
    decoding.resources.DecodingResources strategies share (None: their built-in defaults)."""
    import alignserve.decoding  # noqa: F401  (registers the strategies)

    rewards = default_rewards(settings) if rewards is None else rewards
    served = settings.served_model_name or engine.model_name
    metrics = ServerMetrics(engine)
    preparer = Preparer(engine, settings, rewards, served, resources)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)
        if start is not None:
            await start()  # the engine's worker binds to this event loop
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="alignserve", version=__version__, lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    install_error_handlers(app)

    async def authorized(request: Request) -> None:
        expected = f"Bearer {settings.api_key}"
        if settings.api_key and request.headers.get("authorization") != expected:
            raise APIError("Invalid or missing API key.", status=401)

    async def serve(prepared: Prepared, request: Request) -> Response:
        tracker = metrics.tracker(prepared.strategy.name)
        renderer = Renderer(prepared, engine.tokenizer)
        if prepared.decode.stream:
            def start() -> DecodeRun:
                return DecodeRun(prepared, engine, tracker, resources)

            return StreamingResponse(stream_events(start, renderer, tracker),
                                     media_type="text/event-stream")
        run = DecodeRun(prepared, engine, tracker, resources)
        try:
            got = await collect(run, request, settings.disconnect_poll_s)
            if got.summary is None or len(got.finals) != prepared.decode.n:
                raise RuntimeError(f"strategy {prepared.strategy.name} returned "
                                   f"{len(got.finals)} choices for n={prepared.decode.n}"
                                   + ("" if got.summary else " and no summary"))
        except ClientGone:
            tracker.abort()
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:  # noqa: BLE001  (every failure becomes an error body)
            tracker.abort()
            err = as_api_error(exc)
            return JSONResponse(api_error_body(err), status_code=err.status)
        tracker.finish(got.summary, got.finals, run.reward_seconds())
        return JSONResponse(renderer.response(got.finals, got.summary))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serve(preparer.chat(body), request)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serve(preparer.completion(body), request)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        card = ModelCard(id=served, root=engine.model_name, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/alignment", dependencies=[Depends(authorized)])
    async def alignment() -> dict[str, Any]:
        strategies = [StrategyInfo(name=s.name, description=s.description, streams=s.streams,
                                   streams_description=STREAM_MODES.get(s.streams, s.streams),
                                   params=s.params.model_json_schema())
                      for s in sorted(STRATEGIES.values(), key=lambda s: s.name)]
        limits = {"max_n": settings.max_n, "max_candidates": settings.max_candidates,
                  "max_rewards": settings.max_rewards, "max_tokens": settings.max_tokens_limit,
                  "max_model_len": engine.max_model_len}
        return AlignmentInfo(strategies=strategies, rewards=rewards.describe(),
                             value_models=_named(resources, "value_models"),
                             amateurs=_named(resources, "amateurs"), limits=limits).model_dump()

    @app.get("/health")
    async def health() -> Response:
        healthy = getattr(engine, "healthy", lambda: True)()
        return JSONResponse({"status": "ok" if healthy else "unavailable"},
                            status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
