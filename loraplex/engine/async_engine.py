"""The asyncio face of the engine: one thread owns the device and loops over steps; coroutines
submit requests and read their outputs through thread-safe hand-offs.

    async for out in engine.generate(request_id, prompt_ids, params, adapter): ...

Leaving the loop early (the client disconnected, the task was cancelled) aborts the request
at the next step boundary and frees its KV blocks and adapter reference.

Failures: a step that raises fails the requests the engine holds (finish reason ERROR, a
message that names the request and points to the log, never the exception's text) and the
engine carries on; `health` turns to a reason after UNHEALTHY_AFTER_FAILED_STEPS failed steps
in a row (a sticky CUDA error fails every step) and back to None after a step succeeds. An
exception that escapes the loop ends the thread for good: every request and call still
waiting is failed, so no client hangs, and `generate()` / `call()` raise EngineStoppedError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import traceback
from typing import AsyncIterator, Callable, TypeVar

from .engine import Engine
from .request import FinishReason, Request, RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("loraplex.engine")
T = TypeVar("T")

# Failed steps in a row after which `health` reports the engine unhealthy (/ready turns 503).
# One failure can be a bad batch; three in a row look like a broken device (a sticky CUDA error).
UNHEALTHY_AFTER_FAILED_STEPS = 3


class EngineStoppedError(RuntimeError):
    """The engine thread is not running (shut down, or it died); the message is safe to show."""


def internal_error(what: str, request_id: str) -> str:
    """A client's message for a failure inside the engine: what happened and where to look. The
    exception's own text stays in the log: it can hold server paths and device details."""
    return f"{what}; see the server log (request {request_id})"


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="loraplex-engine", daemon=True)
        self.steps = 0              # steps that computed tokens
        self.failed_steps = 0       # steps that raised, in a row (a successful step resets it)
        self.step_failures = 0      # steps that raised, in all
        self.died = False           # an exception escaped the step loop: the thread is gone for good
        # What waits on the thread, failed when it ends: requests by generate(), futures by call().
        # The lock orders registering against the thread's exit, so nothing slips in after it.
        self._lock = threading.Lock()
        self._exited = False
        self._requests: set[Request] = set()
        self._calls: set[concurrent.futures.Future] = set()

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set() and not self._exited

    @property
    def health(self) -> str | None:
        """None while the engine serves; else why not, in a few words safe to show (for /ready)."""
        if self.died:
            return "the engine thread has stopped"
        if self.failed_steps >= UNHEALTHY_AFTER_FAILED_STEPS:
            return f"the last {self.failed_steps} engine steps failed"
        return None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left and stop the engine thread."""
        if self._thread.is_alive():
            self._commands.put(self.engine.abort_all)
            self._stop.set()
            self._commands.put(lambda: None)  # wake the thread
            self._thread.join(timeout)

    # -- engine thread --------------------------------------------------------------------

    def _main(self) -> None:
        """The engine thread: the step loop; on the way out, stopped or dead, every request and
        call still waiting is ended so that no client waits forever."""
        try:
            self._loop()
        except BaseException:  # anything at all: the thread is gone, say so and fail what waits
            self.died = True
            log.critical("the engine thread died; failing every request still running:\n%s", traceback.format_exc())
        finally:
            with self._lock:
                self._exited = True
                requests, calls = list(self._requests), list(self._calls)
            reason = FinishReason.ERROR if self.died else FinishReason.ABORT
            for req in requests:
                # Straight to the request's channel, not through the engine, whose state may be
                # what broke. A request that finished already gets a second last output, which
                # generate() never reads.
                error = internal_error("the engine stopped after an internal error", req.request_id) if self.died else None
                try:
                    req.on_output(RequestOutput(req.request_id, [], "", None, finished=True, finish_reason=reason,
                                                prompt_tokens=len(req.prompt_ids),
                                                completion_tokens=len(req.output_ids), error=error))
                except Exception:  # its event loop is closed: nobody waits on it any more
                    pass
            for future in calls:
                if not future.done():
                    future.set_exception(EngineStoppedError(self._stopped_message()))

    def _stopped_message(self) -> str:
        return "the engine has stopped after an internal error; see the server log" if self.died \
            else "the engine is not running"

    def _loop(self) -> None:
        computed = True
        while True:
            # Commands (new requests, aborts, admin work) run between steps. Block when idle;
            # when requests only wait (for an adapter being read from disk), poll every ms
            # rather than spin, which would starve the loader thread of the GIL.
            if self._stop.is_set() or (computed and self.engine.has_work()):
                wait = None
            else:
                wait = 0.001 if self.engine.has_work() else 0.5
            try:
                while True:
                    command = self._commands.get(block=wait is not None, timeout=wait)
                    wait = None
                    self._run(command)
            except queue.Empty:
                pass
            if self._stop.is_set():
                return
            try:
                computed = self.engine.step() > 0
                if computed:  # an idle step runs no model: it proves nothing about the device
                    self.steps += 1
                    self.failed_steps = 0
            except Exception:  # a failed step must not take the server down
                self.failed_steps += 1
                self.step_failures += 1
                doomed = list(self.engine.requests)
                log.error("engine step failed (%d in a row); failing requests %s:\n%s", self.failed_steps,
                          ", ".join(doomed), traceback.format_exc())
                for request_id in doomed:
                    self.engine.abort(request_id, FinishReason.ERROR,
                                      internal_error("internal error in the engine", request_id))

    def _run(self, command: Callable[[], None]) -> None:
        try:
            command()
        except Exception:
            log.error("engine command failed:\n%s", traceback.format_exc())

    # -- asyncio side ---------------------------------------------------------------------

    def _enlist(self, waiter: set, item) -> None:
        """Add `item` to what the thread fails when it ends; EngineStoppedError if it has ended."""
        with self._lock:
            if not self.running:
                raise EngineStoppedError(self._stopped_message())
            waiter.add(item)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps and return its result (or raise its error)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._enlist(self._calls, future)

        def command():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        self._commands.put(command)
        try:
            return await asyncio.wrap_future(future)
        finally:
            with self._lock:
                self._calls.discard(future)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until the one with `finished` set.

        Requests that can never run (too long, unknown adapter) raise before the first output
        (RequestError, UnknownAdapterError), even when the adapter goes away after this check."""
        if not self.running:
            raise EngineStoppedError(self._stopped_message())
        self.engine.check_request(len(prompt_ids), params.max_tokens, adapter)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        req = Request(request_id, list(prompt_ids), params, adapter,
                      on_output=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        self._enlist(self._requests, req)

        def add():
            try:
                self.engine.add_request(req)
            except Exception as exc:  # e.g. the adapter was unloaded since check_request: raise it there
                loop.call_soon_threadsafe(outputs.put_nowait, exc)
        self._commands.put(add)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, Exception):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            with self._lock:
                self._requests.discard(req)
            if not finished:
                self._commands.put(lambda: self.engine.abort(request_id))
