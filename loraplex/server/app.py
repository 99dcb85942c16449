"""The FastAPI application: routes, auth, body limit, CORS, errors, health, readiness, metrics."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from . import admin_api, openai_api
from .auth import require_metrics_key
from .errors import CatchAll, document_real_statuses, install_error_handlers, send_error
from .state import ServerState


class BodyLimit:
    """413 for bodies over `limit` bytes, by Content-Length or while streaming them in (ASGI)."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit: int, on_error):
        self.app, self.limit, self.on_error = app, limit, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyLimit.TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyLimit.TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        self.on_error(413)
        await send_error(send, 413, f"request body larger than {self.limit} bytes")


def create_app(state: ServerState, start: bool = True) -> FastAPI:
    """The app over `state`; with `start`, startup loads the model in the background."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start:
            state.start(background=True)
        yield
        state.shutdown()

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan)
    app.state.loraplex = state
    install_error_handlers(app, on_error=state.metrics.observe_error)
    document_real_statuses(app)
    app.include_router(openai_api.router)
    app.include_router(admin_api.router)
    # outermost last: CORS (on every answer, errors too) -> CatchAll -> BodyLimit (its 413 is its own)
    app.add_middleware(BodyLimit, limit=state.config.max_body_bytes, on_error=state.metrics.observe_error)
    app.add_middleware(CatchAll, on_error=state.metrics.observe_error)
    if state.config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    @app.get("/health")
    async def health():
        """The process is alive (even while the model loads)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """200 once the model is loaded and warmed, while the engine is healthy (its thread runs and
        the last UNHEALTHY_AFTER_FAILED_STEPS steps did not all fail) and the server is not
        shutting down; else 503 with the status and, for a failure, why."""
        status, error = "ready", None
        if state.draining:
            status = "draining"
        elif state.failed:
            status, error = "failed", state.failed
        elif not state.ready.is_set():
            status = "loading"
        elif (error := state.async_engine.health) is not None:
            status = "unhealthy"
        if status == "ready":
            return {"status": status, "model": state.model_name}
        return Response(json.dumps({"status": status, "error": error}), status_code=503,
                        media_type="application/json")

    @app.get("/metrics", dependencies=[require_metrics_key])
    def metrics():
        # a plain def runs in the thread pool: routers scrape often, the event loop keeps streaming
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app
