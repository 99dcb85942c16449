"""Engine behaviour beyond exactness: sampling with seeds, stop conditions, aborts, limits,
adapter paging, and the asyncio wrapper."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.engine.adapters import StaticAdapters, UnknownAdapterError
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import Engine, EngineConfig, RequestError
from loraplex.engine.request import FinishReason, Request
from loraplex.engine.sampling import SamplingParams
from tests.factory import random_adapter


pytestmark = pytest.mark.usefixtures("reference_kernels")  # fixtures: tests/engine/conftest.py


def collect(engine, reqs, max_steps=400):
    outputs = {r.request_id: [] for r in reqs}
    for r in reqs:
        r.on_output = outputs[r.request_id].append
        engine.add_request(r)
    engine.run_until_done(max_steps)
    return outputs


def tokens_of(outs):
    return [t for o in outs for t in o.token_ids]


def text_of(outs):
    return "".join(o.text for o in outs)


def test_seeded_sampling_is_reproducible_whatever_the_batch(loaded):
    prompt = loaded.tokenizer.encode("hello world")
    params = dict(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = collect(Engine(loaded.model, loaded.tokenizer, config=EngineConfig(kv_cache_tokens=256)),
                    [Request("a", prompt, SamplingParams(**params))])
    crowd = [Request(f"o{i}", loaded.tokenizer.encode(f"other prompt {i}"),
                     SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)) for i in range(4)]
    crowd.insert(2, Request("a", prompt, SamplingParams(**params)))
    together = collect(Engine(loaded.model, loaded.tokenizer, config=EngineConfig(kv_cache_tokens=512)), crowd)
    assert tokens_of(alone["a"]) == tokens_of(together["a"])
    other_seed = collect(Engine(loaded.model, loaded.tokenizer, config=EngineConfig(kv_cache_tokens=256)),
                         [Request("a", prompt, SamplingParams(**{**params, "seed": 99}))])
    assert tokens_of(other_seed["a"]) != tokens_of(alone["a"])


def test_max_tokens_and_stop_string_finish_reasons(loaded):
    tok = loaded.tokenizer
    prompt = tok.encode("the quick brown")
    engine = Engine(loaded.model, tok, config=EngineConfig(kv_cache_tokens=256))
    free = collect(engine, [Request("free", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))])
    assert free["free"][-1].finish_reason is FinishReason.LENGTH
    assert len(tokens_of(free["free"])) == 20
    full_text = text_of(free["free"])
    assert full_text == tok.decode(tokens_of(free["free"]), skip_special_tokens=True)
    # stop at a piece of the text the free run produced (greedy: the same text comes again)
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 2]
    cut = collect(engine, [Request("cut", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                 stop=[stop]))])
    assert cut["cut"][-1].finish_reason is FinishReason.STOP
    assert text_of(cut["cut"]) == full_text[: full_text.index(stop)]
    # a stop token id ends generation without adding its text
    stop_id = tokens_of(free["free"])[5]
    by_id = collect(engine, [Request("id", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                  stop_token_ids=[stop_id]))])
    ids = tokens_of(by_id["id"])
    assert by_id["id"][-1].finish_reason is FinishReason.STOP and ids[-1] == stop_id
    assert stop_id not in ids[:-1]


def test_abort_frees_everything_at_any_step(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, StaticAdapters(loaded.model, {"x": random_adapter(loaded.model, 1)}),
                    EngineConfig(kv_cache_tokens=256, max_num_batched_tokens=8, max_num_seqs=4, block_size=4))
    outs: dict[str, list] = {}
    reqs = [Request(f"r{i}", list(range(3, 3 + 20)), SamplingParams(max_tokens=30, ignore_eos=True),
                    "x" if i % 2 else None) for i in range(3)]
    for r in reqs:
        r.on_output = outs.setdefault(r.request_id, []).append
        engine.add_request(r)
    engine.step()  # r0 prefilling (chunked), others waiting
    assert engine.abort("r2")  # waiting
    engine.step()
    engine.step()
    assert engine.abort("r0")  # running
    assert not engine.abort("r0")  # already gone
    engine.run_until_done()
    assert outs["r0"][-1].finish_reason is FinishReason.ABORT and outs["r2"][-1].finish_reason is FinishReason.ABORT
    assert outs["r1"][-1].finish_reason is FinishReason.LENGTH
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1
    assert engine.adapters.refcount["x"] == 0
    assert not engine.requests


def test_step_stats_and_queue_time(loaded):
    engine = Engine(loaded.model, loaded.tokenizer,
                    StaticAdapters(loaded.model, {"x": random_adapter(loaded.model, 1), "y": random_adapter(loaded.model, 2)}),
                    EngineConfig(kv_cache_tokens=256, max_num_batched_tokens=8, max_num_seqs=2))
    stats, outs = [], {}
    engine.on_step = stats.append
    for i, adapter in enumerate(["x", "y", None, "x"]):  # two run at once; the others queue
        r = Request(f"r{i}", [3, 4, 5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), adapter)
        r.on_output = outs.setdefault(r.request_id, []).append
        engine.add_request(r)
    engine.run_until_done()
    assert stats[0].prefill_tokens == 8 and stats[0].decode_tokens == 0 and stats[0].adapters == 2
    assert sum(s.prefill_tokens for s in stats) == 20 and sum(s.decode_tokens for s in stats) == 8
    assert all(s.seconds > 0 and s.preempted == 0 for s in stats)
    assert {s.adapters for s in stats} >= {1, 2}
    queued = {rid: o[-1].queue_seconds for rid, o in outs.items()}
    assert queued["r0"] < queued["r2"] and queued["r3"] > 0


def test_requests_that_can_never_run_are_refused(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, config=EngineConfig(kv_cache_tokens=64, block_size=16))
    with pytest.raises(RequestError, match="maximum context length"):
        engine.check_request(250, 10, None)
    with pytest.raises(RequestError, match="KV cache"):
        engine.check_request(60, 10, None)
    with pytest.raises(RequestError, match="empty"):
        engine.check_request(0, 10, None)
    with pytest.raises(UnknownAdapterError, match="'nope' is not registered"):
        engine.check_request(5, 5, "nope")


class SlowPager(StaticAdapters):
    """Adapter "late" reaches its GPU slot only after a few steps, as a registry page-in would."""

    def __init__(self, *args, delay_steps: int = 4, **kw):
        super().__init__(*args, **kw)
        self.steps, self.delay = 0, delay_steps
        self.active: dict[str, int] = {}

    def between_steps(self):
        self.steps += 1
        return []

    def activate(self, handle):
        if handle == "late" and self.steps < self.delay:
            return None
        self.active[handle] = self.active.get(handle, 0) + 1
        return super().activate(handle)

    def deactivate(self, handle):
        self.active[handle] -= 1


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_request_waiting_for_its_adapter_does_not_hold_up_others(loaded, async_scheduling):
    pager = SlowPager(loaded.model, {"late": random_adapter(loaded.model, 1), "now": random_adapter(loaded.model, 2)})
    engine = Engine(loaded.model, loaded.tokenizer, pager,
                    EngineConfig(kv_cache_tokens=256, async_scheduling=async_scheduling))
    lag = int(async_scheduling)  # a step's tokens land during the next step
    first_token_step = {}
    reqs = [Request("late", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), "late"),
            Request("now", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), "now"),
            Request("base", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))]
    for r in reqs:
        r.on_output = lambda out, r=r: first_token_step.setdefault(r.request_id, pager.steps)
        engine.add_request(r)
    engine.run_until_done()
    assert first_token_step["now"] == first_token_step["base"] == 1 + lag
    assert first_token_step["late"] >= pager.delay + lag
    assert pager.active == {"late": 0, "now": 0}


def test_async_engine_streams_and_cancels(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, config=EngineConfig(kv_cache_tokens=256))
    async_engine = AsyncEngine(engine).start()

    async def main():
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        outs = [o async for o in async_engine.generate("a", [5, 6, 7], params)]
        assert len(tokens_of(outs)) == 6 and outs[-1].finished

        # a consumer that stops early (client gone) aborts its request
        stream = async_engine.generate("b", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if not await async_engine.call(lambda: bool(engine.requests)):
                break
            await asyncio.sleep(0.01)
        assert not engine.requests
        assert await async_engine.call(lambda: engine.allocator.num_free) == engine.allocator.num_blocks - 1

        with pytest.raises(RequestError):
            async for _ in async_engine.generate("c", [5] * 300, params):
                pass

        # concurrent requests all complete
        async def one(i):
            return [o async for o in async_engine.generate(f"c{i}", [5 + i, 6], params)]
        results = await asyncio.gather(*(one(i) for i in range(5)))
        assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)

    try:
        asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert not async_engine.running


def test_failed_step_fails_its_requests_and_engine_keeps_going(loaded, monkeypatch):
    engine = Engine(loaded.model, loaded.tokenizer, config=EngineConfig(kv_cache_tokens=256))
    async_engine = AsyncEngine(engine).start()
    real_run = engine.runner.run
    calls = {"n": 0}

    def flaky(sched, pending=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_run(sched, pending)
    monkeypatch.setattr(engine.runner, "run", flaky)

    async def main():
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        first = [o async for o in async_engine.generate("x", [5, 6], params)]
        assert first[-1].finish_reason is FinishReason.ERROR and "boom" not in first[-1].error  # text: log only
        assert first[-1].error == "internal error in the engine; see the server log (request x)"
        second = [o async for o in async_engine.generate("y", [5, 6], params)]
        assert second[-1].finish_reason is FinishReason.LENGTH

    try:
        asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1


def test_submit_gives_the_engines_own_text_with_detokenization_off_the_engine_thread(loaded):
    """Requests without stop strings are detokenized by AsyncEngine.submit's consumer, not the
    engine: same tokens, text and finish reasons as the engine's own detokenization, when the
    output ends by length, by a stop token (its text left out) and on a stop string (still
    detokenized by the engine)."""
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in ("hello world", "the end of", "abc")]
    greedy = dict(max_tokens=10, temperature=0, ignore_eos=True)
    probe = collect(Engine(loaded.model, tok, config=EngineConfig(kv_cache_tokens=512)),
                    [Request("p", prompts[0], SamplingParams(**greedy))])
    stop_token = tokens_of(probe["p"])[4]
    params = [SamplingParams(**greedy), SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(**{**greedy, "max_tokens": 10}, stop_token_ids=[stop_token]),
              SamplingParams(**greedy, stop=[text_of(probe["p"])[3:5] or "x"])]
    jobs = [(f"r{i}-{j}", ids, p) for i, ids in enumerate(prompts) for j, p in enumerate(params)]
    expected = collect(Engine(loaded.model, tok, config=EngineConfig(kv_cache_tokens=2048)),
                       [Request(rid, ids, p) for rid, ids, p in jobs])
    engine = Engine(loaded.model, tok, config=EngineConfig(kv_cache_tokens=2048))
    async_engine = AsyncEngine(engine).start()

    async def main():
        got = {rid: [] for rid, _, _ in jobs}
        async for batch in async_engine.submit(jobs):
            for out in batch:
                got[out.request_id].append(out)
        return got

    try:
        got = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert any(o.finish_reason is FinishReason.STOP for outs in got.values() for o in outs if o.finished)
    for rid, _, _ in jobs:
        assert tokens_of(got[rid]) == tokens_of(expected[rid]), rid
        assert text_of(got[rid]) == text_of(expected[rid]), rid
        assert got[rid][-1].finish_reason is expected[rid][-1].finish_reason, rid
