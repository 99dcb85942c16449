"""The asyncio face of the engine: one thread owns the device and loops over steps; coroutines
submit requests and read their outputs.

    async for batch in engine.submit([(request_id, prompt_ids, params), ...], adapter): ...
    async for out in engine.generate(request_id, prompt_ids, params, adapter): ...   # one request

Outputs cross threads once per step, not once per token: the engine thread collects every
output a step (or a run of commands) produced and hands them to each event loop in one
`call_soon_threadsafe`; a consumer gets all of its requests' outputs that arrived together as
one batch. The engine thread and the event loop share the GIL, so every per-token cost on
the way out is taken from the engine's steps.

Text: requests without stop strings are detokenized here, by the consumer, not on the engine
thread (the same IncrementalDetokenizer, so the same text); with stop strings the engine
detokenizes, since a stop string must end generation at the token that completes it.

Leaving the loop early (the client disconnected, the task was cancelled) aborts the requests
at the next step boundary and frees their KV blocks and adapter references.

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
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

from .detokenizer import IncrementalDetokenizer
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


class OutputStream:
    """Outputs of the requests submitted together, as the engine thread hands them over.
    Filled on its event loop only (`deliver`); read by one consumer."""

    __slots__ = ("items", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[RequestOutput | Exception] = []
        self.waiter: asyncio.Future | None = None

    async def take(self) -> list[RequestOutput | Exception]:
        """Everything that arrived since the last take (waits for at least one)."""
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


def engine_detokenizes(params: SamplingParams) -> bool:
    """Whether the engine makes a request's text: only with stop strings, which must end
    generation at the token that completes them, or a grammar, which may end it at any token;
    the consumer makes every other text (where a STOP output always ends in a stop token)."""
    return bool(params.stop) or params.grammar is not None


def deliver(batch: list[tuple[OutputStream, RequestOutput | Exception]]) -> None:
    """On the event loop: one engine hand-off, into each stream; each waiting consumer is woken once."""
    for stream, item in batch:
        stream.items.append(item)
    for stream, _ in batch:
        waiter = stream.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def consume(stream: OutputStream, jobs: Sequence[tuple[str, list[int], SamplingParams]], unfinished: set[str],
                  tokenizer) -> AsyncIterator[list[RequestOutput]]:
    """The batches of `stream` until every request in `unfinished` (emptied as they finish) has
    had its last output; the text of requests without stop strings is made here."""
    texts = {request_id: IncrementalDetokenizer(tokenizer, prompt_ids,
                                                skip_special_tokens=params.skip_special_tokens)
             for request_id, prompt_ids, params in jobs if not engine_detokenizes(params)}
    while unfinished:
        batch = []
        for out in await stream.take():
            if isinstance(out, Exception):
                raise out
            if out.request_id not in unfinished:  # a second last output (the engine stopping)
                continue
            if out.finished:
                unfinished.discard(out.request_id)
            detokenizer = texts.get(out.request_id)
            if detokenizer is not None:
                out.text = _text(detokenizer, out)
            batch.append(out)
        if batch:
            yield batch


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
        # Outputs produced on the engine thread, not yet handed over, as (target, entry): target
        # an event loop (entry: (stream, output)) or a sink (entry: (request id, output)). Only
        # the engine thread touches it (requests' on_output, _flush).
        self._outbox: list[tuple[Any, tuple]] = []
        self.handoffs = 0           # cross-thread hand-offs made (call_soon_threadsafe calls)
        self.taken = 0              # requests the engine thread has taken in (queued or refused)

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

    @property
    def waiting(self) -> int:
        """Requests queued in the engine, not yet admitted to a step."""
        return len(self.engine.scheduler.waiting)

    def check_request(self, prompt_len: int, max_tokens: int, adapter: str | None) -> None:
        """Engine.check_request: what can never run raises before anything is queued."""
        self.engine.check_request(prompt_len, max_tokens, adapter)

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
                except Exception:  # nobody waits on it any more
                    pass
            self._flush()
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
            self._flush()  # what the commands produced (aborts' last outputs, refused requests)
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
            self._flush()

    def _flush(self) -> None:
        """Hand over what the outbox holds: one call per event loop (or sink), not per token."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        target = batch[0][0]
        if all(t is target for t, _ in batch):
            groups = {target: [entry for _, entry in batch]}
        else:  # several event loops (tests, scripts)
            groups = {}
            for t, entry in batch:
                groups.setdefault(t, []).append(entry)
        for target, entries in groups.items():
            try:
                if isinstance(target, asyncio.AbstractEventLoop):
                    target.call_soon_threadsafe(deliver, entries)
                else:
                    target(entries)
                self.handoffs += 1
            except RuntimeError:  # that event loop is closed: nobody reads these any more
                pass

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

    async def submit(self, jobs: Sequence[tuple[str, list[int], SamplingParams]], adapter: str | None = None
                     ) -> AsyncIterator[list[RequestOutput]]:
        """Submit requests (request id, prompt ids, params) on one adapter together and yield
        their outputs in batches, as they arrive (a batch holds outputs of any of them, in
        order per request), until each has had its output with `finished` set.

        Requests that can never run (too long, unknown adapter) raise before anything is
        queued (RequestError, UnknownAdapterError); one refused at admission (its adapter was
        unloaded since this check) raises from the iteration, and the others are aborted."""
        if not self.running:
            raise EngineStoppedError(self._stopped_message())
        for _, prompt_ids, params in jobs:
            self.engine.check_request(len(prompt_ids), params.max_tokens, adapter)
        stream = OutputStream(asyncio.get_running_loop())
        loop = stream.loop

        def post(item):  # on the engine thread
            self._outbox.append((loop, (stream, item)))
        reqs = []
        for request_id, prompt_ids, params in jobs:
            req = Request(request_id, list(prompt_ids), params, adapter, on_output=post)
            req.detokenize = engine_detokenizes(params)
            reqs.append(req)
        for req in reqs:
            self._enlist(self._requests, req)
        self._commands.put(lambda: self._add(reqs))
        unfinished = {req.request_id for req in reqs}
        try:
            async for batch in consume(stream, jobs, unfinished, self.engine.tokenizer):
                yield batch
        finally:
            with self._lock:
                for req in reqs:
                    self._requests.discard(req)
            if unfinished:
                doomed = list(unfinished)
                self._commands.put(lambda: [self.engine.abort(request_id) for request_id in doomed])

    def add(self, reqs: list[Request], sink: Callable[[list], None]) -> None:
        """Submit requests whose outputs go to `sink` as (request id, output or exception), for
        a caller outside this process (engine_process.py); abort them with `post`. If the
        engine has stopped this does nothing: that caller learns it from `died` / `running`."""
        def post_for(req):
            def post(item):  # on the engine thread; its last output ends what waits on the thread
                if isinstance(item, Exception) or item.finished:
                    with self._lock:
                        self._requests.discard(req)
                self._outbox.append((sink, (req.request_id, item)))
            return post
        try:
            for req in reqs:
                req.on_output = post_for(req)
                self._enlist(self._requests, req)
        except EngineStoppedError:
            return
        self._commands.put(lambda: self._add(reqs))

    def _add(self, reqs: list[Request]) -> None:
        """Engine thread: admit `reqs`; on the first refusal (e.g. the adapter was unloaded
        since check_request), post the error and admit none of the rest."""
        try:
            for req in reqs:
                try:
                    self.engine.add_request(req)
                except Exception as exc:
                    req.on_output(exc)
                    return
        finally:
            self.taken += len(reqs)  # after they are queued: `waiting` counts them from now on

    def post(self, command: Callable[[], None]) -> None:
        """Run `command` on the engine thread between steps (errors are logged)."""
        self._commands.put(command)

    def abort_all(self) -> None:
        """End every request between steps, with finish reason abort (the drain's time ran out);
        each still gets its last output, so its stream ends as streams do."""
        self._commands.put(self.engine.abort_all)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """One request's outputs until the one with `finished` set (see `submit`)."""
        async for batch in self.submit([(request_id, prompt_ids, params)], adapter):
            for out in batch:
                yield out


def _text(detokenizer: IncrementalDetokenizer, out: RequestOutput) -> str:
    """The text of `out`'s tokens, for a request the engine does not detokenize (no stop
    strings): as Engine._append and _finish make it. A stop token (EOS, stop_token_ids)
    ends the output without its text; any other end releases what is held back."""
    ids = out.token_ids
    if out.finished and out.finish_reason is FinishReason.STOP:
        ids = ids[:-1]  # no stop strings: a STOP is always a stop token, the last one
    text = "".join([detokenizer.push(t)[0] for t in ids])
    if out.finished:
        text += detokenizer.flush()
    return text
