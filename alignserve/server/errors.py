"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

As vLLM's server does, `type` is a class-like name per status ("BadRequestError",
"NotFoundError", ...) and `code` is the HTTP status as an int, for every error this server sends.
Client mistakes are 4xx (validation is 400, never FastAPI's 422); only our own faults are 5xx.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignserve.decoding.base import StrategyInputError
from alignserve.engine.protocol import CapacityError, EngineError, RequestError

log = logging.getLogger("alignserve.server")

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raised anywhere in the server to answer with an error body (400 unless told)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    err_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def api_error_body(exc: APIError) -> dict[str, Any]:
    return error_body(exc.status, exc.message, exc.param)


def api_error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(api_error_body(exc), status_code=exc.status, headers=exc.headers or None)


# Pydantic names union members in error locations ("str", "list[str]", "function-after[...]",
# "ChatMessage"); our field names are snake_case, so anything else is a tag to drop.
def _is_field(part: str) -> bool:
    return part.isidentifier() and part == part.lower() and part not in _TYPE_TAGS


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes", "tuple"}


def dotted_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; None for the body itself."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_field(str(part)):
            out += ("." if out else "") + str(part)
    return out or None


def _validation_message(err: dict[str, Any], param: str | None) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"Unknown field `{param}`: this server does not support it."
    if kind == "missing":
        return f"Field `{param}` is required."
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid `{param}`: {msg}" if param else msg


def validation_error(errors: list[dict[str, Any]], prefix: str = "") -> APIError:
    """The first pydantic error as an APIError; `prefix` places nested models ("alignment")."""
    err = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if err.get("type") == "json_invalid":
        detail = err.get("ctx", {}).get("error", "could not parse")
        return APIError(f"The request body is not valid JSON: {detail}")
    param = dotted_param(err.get("loc", ()))
    if param is None and not prefix and err.get("type") in (
            "model_attributes_type", "dict_type", "missing"):
        return APIError("The request body must be a JSON object.")
    # A union field fails once per member: say all the ways it could have been right.
    same = [e for e in errors if dotted_param(e.get("loc", ())) == param]
    message = _validation_message(err, _prefixed(prefix, param))
    for other in same[1:]:
        extra = str(other.get("msg", "")).removeprefix("Value error, ")
        if extra and extra not in message:
            message += f"; or {extra}"
    return APIError(message, param=_prefixed(prefix, param))


def _prefixed(prefix: str, param: str | None) -> str | None:
    if not prefix:
        return param
    if not param:
        return prefix
    return prefix + (param if param.startswith("[") else "." + param)


def as_api_error(exc: BaseException) -> APIError:
    """Any failure of a request, as the error its client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, StrategyInputError):
        return APIError(exc.message, param=exc.param)
    if isinstance(exc, CapacityError):  # can never fit: the client must ask for less
        return APIError(f"The request does not fit in this server's KV cache: {exc}")
    if isinstance(exc, RequestError):  # the engine's own validation of the parameters
        return APIError(f"The engine refused the request: {exc}")
    if isinstance(exc, EngineError):  # e.g. out of KV memory right now: retry later
        return APIError(f"The engine cannot serve this request now: {exc}", status=503,
                        headers={"Retry-After": "1"})
    log.error("request failed", exc_info=exc)
    return APIError(f"Internal server error: {type(exc).__name__}: {exc}", status=500)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(api_error_body(err), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"No route {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        return JSONResponse(
            error_body(exc.status_code, message), status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Reached only for bugs: log the traceback, answer 500, keep serving.
        return api_error_response(as_api_error(exc))
