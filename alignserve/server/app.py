"""The FastAPI application: routes of API.md wired to the preparer, the runner and the renderers.

Around the routes: the Gatekeeper middleware (request ids, auth, body limit, access log), the
admission queue (running/waiting bounds, KV reservations: 429 past them) and the lifecycle
(drain and abort on shutdown). See README's "Production" section for the whole picture.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from alignserve import __version__
from alignserve.decoding.base import STRATEGIES
from alignserve.engine.protocol import Engine
from alignserve.server.admission import Admission, Overloaded, Ticket, engine_kv
from alignserve.server.errors import (
    APIError,
    api_error_response,
    as_api_error,
    install_error_handlers,
)
from alignserve.server.grammars import ServerGrammars
from alignserve.server.lifecycle import Lifecycle
from alignserve.server.metrics import ServerMetrics
from alignserve.server.middleware import Gatekeeper, access_record, is_api_path
from alignserve.server.prepare import STRATEGY_LIMITS, Prepared, Preparer
from alignserve.server.protocol import (
    STREAM_MODES,
    AlignmentInfo,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
    StrategyInfo,
    TokenizeRequest,
    TokenizeResponse,
)
from alignserve.server.render import Renderer
from alignserve.server.responses import ResponsesWire, responses_error, to_chat_request
from alignserve.server.runner import ClientGone, DecodeRun, collect
from alignserve.server.settings import ServerSettings
from alignserve.server.streaming import abort_reason, stream_chunks, stream_events

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


class DecodeStream(StreamingResponse):
    """A stream that gives its admission ticket back even when it never started (a client
    that left before the first byte); a started run gives it back itself."""

    def __init__(self, content: Any, on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# What each decode route may answer besides 200 (documented in /openapi.json).
DECODE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request, or over one of the server's limits (`param` names the field)"),
    401: _error("Missing or wrong API key"),
    404: _error("Unknown model"),
    408: _error("The request timed out (--request-timeout); its work was cancelled"),
    413: _error("Request body over --max-body-bytes"),
    429: _error("Too many requests waiting (--max-waiting-requests); see Retry-After"),
    500: _error("Server fault"),
    503: _error("Shutting down, or the engine cannot serve now; see Retry-After"),
}
LISTING_ERRORS: dict[int | str, dict[str, Any]] = {401: _error("Missing or wrong API key")}


def _sse_event(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream: a chunk, an error, or the closing [DONE]."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                                             {"$ref": "#/components/schemas/ErrorResponse"}]}}
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                           "data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def _decode_responses(model: type, chunk: type, end: str = "`data: [DONE]`"
                      ) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "The completion (JSON), or with `stream: "
                  "true` server-sent events, each a " + chunk.__name__ + " (or an error), "
                  "ending in " + end,
                  "content": {"text/event-stream": {"schema": _sse_event(chunk.__name__)}}},
            **DECODE_ERRORS}


def create_app(engine: Engine, settings: ServerSettings, rewards: Any = None,
               resources: Any = None, own_engine: bool = True) -> FastAPI:
    """`rewards`: a RewardRegistry (default: built-ins plus --reward-model); `resources`: the
    decoding.resources.DecodingResources strategies share (None: their built-in defaults);
    `own_engine`: the app's lifespan starts and closes the engine (False when another app
    serving the same engine owns it)."""
    import alignserve.decoding  # noqa: F401  (registers the strategies)

    rewards = default_rewards(settings) if rewards is None else rewards
    served = settings.served_model_name or engine.model_name
    kv = engine_kv(engine)
    admission = Admission(settings.max_running_requests, settings.max_waiting_requests,
                          kv[0] if kv else None)
    lifecycle = Lifecycle()
    metrics = ServerMetrics(engine, admission)
    preparer = Preparer(engine, settings, rewards, served, resources, kv=kv)
    grammars = ServerGrammars(engine, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)
        if own_engine and start is not None:
            await start()  # the engine's worker binds to this event loop
        amateurs = list((getattr(resources, "amateurs", None) or {}).values())
        if own_engine:
            for amateur in amateurs:  # served amateurs run on this loop too
                await amateur.start()
        try:
            yield
        finally:
            lifecycle.begin_drain()
            if lifecycle.runs:  # uvicorn gave up waiting: stop what is left, then close
                lifecycle.abort_all(APIError("The server is shutting down.", status=503))
                await asyncio.sleep(0.1)
            if own_engine:
                for amateur in amateurs:
                    await amateur.close()
                await engine.close()
                log.info("engine closed")
            grammars.close()

    app = FastAPI(title="alignserve", version=__version__, lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.admission, app.state.lifecycle = admission, lifecycle
    app.state.preparer = preparer
    install_error_handlers(app)
    app.add_middleware(Gatekeeper, settings=settings, metrics=metrics, lifecycle=lifecycle,
                       route_paths=lambda: {getattr(r, "path", "") for r in app.routes})
    if settings.allowed_origins:
        # Added last, so outermost: a browser's preflight (OPTIONS, no API key) is answered
        # before the Gatekeeper asks for a key, and every answer, errors too, gets the headers.
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=settings.allowed_methods or ["*"],
                           allow_headers=settings.allowed_headers or ["*"],
                           expose_headers=["X-Request-Id", "Retry-After"])

    def limits() -> dict[str, int | float | None]:
        out: dict[str, int | float | None] = {
            "max_n": settings.max_n, "max_candidates": settings.max_candidates,
            "max_top_k": settings.max_top_k, "max_lookahead": settings.max_lookahead,
            "max_beam": settings.max_beam, "max_rewards": settings.max_rewards,
            "max_tokens": settings.max_tokens_limit, "max_model_len": engine.max_model_len,
            "max_prompt_tokens": settings.max_prompt_tokens or engine.max_model_len - 1,
            "max_body_bytes": settings.max_body_bytes,
            "max_regex_chars": settings.max_regex_chars,
            "max_schema_bytes": settings.max_schema_bytes,
            "max_running_requests": settings.max_running_requests,
            "max_waiting_requests": settings.max_waiting_requests,
            "request_timeout_s": settings.request_timeout or None,
            "regex_timeout_s": settings.regex_timeout,
            "kv_cache_slots": kv[0] if kv else None,
            "max_grammar_bytes": settings.max_grammar_bytes,
            "grammar_compile_timeout_s": settings.grammar_compile_timeout,
            "grammar_cache_entries": settings.grammar_cache_entries,
        }
        return out

    def admit(prepared: Prepared) -> Ticket:
        try:
            return admission.enter(prepared.kv_slots)
        except Overloaded:
            raise APIError(
                f"The server is at capacity: {admission.running} requests running and "
                f"{admission.waiting} waiting (--max-running-requests "
                f"{settings.max_running_requests}, --max-waiting-requests "
                f"{settings.max_waiting_requests}). Retry after {settings.retry_after} s.",
                status=429, headers={"Retry-After": str(settings.retry_after)}) from None

    async def serve(prepared: Prepared, request: Request,
                    wire: ResponsesWire | None = None) -> Response:
        """Run one prepared request; `wire` reshapes a chat answer as a Responses answer."""
        record = access_record(request.scope)
        record.strategy, record.stream = prepared.strategy.name, prepared.decode.stream
        ticket = admit(prepared)
        loop = asyncio.get_running_loop()
        timeout = settings.request_timeout
        deadline = loop.time() + timeout if timeout > 0 else None
        tracker = metrics.tracker(prepared.strategy.name)
        renderer = Renderer(prepared, engine.tokenizer)
        runs: list[DecodeRun] = []

        def start() -> DecodeRun:
            run = DecodeRun(prepared, engine, tracker, resources, ticket=ticket,
                            deadline=deadline, timeout_s=timeout,
                            retry_after=settings.retry_after)
            runs.append(run)
            lifecycle.add(run)
            return run

        if prepared.decode.stream:
            def closed() -> None:
                if not runs:
                    ticket.release()

            if wire is not None:
                events = wire.events(stream_chunks(start, renderer, tracker, record))
            else:
                events = stream_events(start, renderer, tracker, record)
            return DecodeStream(events, closed)
        run = start()
        try:
            got = await collect(run, request, settings.disconnect_poll_s)
            if got.summary is None or len(got.finals) != prepared.choices:
                raise RuntimeError(f"strategy {prepared.strategy.name} returned "
                                   f"{len(got.finals)} choices of {prepared.choices}"
                                   + ("" if got.summary else " and no summary"))
        except ClientGone:
            tracker.abort("disconnect")
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:  # noqa: BLE001  (every failure becomes an error body)
            tracker.abort(abort_reason(run))
            err = as_api_error(exc)
            record.error = err.message
            return api_error_response(err)
        tracker.finish(got.summary, got.finals, run.reward_seconds())
        record.prompt_tokens = got.summary.prompt_tokens
        record.completion_tokens = sum(len(f.token_ids) for f in got.finals)
        data = renderer.response(got.finals, got.summary, got.prompt_logprobs)
        return JSONResponse(wire.body(data) if wire is not None else data)

    def request_id(request: Request) -> str:
        return str(request.scope.get("state", {}).get("request_id") or "")

    @app.post("/v1/chat/completions",
              responses=_decode_responses(ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        prepared = preparer.chat(body, request_id(request))
        await grammars.attach(prepared)
        return await serve(prepared, request)

    @app.post("/v1/completions", responses=_decode_responses(CompletionResponse,
                                                              CompletionChunk))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prepared = preparer.completion(body, request_id(request))
        await grammars.attach(prepared)
        return await serve(prepared, request)

    @app.post("/v1/responses", responses=_decode_responses(ResponseObject, ResponseStreamEvent,
                                                           end="response.completed"))
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        chat = to_chat_request(body)
        try:
            prepared = preparer.chat(chat, request_id(request))
            await grammars.attach(prepared)
        except APIError as err:
            raise responses_error(err) from None
        ignored = body.ignored_fields()
        if ignored:
            log.debug("accepted and ignored: %s", ", ".join(ignored))
        return await serve(prepared, request, ResponsesWire(body, prepared.model))

    @app.api_route("/v1/responses/{response_id:path}", methods=["GET", "POST", "DELETE"],
                   include_in_schema=False)
    async def stored_response(response_id: str) -> Response:
        # retrieve, delete, cancel, input_items: the SDK's calls on a stored response
        raise APIError(f"No response `{response_id.split('/')[0]}`: this server stores no "
                       "responses (`store` is accepted and ignored).", status=404)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=DECODE_ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        preparer.check_model(body.model)
        if body.messages is not None:
            chat = ChatCompletionRequest(
                messages=body.messages, tools=body.tools,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                chat_template_kwargs=body.chat_template_kwargs)
            _, _, _, ids = preparer.chat_prompt(chat)
        elif body.add_special_tokens:
            ids = engine.encode_prompt(body.prompt)
        else:
            ids = engine.encode(body.prompt)
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len,
                                tokens=ids, token_strs=strs)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=DECODE_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        preparer.check_model(body.model)
        preparer.check_vocab(body.tokens, "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    def model_card() -> ModelCard:
        return ModelCard(id=served, root=engine.model_name, max_model_len=engine.max_model_len)

    @app.get("/v1/models", response_model=ModelList, responses=LISTING_ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses={**LISTING_ERRORS, 404: _error("Unknown model")})
    async def model(model_id: str) -> ModelCard:
        if model_id != served:
            raise APIError(f"The model `{model_id}` does not exist.", param="model", status=404)
        return model_card()

    @app.get("/v1/alignment", response_model=AlignmentInfo, responses=LISTING_ERRORS)
    async def alignment() -> AlignmentInfo:
        strategies = [StrategyInfo(name=s.name, description=s.description, streams=s.streams,
                                   streams_description=STREAM_MODES.get(s.streams, s.streams),
                                   params=_limited_schema(s.params.model_json_schema(),
                                                          settings))
                      for s in sorted(STRATEGIES.values(), key=lambda s: s.name)]
        return AlignmentInfo(engine=getattr(engine, "kind", None),
                             strategies=strategies, rewards=rewards.describe(),
                             value_models=_named(resources, "value_models"),
                             amateurs=_named(resources, "amateurs"), limits=limits())

    @app.get("/health", response_model=HealthStatus,
             responses={503: {"model": HealthStatus, "description": "Cannot serve (or draining)"},
                        **LISTING_ERRORS})
    async def health() -> Response:
        if lifecycle.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        healthy = getattr(engine, "healthy", lambda: True)()
        return JSONResponse({"status": "ok" if healthy else "unavailable"},
                            status_code=200 if healthy else 503)

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text format"}, **LISTING_ERRORS})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _limited_schema(schema: dict[str, Any], settings: ServerSettings) -> dict[str, Any]:
    """A strategy's params schema with the server's limits as the maxima it states."""
    props = schema.get("properties", {})
    for key, setting in STRATEGY_LIMITS.items():
        prop = props.get(key)
        if isinstance(prop, dict):
            limit = getattr(settings, setting)
            prop["maximum"] = min(prop.get("maximum", limit), limit)
            if isinstance(prop.get("default"), int) and prop["default"] > limit:
                prop["default"] = limit
    return schema


def _openapi(app: FastAPI, settings: ServerSettings) -> dict[str, Any]:
    """FastAPI's schema, told the truth: validation errors are 400 (never 422), errors have
    OpenAI's shape, and /v1 routes take a bearer key when the server has keys."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="OpenAI-compatible API with the `alignment` extension.")
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
            if settings.api_keys() and is_api_path(path):
                op["security"] = [{"bearer": []}]
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for model in (ChatCompletionChunk, CompletionChunk, ResponseStreamEvent):  # streams
        one = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in one.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault(model.__name__, one)
    if settings.api_keys():
        components.setdefault("securitySchemes", {})["bearer"] = {"type": "http",
                                                                  "scheme": "bearer"}
    return schema
