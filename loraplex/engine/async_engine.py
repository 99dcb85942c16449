"""The asyncio face of the engine: one thread owns the device and loops over steps; coroutines
submit requests and read their outputs through thread-safe hand-offs.

    async for out in engine.generate(request_id, prompt_ids, params, adapter): ...

Leaving the loop early (the client disconnected, the task was cancelled) aborts the request
at the next step boundary and frees its KV blocks and adapter reference.
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


class EngineStoppedError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self.steps = 0

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left and stop the engine thread."""
        if self._thread.is_alive():
            self._commands.put(self.engine.abort_all)
            self._stop.set()
            self._commands.put(lambda: None)  # wake the thread
            self._thread.join(timeout)

    # -- engine thread --------------------------------------------------------------------

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
                if computed:
                    self.steps += 1
            except Exception as exc:  # a failed step must not take the server down
                log.error("engine step failed; failing its requests:\n%s", traceback.format_exc())
                self.engine.abort_all(FinishReason.ERROR, f"internal error in the engine step: {type(exc).__name__}: {exc}")

    def _run(self, command: Callable[[], None]) -> None:
        try:
            command()
        except Exception:
            log.error("engine command failed:\n%s", traceback.format_exc())

    # -- asyncio side ---------------------------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps and return its result (or raise its error)."""
        if not self.running:
            raise EngineStoppedError("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()

        def command():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        self._commands.put(command)
        return await asyncio.wrap_future(future)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until the one with `finished` set.

        Requests that can never run (too long, unknown adapter) raise before the first output
        (RequestError, UnknownAdapterError), even when the adapter goes away after this check."""
        if not self.running:
            raise EngineStoppedError("the engine is not running")
        self.engine.check_request(len(prompt_ids), params.max_tokens, adapter)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        req = Request(request_id, list(prompt_ids), params, adapter,
                      on_output=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))

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
            if not finished:
                self._commands.put(lambda: self.engine.abort(request_id))
