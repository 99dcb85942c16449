"""loraplex on Ray Serve: many replicas, each request routed to a replica that holds its adapter.

    client --HTTP--> Ray proxy --> LoraplexIngress --handle.options(multiplexed_model_id=model,
                                   (any replica)      stream=True)--> LoraplexReplica x N
                                                                      (one engine each)

`LoraplexReplica` holds one loraplex server (`ServerState` and the app of `create_app`, the
same routes, schemas, auth, errors and SSE as `loraplex serve`) and runs each request through
that app in-process, as ASGI, passing the response on chunk by chunk. Its adapters are Ray
Serve multiplexed models: `serve.multiplexed(max_num_models_per_replica=N)` registers the
adapter `serve.get_multiplexed_model_id()` names (the directory of that name under the
adapter root) on the replica's first request for it, and Ray's LRU eviction unloads it from
the replica's registry, draining first: the eviction waits for the requests using the adapter
(up to `drain_timeout_s`), then unloads it without force, so nothing running is cut. Ray's
router sends a request for an adapter to a replica that holds it, else to the replica holding
the fewest (see deploy/ray/README.md for what it does and does not guarantee). Every response
names its replica in the `x-loraplex-replica` header. The base model's names are not
multiplexed: those requests go to any replica.

`LoraplexIngress` does no routing of its own: for POST /v1/completions, /v1/chat/completions,
/tokenize and /detokenize it reads `model` from the JSON body and makes it the request's
multiplexed model id (a request that already carries the `serve_multiplexed_model_id` header
keeps that one); every other route goes to any replica. It relays bytes both ways.

    serve run loraplex.integrations.ray_serve:app num_replicas=2 num_gpus=0 num_cpus=0.5  # the demo, CPU
    serve run loraplex.integrations.ray_serve:app model=/mnt/models/base adapter_root=/mnt/models/adapters \\
        num_replicas=4 max_adapters_per_replica=8                    # one GPU per replica
    serve deploy deploy/ray/serve_config.yaml                        # the same from a config file

Importing this module needs Ray Serve (`pip install 'loraplex[ray]'`); the ingress imports no
torch (the server modules are imported in the replicas and the builder only).
"""

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("loraplex.integrations.ray_serve needs Ray Serve: pip install 'loraplex[ray]'") from exc

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.responses import Response

log = logging.getLogger("loraplex.ray")

REPLICA_HEADER = "x-loraplex-replica"              # on every answer: the Ray replica id that made it
MULTIPLEXED_HEADER = "serve_multiplexed_model_id"  # Ray Serve's header (also spelled with hyphens)
MODEL_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})
_NOTHING = object()
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"})


# ----------------------------------------------------------------------------------------
# the replica: one engine, adapters as multiplexed models
# ----------------------------------------------------------------------------------------


class AdapterLease:
    """What Ray's multiplexer holds for one adapter registered on a replica. Requests hold it
    (`acquire` / `release`) from before they enter the app until their response's last byte;
    Ray calls its `__del__` when it evicts the adapter (LRU): new requests no longer get it,
    the eviction waits for those holding it (at most `drain_timeout_s`; what still runs then
    is drained by the registry, which lets it finish), then unloads the adapter.

    `__del__` is an instance attribute, not a finalizer: Ray awaits it on eviction; garbage
    collection never calls it (a replica that stops takes its whole registry with it)."""

    def __init__(self, name: str, unload, drain_timeout_s: float):
        self.name, self._unload, self.drain_timeout_s = name, unload, drain_timeout_s
        self.users = 0
        self.evicted = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.__del__ = self._evict

    def acquire(self) -> bool:
        if self.evicted:
            return False
        self.users += 1
        self._idle.clear()
        return True

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._idle.set()

    async def _evict(self) -> None:
        self.evicted = True
        if self.users:
            log.info("adapter %s evicted by Ray Serve's multiplexer: waiting for its %d request(s)",
                     self.name, self.users)
            try:
                await asyncio.wait_for(self._idle.wait(), self.drain_timeout_s)
            except asyncio.TimeoutError:
                log.warning("adapter %s: %d request(s) still running after %gs; unloading (they finish "
                            "first)", self.name, self.users, self.drain_timeout_s)
        await self._unload(self.name)


async def run_asgi(app, scope: dict, body: bytes, extra_headers: list[tuple[bytes, bytes]] = ()):
    """Run one HTTP request through the ASGI `app` in this process: yields the response's
    head, {"status", "headers", "body", "more_body"} (its first body part when the app had
    already sent it), then each further body part (bytes) as the app sends it. Closing the
    generator early is the client leaving: the app's `receive` then says http.disconnect (a
    stream aborts its engine requests) and the app is given a moment to finish."""
    messages: asyncio.Queue = asyncio.Queue(maxsize=64)
    gone = asyncio.Event()
    body_given = False

    async def receive():
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.ensure_future(run())
    started, ahead = False, _NOTHING
    try:
        while True:
            message, ahead = (await messages.get() if ahead is _NOTHING else ahead), _NOTHING
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                head = {"status": message["status"], "headers": [*message.get("headers", ()), *extra_headers],
                        "body": b"", "more_body": True}
                if not messages.empty():  # the body is there already (a whole JSON answer): one hand-off
                    ahead = messages.get_nowait()
                    if ahead is not None and ahead["type"] == "http.response.body":
                        head["body"] = ahead.get("body", b"")
                        head["more_body"] = ahead.get("more_body", False)
                        ahead = _NOTHING
                yield head
                if not head["more_body"]:
                    break
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        if not started:  # the app ended without answering (it answers every error itself)
            await asyncio.wait({task}, timeout=5)
            error = task.exception() if task.done() and not task.cancelled() else None
            log.error("the app gave no response to %s %s (%r)", scope.get("method"), scope.get("path"), error)
            payload = json.dumps({"error": {"message": "internal server error", "type": "internal_error",
                                            "param": None, "code": None}}).encode()
            yield {"status": 500, "headers": [(b"content-type", b"application/json"), *extra_headers],
                   "body": payload, "more_body": False}
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5)
        if not task.done():
            task.cancel()


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("loraplex")
    if not logger.handlers:  # Ray keeps each worker's stderr in its logs (and shows it on the driver)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def keys_from_env(config) -> None:
    """The keys the application's arguments leave unset, from the replica's environment as
    `loraplex serve` reads them (LORAPLEX_API_KEY=k1,k2, LORAPLEX_ADMIN_KEY, LORAPLEX_METRICS_KEY):
    secrets then stay out of the Serve config (e.g. a Kubernetes Secret in the Ray pods' env)."""
    if not config.api_keys and os.environ.get("LORAPLEX_API_KEY"):
        config.api_keys = [k.strip() for k in os.environ["LORAPLEX_API_KEY"].split(",") if k.strip()]
    for field, var in (("admin_key", "LORAPLEX_ADMIN_KEY"), ("metrics_key", "LORAPLEX_METRICS_KEY")):
        if getattr(config, field) is None and os.environ.get(var):
            setattr(config, field, os.environ[var])


@serve.deployment(name="LoraplexReplica")
class LoraplexReplica:
    """One loraplex server (model, registry, engine, app) per replica; see the module's doc."""

    async def __init__(self, config, adapter_root: str, max_adapters: int, drain_timeout_s: float = 30.0):
        from ..server.app import create_app
        from ..server.state import ServerState

        _configure_logging(config.log_level)
        keys_from_env(config)
        config.check()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.drain_timeout_s = drain_timeout_s
        self.state = ServerState(config)
        self.app = create_app(self.state, start=False)  # started here, stopped in __del__
        self.roots = [Path(adapter_root).resolve()]
        self._header = [(REPLICA_HEADER.encode(), self.replica_id.encode())]
        started = time.monotonic()
        self.state.start(background=True)  # on this event loop: the engine process's outputs are read on it
        while not self.state.ready.is_set():
            if self.state.failed:
                raise RuntimeError(f"loraplex replica {self.replica_id}: {self.state.failed}")
            await asyncio.sleep(0.05)

        async def load_adapter(model_id: str) -> AdapterLease:
            return await self._register(model_id)

        # wired here, not on the class: the limit is the deployment's argument (Ray detects it either way)
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)
        log.info("replica %s ready in %.1f s: %s, at most %d adapters from %s", self.replica_id,
                 time.monotonic() - started, self.state.model_name, max_adapters, self.roots[0])

    async def _register(self, model_id: str) -> AdapterLease:
        """The multiplexer's loader: register the adapter directory `model_id` names under the
        adapter root (validated as --lora-resolve-root names and files are), unless registered."""
        from ..server import resolver
        from ..server.errors import APIError

        if not await resolver.load_on_first_request(self.state, model_id, roots=self.roots):
            raise APIError(404, f"the model '{model_id}' does not exist", param="model",
                           code="model_not_found")
        log.info("adapter %s registered on replica %s (Ray Serve multiplexing)", model_id, self.replica_id)
        return AdapterLease(model_id, self._unload, self.drain_timeout_s)

    async def _unload(self, name: str) -> None:
        from ..server import admin_api
        from ..server.errors import APIError

        if self.state.draining:  # the replica is stopping: the registry goes with it
            return
        try:
            await admin_api.unload(self.state, name, force=False)
            log.info("adapter %s unloaded from replica %s (evicted, drained)", name, self.replica_id)
        except APIError as exc:  # unloaded meanwhile (an admin)
            log.info("adapter %s evicted from replica %s: %s", name, self.replica_id, exc.message)

    async def _lease(self, model_id: str) -> AdapterLease:
        from ..server import resolver
        from ..server.errors import APIError

        for _ in range(3):  # one evicted between its lookup and this request's hold: load it again
            lease = await self.get_adapter(model_id)
            if lease.acquire():
                break
        else:
            raise APIError(503, f"the model '{model_id}' is being evicted on this replica; retry")
        if not self.state.registry.has(model_id):  # unloaded behind the multiplexer's back (an admin): again
            try:
                await resolver.load_on_first_request(self.state, model_id, roots=self.roots)
            except BaseException:
                lease.release()
                raise
        return lease

    async def _admit(self, scope: dict, model_id: str):
        """(app, lease) for a request whose multiplexed model id names an adapter: the API key
        is checked first (an unauthenticated client makes nothing load or evict), then the
        adapter is registered (or found) and held; an error becomes the app's error response.
        A name with no directory under the adapter root loads nothing: the app answers it
        (404, unless an admin registered such an adapter on this replica)."""
        from ..server import auth, resolver
        from ..server.errors import APIError, error_response

        try:
            await auth.require_api_key.dependency(Request({**scope, "app": self.app}))
            if not self.state.registry.has(model_id) and \
                    await asyncio.to_thread(resolver.find_adapter_dir, model_id, self.roots) is None:
                return self.app, None
            return self.app, await self._lease(model_id)
        except APIError as exc:
            self.state.metrics.observe_error(exc.status)
            return error_response(exc.status, exc.message, exc.param, exc.code), None

    async def handle_request(self, request: dict):
        """One HTTP request (method, path, query_string, headers, body, client) through this
        replica's app: yields the response's head, then its body parts (see `run_asgi`)."""
        path = request["path"]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": request["method"], "scheme": request.get("scheme", "http"), "path": path,
                 "raw_path": path.encode(), "root_path": "", "query_string": request["query_string"],
                 "headers": request["headers"], "client": request.get("client"), "server": None}
        app, lease = self.app, None
        model_id = serve.get_multiplexed_model_id()
        if model_id and not self.state.is_base_model(model_id):
            app, lease = await self._admit(scope, model_id)
        try:
            async for part in run_asgi(app, scope, request["body"], self._header):
                yield part
        finally:
            if lease is not None:
                lease.release()

    def check_health(self) -> None:
        """Ray restarts a replica whose engine has stopped (failing steps alone do not count:
        the app keeps admitting requests, each a chance to find the engine working again)."""
        if self.state.failed or not self.state.async_engine.running:
            why = self.state.failed or self.state.async_engine.health
            raise RuntimeError(f"the engine is not running: {why}")

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is not None and not state.draining:
            state.shutdown()


# ----------------------------------------------------------------------------------------
# the ingress: the request's model becomes its multiplexed model id
# ----------------------------------------------------------------------------------------


class _Relay(Response):
    """The replica's response as it arrives (the head, then each part); leaving early cancels
    the replica's request (a stream's engine requests are aborted there)."""

    def __init__(self, head: dict, rest):
        self.status_code = head["status"]
        self.raw_headers = [(k, v) for k, v in head["headers"] if k.lower() not in HOP_BY_HOP]
        self.background = None
        self.head, self.rest = head, rest

    async def __call__(self, scope, receive, send) -> None:
        done = not self.head["more_body"]
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.head["body"], "more_body": not done})
            if not done:
                async for part in self.rest:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
                done = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not done:
                self.rest.cancel()


def _unavailable(message: str) -> Response:
    body = {"error": {"message": message, "type": "service_unavailable", "param": None, "code": None}}
    return Response(json.dumps(body), status_code=503, media_type="application/json")


_ingress_api = FastAPI(title="loraplex on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="LoraplexIngress")
@serve.ingress(_ingress_api)
class LoraplexIngress:
    """Relays every request to a replica (`/docs` and `/openapi.json` too: the replica's app
    answers them), with the body's `model` as the multiplexed model id on the model routes."""

    def __init__(self, replicas, base_names: list[str], max_body_bytes: int):
        self.replicas = replicas
        self.base_names = frozenset(base_names)
        self.max_body_bytes = max_body_bytes

    def model_id(self, request: Request, path: str, body: bytes) -> str:
        """The multiplexed model id: the header's, if the request has one; else the adapter
        that the body's `model` names on a model route; "" for none (the base model)."""
        for key, value in request.headers.items():
            if key.replace("-", "_") == MULTIPLEXED_HEADER:
                return value
        if request.method != "POST" or path not in MODEL_ROUTES:
            return ""
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):  # the app answers 400
            return ""
        return model if isinstance(model, str) and model and model not in self.base_names else ""

    @_ingress_api.api_route("/{path:path}", include_in_schema=False,
                            methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def relay(self, request: Request):
        scope = request.scope
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:  # the replica's app answers 413 (it sees more than its limit)
                break
        body = bytes(body)
        model_id = self.model_id(request, path, body)
        forwarded = {"method": request.method, "scheme": scope.get("scheme", "http"), "path": path,
                     "query_string": scope.get("query_string", b""), "body": body,
                     "headers": [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP],
                     "client": tuple(scope["client"]) if scope.get("client") else None}
        multiplexed = {"multiplexed_model_id": model_id} if model_id else {}
        handle = self.replicas.options(stream=True, **multiplexed)
        parts = handle.handle_request.remote(forwarded)
        try:
            head = await parts.__anext__()
        except Exception as exc:  # no replica answered (it died, or is being replaced)
            log.warning("no replica answered %s %s: %s: %s", request.method, path, type(exc).__name__, exc)
            parts.cancel()
            return _unavailable("no replica could take the request; retry")
        return _Relay(head, parts)


# ----------------------------------------------------------------------------------------
# building the application
# ----------------------------------------------------------------------------------------


class LoraplexRayArgs(BaseModel):
    """The application's arguments: `serve run ...:app key=value ...`, a Serve config file's
    `args:`, or `build_app(LoraplexRayArgs(...))`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None                  # the model directory (one path on every node); None: the demo
    adapter_root: str | None = None           # one adapter directory per name requests use; None = the demo's
    served_model_name: str | None = None      # the base model's name (default: the directory's; the demo's)
    num_replicas: int = 1
    max_adapters_per_replica: int | None = None  # Ray's max_num_models_per_replica; None = max_gpu_adapters
    num_gpus: float = 1.0                     # per replica (0: on CPU, as the demo can run)
    num_cpus: float = 1.0                     # per replica
    max_ongoing_requests: int | None = None   # per replica, then Ray queues; None = server.max_num_seqs
    drain_timeout_s: float = 30.0             # an evicted adapter's requests get this long before it unloads
    server: dict[str, Any] = {}               # more ServerConfig fields: max_gpu_adapters, dtype, ...
    ray_actor_options: dict[str, Any] = {}    # merged over the replicas' (runtime_env, accelerator_type, ...)
    replica_options: dict[str, Any] = {}      # more @serve.deployment options for them (autoscaling_config)
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.5

    @field_validator("server", "ray_actor_options", "replica_options", mode="before")
    @classmethod
    def _json(cls, value):
        return json.loads(value) if isinstance(value, str) else value  # from the command line: JSON


def server_config(args: LoraplexRayArgs):
    """The replicas' ServerConfig from the arguments (the demo when no model is given)."""
    from ..demo import MODEL_DIR
    from ..server.config import ServerConfig
    from ..server.state import DEMO_NAME

    fields = dict(args.server)
    for name, why in (("adapters", "adapters come from adapter_root, registered on their first request"),
                      ("lora_resolve_roots", "give adapter_root instead"), ("model", "give it as `model`")):
        if name in fields:
            raise ValueError(f"server.{name} is not taken on Ray Serve: {why}")
    demo = args.model is None
    fields["model"] = str(MODEL_DIR) if demo else args.model
    fields["served_model_name"] = args.served_model_name or fields.get("served_model_name") or \
        (DEMO_NAME if demo else None)
    try:
        config = ServerConfig(**fields)
    except TypeError as exc:
        raise ValueError(f"server: {exc}") from None
    return config


def build_app(args: LoraplexRayArgs | dict | None = None):
    """The Serve application: the ingress bound to `num_replicas` loraplex replicas."""
    from ..demo import ADAPTERS_DIR

    args = args if isinstance(args, LoraplexRayArgs) else LoraplexRayArgs.model_validate(args or {})
    config = server_config(args)
    if args.adapter_root is None and args.model is not None:
        raise ValueError("adapter_root is required with a model: the directory whose subdirectories are the "
                         "adapters")
    adapter_root = args.adapter_root or str(ADAPTERS_DIR)
    max_adapters = args.max_adapters_per_replica
    if max_adapters is None:
        max_adapters = config.max_gpu_adapters
    if max_adapters < 1:
        raise ValueError("max_adapters_per_replica must be >= 1")
    if max_adapters > config.max_host_adapters:
        log.warning("max_adapters_per_replica (%d) > max_host_adapters (%d): some adapters registered on a "
                    "replica go back to disk and are read again on their next request", max_adapters,
                    config.max_host_adapters)
    base_names = [config.served_model_name or Path(config.model).name, *config.served_model_aliases]
    actor = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, **args.ray_actor_options}
    options = {"max_ongoing_requests": args.max_ongoing_requests or config.max_num_seqs,
               "graceful_shutdown_timeout_s": config.shutdown_timeout, "ray_actor_options": actor}
    if "autoscaling_config" not in args.replica_options:
        options["num_replicas"] = args.num_replicas
    replicas = LoraplexReplica.options(**{**options, **args.replica_options}).bind(
        config, adapter_root, max_adapters, args.drain_timeout_s)
    ingress = LoraplexIngress.options(
        num_replicas=args.ingress_replicas, max_ongoing_requests=max(1024, options["max_ongoing_requests"]),
        ray_actor_options={"num_cpus": args.ingress_num_cpus})
    return ingress.bind(replicas, base_names, config.max_body_bytes)


def app(args: dict):
    """The builder `serve run loraplex.integrations.ray_serve:app key=value ...` calls (and a
    Serve config file's `import_path`, with its `args:`); see LoraplexRayArgs."""
    return build_app(LoraplexRayArgs.model_validate(args))
