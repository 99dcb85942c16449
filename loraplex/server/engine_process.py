"""The engine in its own process, so that the API server and the engine do not share a GIL.

    API process (uvicorn, the app)              engine process (spawned)
    EngineClient.submit() ---- ctl pipe ----->  commands -> AsyncEngine (engine thread, steps)
    OutputStreams  <------- out pipe, one ----  one message per step: every request's outputs,
                            message per step    the step stats, the queue depth and health
    RegistryClient ---- ctl pipe (calls) ---->  AdapterRegistry (calls on worker threads)
    metrics <---- ctl pipe (adapter events) --  registry events

The API process keeps the tokenizer (prompts, chat templates, and the text of outputs: the
engine sends token ids; only requests with stop strings are detokenized in the engine, where a
stop string must end generation), the metrics and the HTTP side. The engine process owns the
model, the KV cache, the adapter registry and the engine thread (AsyncEngine, unchanged: the
same health and failure rules). The out pipe is read on the event loop itself (add_reader),
so a step's outputs reach their streams without another thread taking the GIL.

The engine process ignores SIGINT and SIGTERM: the API process drains first and then tells it
to stop (`shutdown`). It exits by itself when its pipes close (the API process died). If the
engine process dies, every request waiting on it fails, calls raise EngineStoppedError and
`health` says so (/ready 503).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import AsyncIterator, Sequence

from ..engine.adapters import UnknownAdapterError
from ..engine.async_engine import AsyncEngine, EngineStoppedError, OutputStream, consume, deliver, engine_detokenizes
from ..engine.engine import check_limits
from ..engine.grammar import GrammarError
from ..engine.request import FinishReason, Request, RequestOutput
from ..engine.sampling import SamplingParams
from .config import ServerConfig

log = logging.getLogger("loraplex.server")

# AdapterRegistry methods the API process may call (anything else is refused in the engine process).
REGISTRY_CALLS = frozenset({"register", "unload", "merge", "export", "pin", "info", "list", "usage", "names",
                            "resident_and_waiting"})
STATUS_EVERY_S = 0.05  # the engine process reports a changed queue depth at most this often (health at once)


# -- wire format: outputs as plain tuples (pickled per step; a dataclass costs more) ------------

def send(conn: Connection, message) -> None:
    """Connection.send without multiprocessing's ForkingPickler, whose set-up (a copy of the
    reducer table per message) cost more than pickling a request; nothing sent here needs it."""
    conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def pack(out: RequestOutput) -> tuple:
    return (out.request_id, out.token_ids, out.text, out.logprobs, out.finished,
            None if out.finish_reason is None else out.finish_reason.value, out.prompt_tokens,
            out.completion_tokens, out.error, out.queue_seconds, out.stop_reason, out.prompt_logprobs,
            out.cached_tokens)


def unpack(t: tuple) -> RequestOutput:
    (request_id, token_ids, text, logprobs, finished, reason, prompt_tokens, completion_tokens, error,
     queue_seconds, stop_reason, prompt_logprobs, cached_tokens) = t
    return RequestOutput(request_id, token_ids, text, logprobs, finished,
                         None if reason is None else FinishReason(reason), prompt_tokens, completion_tokens,
                         cached_tokens, error, queue_seconds, stop_reason, prompt_logprobs)


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError with its type and text (for the log: the
    API side shows clients only what it shows for any unexpected error)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------------------
# the engine process
# ----------------------------------------------------------------------------------------


def engine_main(config: ServerConfig, ctl: Connection, out: Connection, reference_kernels: bool) -> None:
    """Entry point of the engine process: build, warm up, then serve commands until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the API process drains first, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..kernels import runtime

    # the kernel choice of the API process (tests on CPU run the references)
    with runtime.reference_kernels() if reference_kernels else contextlib.nullcontext():
        EngineServer(config, ctl, out).run()


class EngineServer:
    """The engine process's side: an AsyncEngine whose outputs go down the out pipe."""

    def __init__(self, config: ServerConfig, ctl: Connection, out: Connection):
        self.config, self.ctl, self.out = config, ctl, out
        self.ctl_lock = threading.Lock()   # main thread, call workers and registry events all send on ctl
        self.stats: list = []              # StepStats since the last out message (engine thread only)
        self.async_engine: AsyncEngine | None = None
        self.registry = None
        self.calls = ThreadPoolExecutor(4, thread_name_prefix="loraplex-admin")

    def send_ctl(self, message) -> None:
        with self.ctl_lock:
            try:
                send(self.ctl, message)
            except OSError:  # the API process is gone; the main loop sees EOF and stops
                pass

    def run(self) -> None:
        from .state import build_engine

        try:
            _, registry, engine, model_name = build_engine(  # the tokenizer: the engine has it
                self.config, on_adapter_event=lambda *event: self.send_ctl(("event", *event)))
        except BaseException as exc:
            log.exception("engine process: startup failed")
            self.send_ctl(("failed", f"startup failed ({type(exc).__name__}); see the server log"))
            return
        self.registry = registry
        engine.on_step = lambda stats: self.stats.append(stats)  # self.stats is swapped per message
        self.async_engine = AsyncEngine(engine).start()
        self.send_ctl(("ready", {"model_name": model_name, "max_model_len": engine.max_model_len,
                                 "capacity_tokens": engine.allocator.capacity_tokens,
                                 "vocab_size": engine.model.config.vocab_size, "num_slots": registry.num_slots,
                                 "names": registry.names(), "pid": os.getpid()}))
        try:
            self.serve()
        finally:
            self.async_engine.shutdown()
            self.calls.shutdown(wait=False, cancel_futures=True)
            registry.close()
            self.send_ctl(("stopped",))

    def send_outputs(self, entries: list) -> None:
        """The AsyncEngine's sink (engine thread): one message per hand-off, with the stats."""
        stats, self.stats = self.stats, []
        items = [(request_id, pack(item) if isinstance(item, RequestOutput) else portable(item))
                 for request_id, item in entries]
        try:
            send(self.out, ("out", items, stats, self.status()))
        except OSError:
            pass

    def status(self) -> tuple:
        """((taken, waiting), health, step failures, died): `taken` is read first, so a request
        queued between the two reads is counted in both (the API side over-counts, never under)."""
        e = self.async_engine
        taken = e.taken
        return (taken, len(e.engine.scheduler.waiting)), e.health, e.step_failures, e.died

    def serve(self) -> None:
        last_status, last_sent = (None, None, None, None), 0.0
        while True:
            try:
                ready = self.ctl.poll(STATUS_EVERY_S)
                message = receive(self.ctl) if ready else None
            except (EOFError, OSError):
                log.warning("engine process: the API process is gone; stopping")
                return
            if message is not None:
                kind = message[0]
                if kind == "shutdown":
                    return
                self.handle(message)
            # queue depth at most every STATUS_EVERY_S (outputs carry it too); health at once
            status, now = self.status(), time.monotonic()
            if (status[1:] != last_status[1:] or now - last_sent >= STATUS_EVERY_S and status != last_status
                    or now - last_sent > 1.0):
                self.send_ctl(("status", status))
                last_status, last_sent = status, now
            if self.async_engine.died:
                return

    def handle(self, message) -> None:
        kind = message[0]
        if kind == "add":
            _, adapter, jobs = message
            reqs = []
            for request_id, prompt_ids, params in jobs:
                req = Request(request_id, prompt_ids, params, adapter)
                req.detokenize = engine_detokenizes(params)  # the API process makes the others' text
                reqs.append(req)
                if params.grammar is not None:  # compiled here, not on the engine thread between steps
                    try:
                        self.async_engine.engine.grammars().check(params.grammar)
                    except GrammarError:
                        pass  # add_request refuses it with the reason
            self.async_engine.add(reqs, self.send_outputs)
        elif kind == "abort":
            doomed = message[1]
            self.async_engine.post(lambda: [self.async_engine.engine.abort(r) for r in doomed])
        elif kind == "abort_all":
            self.async_engine.abort_all()
        elif kind == "call":
            self.calls.submit(self.run_call, *message[1:])
        else:
            log.error("engine process: unknown message %r", kind)

    def run_call(self, call_id: int, method: str, args: tuple, kwargs: dict) -> None:
        try:
            if method == "snapshot":
                from .state import take_snapshot

                value = take_snapshot(self.async_engine.engine, self.registry, self.async_engine)
            elif method in REGISTRY_CALLS:
                value = getattr(self.registry, method)(*args, **kwargs)
            else:
                raise ValueError(f"no such engine call: {method}")
            reply = ("result", call_id, True, value, self.registry.names())
        except Exception as exc:
            if not isinstance(exc, (ValueError, KeyError, PermissionError, FileNotFoundError)):
                log.error("engine process: %s failed:\n%s", method, traceback.format_exc())
            reply = ("result", call_id, False, portable(exc), self.registry.names())
        self.send_ctl(reply)


# ----------------------------------------------------------------------------------------
# the API process's side
# ----------------------------------------------------------------------------------------


class EngineStartupError(RuntimeError):
    """The engine process could not start; the message is safe to show (/ready)."""


class EngineClient:
    """What the server uses of the engine, when the engine runs in its own process: the same
    face as AsyncEngine (submit, running, health, step_failures, waiting, check_request,
    shutdown), plus the registry calls (`RegistryClient`)."""

    def __init__(self, config: ServerConfig, metrics, loop: asyncio.AbstractEventLoop, reference_kernels: bool):
        self.metrics, self.loop = metrics, loop
        self.tokenizer = None  # set by ServerState: the text of outputs is made on this side
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
        ctl_here, ctl_there = ctx.Pipe()
        out_here, out_there = ctx.Pipe(duplex=False)
        self.ctl, self.out = ctl_here, out_here
        self.process = ctx.Process(target=engine_main, args=(config, ctl_there, out_there, reference_kernels),
                                   name="loraplex-engine", daemon=True)
        self.process.start()
        ctl_there.close()
        out_there.close()
        # multiprocessing's own exit hook would SIGTERM (ignored there) and then wait forever
        atexit.register(self.shutdown, 5.0)
        self.ctl_lock = threading.Lock()
        self.info: dict | None = None
        self.failed: str | None = None
        self.ready = threading.Event()
        self.stopped = False                 # shutdown() was called
        # Queue depth: the engine's, as last reported, plus the requests sent since that it had
        # not taken in yet (a burst would otherwise pass --max-queue on a 50 ms old figure).
        self._sent = 0                       # requests sent in "add" messages
        self._taken, self._reported_waiting = 0, 0
        self._health: str | None = None
        self.step_failures = 0
        self.died = False
        self.names: set[str] = set()         # registered adapter names (the registry's `has`)
        self._streams: dict[str, OutputStream] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._ended_already = False
        self._reader = threading.Thread(target=self._read_ctl, name="loraplex-engine-ctl", daemon=True)
        self._reader.start()
        loop.call_soon_threadsafe(loop.add_reader, self.out.fileno(), self._read_out)

    # -- state ------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests queued in the engine, not yet admitted to a step (see __init__)."""
        return self._reported_waiting + max(0, self._sent - self._taken)

    @property
    def running(self) -> bool:
        # No process.is_alive() (a waitpid per request): a dead engine closes its pipes, the
        # readers then set `died`, and a request sent meanwhile fails on the pipe or in _ended.
        return self.ready.is_set() and not self.stopped and not self.died

    @property
    def health(self) -> str | None:
        if self.ready.is_set() and (self.died or not self.process.is_alive()):
            return "the engine process has stopped"
        return self._health

    def wait_ready(self, timeout: float | None = None) -> dict:
        """The engine's limits once it is up; EngineStartupError if its startup failed."""
        if not self.ready.wait(timeout):
            raise EngineStartupError("startup failed (the engine process did not start in time); see the server log")
        if self.failed:
            raise EngineStartupError(self.failed)
        return self.info

    def check_request(self, prompt_len: int, max_tokens: int, adapter: str | None) -> None:
        check_limits(prompt_len, max_tokens, self.info["max_model_len"], self.info["capacity_tokens"])
        if adapter is not None and adapter not in self.names:
            raise UnknownAdapterError(adapter)

    # -- requests ---------------------------------------------------------------------------

    async def submit(self, jobs: Sequence[tuple[str, list[int], SamplingParams]], adapter: str | None = None
                     ) -> AsyncIterator[list[RequestOutput]]:
        """As AsyncEngine.submit."""
        if not self.running:
            raise EngineStoppedError(self._stopped_message())
        for _, prompt_ids, params in jobs:
            self.check_request(len(prompt_ids), params.max_tokens, adapter)
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("EngineClient.submit runs on the event loop the client was made on")
        stream = OutputStream(self.loop)
        for request_id, _, _ in jobs:
            self._streams[request_id] = stream
        unfinished = {request_id for request_id, _, _ in jobs}
        try:
            self._sent += len(jobs)
            self._send(("add", adapter, [(r, list(p), params) for r, p, params in jobs]))
            async for batch in consume(stream, jobs, unfinished, self.tokenizer):
                yield batch
        finally:
            for request_id, _, _ in jobs:
                self._streams.pop(request_id, None)
            if unfinished and self.running:
                try:
                    self._send(("abort", list(unfinished)))
                except EngineStoppedError:  # it stopped meanwhile: nothing left to abort
                    pass

    def abort_all(self) -> None:
        """AsyncEngine.abort_all, in the engine process."""
        self._send(("abort_all",))

    def _read_out(self) -> None:
        """On the event loop: every out message waiting, each one engine hand-off."""
        try:
            while self.out.poll():
                _, items, stats, status = receive(self.out)
                self._deliver(items)
                for s in stats:
                    self.metrics.observe_step(s)
                self._set_status(status)
        except (EOFError, OSError):
            self.loop.remove_reader(self.out.fileno())
            self._ended()

    def _set_status(self, status: tuple) -> None:
        """EngineServer.status() as last sent (with outputs, or on its own)."""
        (self._taken, self._reported_waiting), self._health, self.step_failures, self.died = status

    def _deliver(self, items: list) -> None:
        """Outputs by request id into their streams; those whose consumer left are dropped."""
        deliver([(self._streams[request_id], unpack(item) if isinstance(item, tuple) else item)
                 for request_id, item in items if request_id in self._streams])

    def _ended(self) -> None:
        """The engine process is gone (or stopping): fail what still waits. (Both readers call
        it when the pipes close; the second call finds nothing left.)"""
        if self._ended_already:
            return
        self._ended_already = True
        if not self.stopped:
            log.critical("the engine process stopped (exit code %s); failing every request still running",
                         self.process.exitcode)
        self.died = not self.stopped
        error = None if self.stopped else "the engine process stopped; see the server log"
        reason = FinishReason.ABORT if self.stopped else FinishReason.ERROR
        self._deliver([(rid, RequestOutput(rid, [], "", None, finished=True, finish_reason=reason, error=error))
                       for rid in list(self._streams)])
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(EngineStoppedError(self._stopped_message()))

    def _stopped_message(self) -> str:
        return "the engine is not running" if self.stopped else \
            "the engine has stopped after an internal error; see the server log"

    # -- control pipe -----------------------------------------------------------------------

    def _send(self, message) -> None:
        with self.ctl_lock:
            try:
                send(self.ctl, message)
            except OSError:
                raise EngineStoppedError(self._stopped_message()) from None

    def _read_ctl(self) -> None:
        """Reader thread: startup, call results, adapter events, status."""
        try:
            while True:
                message = receive(self.ctl)
                kind = message[0]
                if kind == "result":
                    _, call_id, ok, value, names = message
                    self.names = set(names)
                    future = self._calls.pop(call_id, None)
                    if future is not None:
                        future.set_result(value) if ok else future.set_exception(value)
                elif kind == "event":
                    self.metrics.on_adapter_event(*message[1:])
                elif kind == "status":
                    self._set_status(message[1])
                elif kind == "ready":
                    self.info = message[1]
                    self.names = set(self.info["names"])
                    self.ready.set()
                elif kind == "failed":
                    self.failed = message[1]
                    self.ready.set()
                elif kind == "stopped":
                    break
        except (EOFError, OSError):
            pass
        if not self.ready.is_set():
            self.failed = self.failed or "startup failed (the engine process exited); see the server log"
            self.ready.set()
        try:
            self.loop.call_soon_threadsafe(self._ended)
        except RuntimeError:  # the event loop is closed (the server has exited)
            pass

    def call(self, method: str, *args, **kwargs) -> concurrent.futures.Future:
        """Run a registry method (or "snapshot") in the engine process; its Future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.running:
            future.set_exception(EngineStoppedError(self._stopped_message()))
            return future
        call_id = next(self._ids)
        self._calls[call_id] = future
        try:
            self._send(("call", call_id, method, args, kwargs))
        except EngineStoppedError as exc:
            self._calls.pop(call_id, None)
            future.set_exception(exc)
        return future

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine process: it aborts what runs, flushes, closes the registry, exits."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self._send(("shutdown",))
        except EngineStoppedError:
            pass
        # Read its last outputs meanwhile (the event loop, which reads them otherwise, is the
        # caller here): an engine thread blocked on a full pipe would not stop.
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            try:
                if self.out.poll(0.05):
                    self._deliver(receive(self.out)[1])
            except (EOFError, OSError):
                self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            log.warning("the engine process did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.join(5)


class RegistryClient:
    """The registry calls the server makes (REGISTRY_CALLS), run in the engine process
    (blocking: call them off the event loop, as the admin routes do). Exceptions come back as
    raised there."""

    def __init__(self, client: EngineClient):
        self.client = client
        self.num_slots = client.info["num_slots"]

    def __getattr__(self, method: str):
        if method not in REGISTRY_CALLS:
            raise AttributeError(f"the registry has no call {method!r} across the process boundary")
        return lambda *args, **kwargs: self.client.call(method, *args, **kwargs).result()

    def has(self, name: str) -> bool:
        """From the names the engine process sends with every call's reply (no call)."""
        return name in self.client.names

    def close(self) -> None:
        pass  # the engine process closes its registry when it stops
