"""Errors in OpenAI's body: {"error": {"message", "type", "param", "code"}}, never a traceback.

Routes raise `APIError`; FastAPI's own errors (validation 422, unknown route, wrong method)
and anything unexpected are turned into the same body by the handlers installed here. An
unexpected exception is answered by `CatchAll`, inside Starlette's outermost middleware, so
that it does not reach uvicorn: the connection stays usable (uvicorn resets it after an
exception), and the log gets one line (`log_unexpected`), not a traceback twice.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid

from fastapi import FastAPI, Request
from pydantic import BaseModel
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import internal_error

log = logging.getLogger("loraplex.server")

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error's body (the schema in /openapi.json)."""

    error: ErrorDetail


STATUSES = {
    400: "bad parameters, a malformed body (never 422) or prompt + max_tokens beyond the context "
         "(code context_length_exceeded)",
    401: "missing or invalid key",
    403: "admin routes disabled (no --admin-key), or a path outside the adapter roots",
    404: "unknown model or adapter",
    409: "the adapter name exists, the pin limit is reached, or the registry is busy",
    413: "body over --max-body-bytes",
    429: "--max-queue engine requests are waiting",
    500: "an internal error; the message names the log line",
    503: "loading, shutting down (draining), or the engine has stopped",
}


def documented_errors(*statuses: int) -> dict:
    """`responses=` for FastAPI: these statuses with the error body."""
    return {status: {"model": ErrorBody, "description": STATUSES[status]} for status in statuses}


def document_real_statuses(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body; this server answers 400 instead."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()  # cached by FastAPI after the first call: edited once
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema
    app.openapi = openapi


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """`on_error(status)` is told of every error answered (for metrics)."""

    def answer(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
        if on_error is not None:
            on_error(status)
        return error_response(status, message, param, code, headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return answer(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        # OpenAI answers 400 for a malformed body; name the first field at fault
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        return answer(400, f"{param}: {message}" if param else message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return answer(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))



def log_unexpected(what: str, ref: str, exc: BaseException) -> None:
    """One line for an unexpected error: what failed, its id for the client, the exception
    and where it was raised; the traceback only at debug level."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename}:{frame.lineno}" if frame else ""
    log.error("%s (%s): %s: %.300s%s", what, ref, type(exc).__name__, exc, where)
    log.debug("traceback of %s", ref, exc_info=exc)


class CatchAll:
    """ASGI middleware: an exception no handler took becomes a 500 in the API's error body
    (or, once a response has started, the end of its body), and is logged in one line."""

    def __init__(self, app, on_error=None):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            ref = f"err-{uuid.uuid4().hex[:16]}"  # the log line's id: the exception's text is not for the client
            log_unexpected(f"unexpected error on {scope.get('method')} {scope.get('path')}", ref, exc)
            if self.on_error is not None:
                self.on_error(500)
            if started:  # too late for a status: end the body so the connection stays in step
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send_error(send, 500, internal_error("internal server error", ref))


async def send_error(send, status: int, message: str) -> None:
    """An error response in the API's body, straight through ASGI (for middleware)."""
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
