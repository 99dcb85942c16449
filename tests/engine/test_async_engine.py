"""AsyncEngine when things go wrong: failed steps fail their requests with a message that names
only the request, health turns after UNHEALTHY_AFTER_FAILED_STEPS in a row and back after a
step that computes, and a thread that dies fails every request and call still waiting.

A stand-in engine (one token per request per step, a step that raises on demand) keeps these
fast and exact; the server tests run the same paths on the real engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from loraplex.engine.async_engine import UNHEALTHY_AFTER_FAILED_STEPS, AsyncEngine, EngineStoppedError
from loraplex.engine.request import FinishReason, Request, RequestOutput
from loraplex.engine.sampling import SamplingParams

SECRET = "/srv/models/secret/kernel.cubin"


class Killed(BaseException):
    """Not an Exception: what a step's `except Exception` does not catch."""


class XTokenizer:
    """Every token decodes to "x"."""

    def decode(self, ids, **kwargs) -> str:
        return "x" * len(ids)


class FakeEngine:
    """What AsyncEngine uses of an Engine. `fail` is raised by steps that have requests to run;
    `gate`, when set, holds every step until it opens."""

    def __init__(self):
        self.tokenizer = XTokenizer()
        self.requests = {}
        self.fail: BaseException | None = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()   # a step is waiting at the gate
        self.calls = 0

    def has_work(self) -> bool:
        return bool(self.requests)

    def check_request(self, prompt_len, max_tokens, adapter) -> None:
        pass

    def add_request(self, req) -> None:
        self.requests[req.request_id] = req

    def abort(self, request_id, reason=FinishReason.ABORT, error=None) -> bool:
        req = self.requests.pop(request_id, None)
        if req is not None:
            req.on_output(RequestOutput(request_id, [], "", None, finished=True, finish_reason=reason, error=error))
        return req is not None

    def abort_all(self, reason=FinishReason.ABORT, error=None) -> None:
        for request_id in list(self.requests):
            self.abort(request_id, reason, error)

    def step(self) -> int:
        self.calls += 1
        if self.gate is not None:
            self.entered.set()
            self.gate.wait()
        if not self.requests:
            return 0  # idle: no model runs
        if self.fail is not None:
            raise self.fail
        for req in list(self.requests.values()):
            req.output_ids.append(7)
            done = len(req.output_ids) >= req.params.max_tokens
            if done:
                del self.requests[req.request_id]
            req.on_output(RequestOutput(req.request_id, [7], "x", None, finished=done,
                                        finish_reason=FinishReason.LENGTH if done else None))
        return len(self.requests)


@pytest.fixture
def engines():
    fake = FakeEngine()
    engine = AsyncEngine(fake).start()
    yield fake, engine
    if fake.gate is not None:
        fake.gate.set()
    engine.shutdown()


async def last_output(engine: AsyncEngine, request_id: str, max_tokens: int = 2) -> RequestOutput:
    outs = [out async for out in engine.generate(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens))]
    return outs[-1]


def test_failed_steps_fail_their_requests_and_health_recovers_after_a_step_that_computes(engines, caplog):
    fake, engine = engines
    fake.fail = OSError(5, "Input/output error", SECRET)

    async def main():
        for i in range(UNHEALTHY_AFTER_FAILED_STEPS):
            assert engine.health is None
            out = await last_output(engine, f"r{i}")
            assert out.finished and out.finish_reason is FinishReason.ERROR
            assert out.error == f"internal error in the engine; see the server log (request r{i})"
        assert engine.health == f"the last {UNHEALTHY_AFTER_FAILED_STEPS} engine steps failed"
        calls = fake.calls
        time.sleep(0.6)  # idle steps run meanwhile (every 0.5 s): they prove nothing, the count stays
        assert fake.calls > calls
        assert engine.failed_steps == UNHEALTHY_AFTER_FAILED_STEPS and engine.health is not None
        fake.fail = None
        assert engine.running  # unhealthy is not stopped: new requests still run
        out = await last_output(engine, "ok")
        assert out.finish_reason is FinishReason.LENGTH and out.error is None

    with caplog.at_level(logging.ERROR, logger="loraplex.engine"):
        asyncio.run(main())
    assert engine.health is None and engine.failed_steps == 0
    assert engine.step_failures == UNHEALTHY_AFTER_FAILED_STEPS
    logged = caplog.text  # the operator's side: which requests, and the whole exception
    assert "failing requests r0" in logged and SECRET in logged and "Traceback" in logged


def test_a_dying_thread_fails_every_request_and_call_still_waiting(engines, caplog):
    fake, engine = engines

    async def main():
        # steps run freely until the gate is set: a budget no loaded machine can exhaust meanwhile
        running = engine.generate("running", [1, 2], SamplingParams(max_tokens=10**9))
        first = await running.__anext__()
        assert not first.finished
        fake.gate = threading.Event()             # the next step holds: what comes now only queues
        assert await asyncio.to_thread(fake.entered.wait, 10)
        queued = asyncio.create_task(last_output(engine, "queued"))
        call = asyncio.create_task(engine.call(lambda: "never runs"))
        await asyncio.sleep(0.05)
        fake.fail = Killed()
        fake.gate.set()
        outs = [out async for out in running]
        return outs[-1], await queued, await asyncio.gather(call, return_exceptions=True)

    with caplog.at_level(logging.CRITICAL, logger="loraplex.engine"):
        running, queued, (call_error,) = asyncio.run(asyncio.wait_for(main(), 30))
    for out, request_id in ((running, "running"), (queued, "queued")):
        assert out.finished and out.finish_reason is FinishReason.ERROR
        assert out.error == f"the engine stopped after an internal error; see the server log (request {request_id})"
    assert running.completion_tokens >= 1
    assert isinstance(call_error, EngineStoppedError) and "see the server log" in str(call_error)
    assert "the engine thread died" in caplog.text and "Killed" in caplog.text
    assert engine.died and not engine.running and engine.health == "the engine thread has stopped"

    async def after():  # refused at once, not queued to a thread that is gone
        with pytest.raises(EngineStoppedError):
            await last_output(engine, "late")
        with pytest.raises(EngineStoppedError):
            await engine.call(lambda: None)
    asyncio.run(asyncio.wait_for(after(), 5))


def test_shutdown_is_not_a_failure(engines):
    fake, engine = engines
    engine.shutdown()
    assert engine.health is None and not engine.died and not engine.running

    async def late():
        with pytest.raises(EngineStoppedError, match="not running"):
            await last_output(engine, "late")
    asyncio.run(late())


def test_outputs_cross_threads_once_per_step_for_every_request_together(engines):
    fake, engine = engines
    jobs = [(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=6)) for i in range(16)]

    async def main():
        batches = [batch async for batch in engine.submit(jobs)]
        return batches

    before = engine.handoffs
    batches = asyncio.run(main())
    outs = [out for batch in batches for out in batch]
    assert len(outs) == 16 * 6 and all(out.text == "x" for out in outs)  # text made by the consumer
    assert sum(out.finished for out in outs) == 16
    # one hand-off per step that produced tokens (each carries all 16 requests), not per token
    assert engine.handoffs - before <= 6 + 1
    assert max(len(batch) for batch in batches) >= 16


def test_requests_added_for_another_process_go_to_its_sink_and_are_forgotten_when_done(engines):
    """AsyncEngine.add (the engine process's side): outputs reach the sink once per hand-off as
    (request id, output), and a finished request no longer waits on the thread."""
    fake, engine = engines
    got, done = [], threading.Event()

    def sink(entries):  # on the engine thread
        got.append(entries)
        if sum(out.finished for batch in got for _, out in batch) == 8:
            done.set()
    engine.add([Request(f"r{i}", [1, 2], SamplingParams(max_tokens=3)) for i in range(8)], sink)
    assert done.wait(10)
    outs = [out for batch in got for _, out in batch]
    assert len(outs) == 8 * 3 and {rid for batch in got for rid, _ in batch} == {f"r{i}" for i in range(8)}
    assert max(len(batch) for batch in got) == 8  # every request of a step in one hand-off
    assert not engine._requests
