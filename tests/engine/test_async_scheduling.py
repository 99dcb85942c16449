"""Async scheduling: with one step in flight the engine gives the synchronous engine's outputs
(itself checked against transformers + PEFT in test_engine.py), wastes no step on a request
that reached max_tokens, and really overlaps: step N+1 is launched before N's tokens are
waited for."""

from __future__ import annotations

import pytest

from loraplex.engine import sampling
from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.request import FinishReason, Request
from loraplex.engine.sampling import SamplingParams
from tests.factory import random_adapter


pytestmark = pytest.mark.usefixtures("reference_kernels")  # fixtures: tests/engine/conftest.py


def make_engine(loaded, async_scheduling: bool, **config) -> Engine:
    adapters = StaticAdapters(loaded.model, {"x": random_adapter(loaded.model, 1), "y": random_adapter(loaded.model, 2)})
    return Engine(loaded.model, loaded.tokenizer, adapters,
                  EngineConfig(async_scheduling=async_scheduling, **config))


def drive(engine: Engine, arrivals: dict[int, list[Request]], abort_after: dict[str, int] = {}):
    """Run to the end: `arrivals` {step: requests}; a request in `abort_after` is aborted as
    soon as it has that many tokens. Returns ({request id: outputs}, tokens computed)."""
    outputs: dict[str, list] = {}
    computed, step = 0, 0
    while step <= max(arrivals) or engine.has_work():
        for req in arrivals.get(step, []):
            req.on_output = outputs.setdefault(req.request_id, []).append
            engine.add_request(req)
        computed += engine.step()
        for request_id, n in abort_after.items():
            if sum(len(o.token_ids) for o in outputs.get(request_id, [])) >= n:
                engine.abort(request_id)
        step += 1
        assert step < 1000
    return outputs, computed


def summary(outputs):
    """Per request: tokens, text, finish reason, and logprobs (chosen, top ids, top values)."""
    result = {}
    for request_id, outs in outputs.items():
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
        lps = [lp for o in outs for lp in (o.logprobs or [])]
        result[request_id] = ([t for o in outs for t in o.token_ids], "".join(o.text for o in outs),
                              outs[-1].finish_reason, outs[-1].completion_tokens,
                              [(lp.token_id, [t for t, _ in lp.top]) for lp in lps],
                              [[lp.logprob, *(v for _, v in lp.top)] for lp in lps])
    return result


def workload(loaded, free_tokens, free_text):
    prompt = loaded.tokenizer.encode("the quick brown")
    greedy = dict(temperature=0, ignore_eos=True)
    stop = free_text[len(free_text) // 2: len(free_text) // 2 + 2]
    return {
        0: [Request("base", prompt, SamplingParams(max_tokens=9, logprobs=2, **greedy)),
            Request("x", list(range(5, 30)), SamplingParams(max_tokens=12, **greedy), "x"),
            Request("seeded", prompt, SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7,
                                                     ignore_eos=True), "y"),
            Request("one", prompt, SamplingParams(max_tokens=1, **greedy), "y")],
        2: [Request("stop-string", prompt, SamplingParams(max_tokens=20, stop=[stop], **greedy)),
            Request("stop-id", prompt, SamplingParams(max_tokens=20, stop_token_ids=[free_tokens[4]], **greedy)),
            Request("aborted", list(range(40, 52)), SamplingParams(max_tokens=20, **greedy))],
        5: [Request("late", prompt, SamplingParams(max_tokens=6, logprobs=0, **greedy), "x")],
    }


@pytest.mark.parametrize("kv_cache_tokens", [1024, 96], ids=["roomy", "preempting"])
def test_async_scheduling_gives_the_synchronous_outputs(loaded, kv_cache_tokens):
    prompt = loaded.tokenizer.encode("the quick brown")
    free, _ = drive(make_engine(loaded, False, kv_cache_tokens=256),
                    {0: [Request("free", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))]})
    free_tokens = [t for o in free["free"] for t in o.token_ids]
    free_text = "".join(o.text for o in free["free"])
    config = dict(kv_cache_tokens=kv_cache_tokens, block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
    results = {}
    for mode in (False, True):
        engine = make_engine(loaded, mode, **config)
        arrivals = workload(loaded, free_tokens, free_text)
        outputs, _ = drive(engine, arrivals, abort_after={"aborted": 3})
        results[mode] = summary(outputs)
        reqs = [r for rs in arrivals.values() for r in rs]
        if kv_cache_tokens == 96:
            assert sum(r.num_preemptions for r in reqs) > 0, "the cache was meant to be too small"
        # nothing left behind: no request, no pending token, every block and adapter back
        assert not engine.has_work() and not engine.requests
        assert all(r.pending == 0 for r in reqs)
        assert engine.allocator.num_free == engine.allocator.num_blocks - 1
        assert all(n == 0 for n in engine.adapters.refcount.values())
    sync, overlapped = results[False], results[True]
    assert sync["stop-string"][2] is FinishReason.STOP and sync["stop-id"][2] is FinishReason.STOP
    assert sync["aborted"][2] is FinishReason.ABORT and len(sync["aborted"][0]) == 3
    assert sync["one"][0] and len(sync["one"][0]) == 1
    for request_id, (tokens, text, reason, count, lp_ids, lp_values) in sync.items():
        other = overlapped[request_id]
        assert other[:5] == (tokens, text, reason, count, lp_ids), request_id
        # the same rows, in batches of other shapes: equal up to fp32 rounding
        assert other[5] == [pytest.approx(v, abs=1e-5) for v in lp_values], request_id


def test_no_step_is_spent_on_a_request_at_max_tokens(loaded):
    """Without stop conditions both modes compute exactly the same tokens: a request whose
    pending token is its last is not scheduled again."""
    computed = {}
    for mode in (False, True):
        reqs = [Request(f"r{i}", list(range(3, 3 + 4 + i)), SamplingParams(max_tokens=3 + 2 * i, ignore_eos=True,
                                                                            temperature=0), "x" if i % 2 else None)
                for i in range(5)]
        _, computed[mode] = drive(make_engine(loaded, mode, kv_cache_tokens=512), {0: reqs})
    assert computed[True] == computed[False]


def test_the_next_step_is_launched_before_the_previous_tokens_are_waited_for(loaded, monkeypatch):
    events = []
    engine = make_engine(loaded, True, kv_cache_tokens=256)
    real_run, real_to_host = engine.runner.run, sampling.Draw.to_host

    def run(sched, pending=None):
        events.append("launch")
        return real_run(sched, pending)

    def to_host(self):
        events.append("wait")
        return real_to_host(self)
    monkeypatch.setattr(engine.runner, "run", run)
    monkeypatch.setattr(sampling.Draw, "to_host", to_host)
    out, _ = drive(engine, {0: [Request("a", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))]})
    assert len([t for o in out["a"] for t in o.token_ids]) == 4
    # 4 steps (prefill + 3 decodes): each step's tokens are waited for after the next launch
    assert events == ["launch", "launch", "wait", "launch", "wait", "launch", "wait", "wait"]
    assert engine.async_scheduling and not make_engine(loaded, None, kv_cache_tokens=64).async_scheduling  # CPU: off


def test_a_failed_step_leaves_nothing_in_flight(loaded, monkeypatch):
    engine = make_engine(loaded, True, kv_cache_tokens=256)
    outs = []
    req = Request("a", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), on_output=outs.append)
    engine.add_request(req)
    engine.step()
    engine.step()
    assert engine._in_flight is not None

    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(engine.runner, "run", broken)
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    assert engine._in_flight is None
    engine.abort_all(FinishReason.ERROR, "failed")  # what AsyncEngine does after a failed step
    assert not engine.has_work() and outs[-1].finish_reason is FinishReason.ERROR
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1
