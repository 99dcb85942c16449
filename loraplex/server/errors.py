"""Errors in OpenAI's body: {"error": {"message", "type", "param", "code"}}, never a traceback.

Routes raise `APIError`; FastAPI's own errors (validation 422, unknown route, wrong method)
and anything unexpected are turned into the same body by the handlers installed here.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        ref = f"err-{uuid.uuid4().hex[:16]}"  # the log line's id: the exception's text is not for the client
        log.error("unexpected error on %s %s (request %s)", request.method, request.url.path, ref, exc_info=exc)
        return answer(500, internal_error("internal server error", ref))
