"""The gate every HTTP request passes before FastAPI sees it (a plain ASGI middleware, so
streams pass through untouched):

1. a request id (the client's `X-Request-Id`, or a new one), echoed on the response and put on
   every log line written while serving it;
2. auth: every /v1 route (and /metrics, /health under --protect-metrics) needs
   `Authorization: Bearer KEY`; the token is compared with every configured key in constant
   time (hmac.compare_digest, no early exit), and a miss is a 401 before the body is read;
3. draining: once shutdown began, new /v1 requests get 503;
4. the body limit: a body over --max-body-bytes is answered 413 before anything parses it
   (from Content-Length when given, else while it streams in);
5. the access log, one line per request: id, method, route, status, latency, and for decodes
   the strategy, stream flag and token counts; plus `http_requests_total{route,status}`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alignserve.server.errors import error_response
from alignserve.server.logs import REQUEST_ID, request_id_from

access_log = logging.getLogger("alignserve.access")

# How much of an oversized body is read (and dropped) before the 413, so that clients which
# send the whole body before reading get the answer; past it the connection is closed.
_DRAIN_CAP = 8 * 1024 * 1024


@dataclass
class AccessRecord:
    """What the access log line says about one request; route handlers fill in the decode."""

    strategy: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None  # why it failed, when it did after the status went out


def access_record(scope: Scope) -> AccessRecord:
    state = scope.setdefault("state", {})
    record = state.get("access")
    if record is None:
        record = state["access"] = AccessRecord()
    return record


def bearer_ok(header: str | None, keys: list[str]) -> bool:
    """Does `Authorization: Bearer TOKEN` carry one of the keys? Every key is compared, in
    constant time each, whatever matched first."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    got = token.strip().encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(got, key.encode())
    return ok


def route_name(scope: Scope, known: frozenset[str] = frozenset()) -> str:
    """The matched route's template, or the path when it is a route's (a request refused
    before routing: 401, 413); `unmatched` otherwise (bounded label values)."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    return scope.get("path", "") if scope.get("path") in known else "unmatched"


class _BodyTooLarge(Exception):
    def __init__(self, size: int | None) -> None:
        self.size = size


# Outside /v1, vLLM's /tokenize and /detokenize run the tokenizer and chat template for anyone
# who asks: with API keys set they take one too (vLLM leaves them open).
KEYED_PATHS = ("/tokenize", "/detokenize")


def is_api_path(path: str) -> bool:
    """A route that takes the bearer key when the server has keys."""
    return path == "/v1" or path.startswith("/v1/") or path in KEYED_PATHS


class Gatekeeper:
    def __init__(self, app: ASGIApp, settings: Any, metrics: Any, lifecycle: Any,
                 route_paths: Callable[[], set[str]] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.lifecycle = lifecycle
        self._route_paths = route_paths
        self._known: frozenset[str] | None = None

    def known_paths(self) -> frozenset[str]:
        if self._known is None:
            self._known = frozenset(self._route_paths() if self._route_paths else ())
        return self._known

    def _needs_key(self, path: str) -> bool:
        if is_api_path(path):
            return True
        return bool(self.settings.protect_metrics) and path in ("/metrics", "/health")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = request_id_from(headers.get("x-request-id"))
        token = REQUEST_ID.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        record = access_record(scope)
        start = time.perf_counter()
        status: list[int] = [0]

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        try:
            await self._gate(scope, receive, send_tagged, headers)
        finally:
            self._account(scope, record, status[0], time.perf_counter() - start, rid)
            REQUEST_ID.reset(token)

    async def _gate(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        path = scope.get("path", "")
        keys = self.settings.api_keys()
        if keys and self._needs_key(path) and not bearer_ok(headers.get("authorization"), keys):
            response = error_response(401, "Invalid or missing API key: send "
                                      "`Authorization: Bearer <key>`.",
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        if self.lifecycle.draining and scope.get("method") == "POST":
            response = error_response(503, "The server is shutting down; retry the request.",
                                      headers={"Retry-After": "1", "Connection": "close"})
            await response(scope, receive, send)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                receive = await self._read_body(headers, receive)
            except _BodyTooLarge as too_large:
                limit = self.settings.max_body_bytes
                size = f"{too_large.size} bytes" if too_large.size else "larger than that"
                response = error_response(
                    413, f"The request body is {size}; this server accepts at most {limit} "
                    "bytes (--max-body-bytes).", headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _read_body(self, headers: Headers, receive: Receive) -> Receive:
        """Read the whole body (it is small: at most the limit), then replay it; the
        receive that follows is the connection's own (disconnect notices)."""
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = None
            if size is not None and size > limit:
                await self._drain(receive, size)
                raise _BodyTooLarge(size)
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body
                replay_first: Message = message
                break
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                if message.get("more_body", False):
                    await self._drain(receive, None, total)
                raise _BodyTooLarge(None)
            chunks.append(body)
            if not message.get("more_body", False):
                replay_first = {"type": "http.request", "body": b"".join(chunks),
                                "more_body": False}
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return replay_first
            return await receive()

        return replay

    @staticmethod
    async def _drain(receive: Receive, size: int | None, already: int = 0) -> None:
        if size is not None and size > _DRAIN_CAP:
            return
        got = already
        while got <= _DRAIN_CAP:
            message = await receive()
            if message["type"] != "http.request":
                return
            got += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _account(self, scope: Scope, record: AccessRecord, status: int, seconds: float,
                 rid: str) -> None:
        route = route_name(scope, self.known_paths())
        try:
            self.metrics.http_requests.labels(route, str(status)).inc()
        except Exception:  # metrics must never break a response
            logging.getLogger("alignserve.server").debug("http metric failed", exc_info=True)
        if not self.settings.access_log:
            return
        client = scope.get("client")
        fields: dict[str, Any] = {
            "method": scope.get("method"), "path": scope.get("path"), "route": route,
            "status": status, "latency_s": round(seconds, 6),
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        fields.update({k: v for k, v in asdict(record).items() if v is not None})
        access_log.info("%s %s %d %.3fs", scope.get("method"), scope.get("path"), status,
                        seconds, extra={"fields": fields, "request_id": rid})
