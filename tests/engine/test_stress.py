"""Seeded randomized stress of the engine's request lifecycle: heavy preemption (a tiny KV
cache of small blocks), adapters that page in after random delays and out again while
unused, page-ins that fail, forced unloads, steps that raise, aborts at random steps (of
waiting, running and just-preempted requests, and right after arrival), arrivals at random
steps, varied max_tokens / stop conditions / context lengths / watermarks, with and without
async scheduling; then the same through AsyncEngine.submit with consumers that leave.

Checked after every step: each live request is in exactly one scheduler queue, with its
blocks and GPU slot accounted for; no output after a request's last. After every run: each
request ended exactly once, for the right reason and with the right token count, and
nothing is left behind (requests, blocks, adapter references, the step in flight). A
request that waits while the engine does nothing fails the run with a dump of its state.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest
import torch

from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import Engine, EngineConfig, RequestError
from loraplex.engine.request import FinishReason, Request, Status
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import runtime
from loraplex.model.loader import load_model
from tests.factory import make_model, random_adapter


pytestmark = pytest.mark.usefixtures("reference_kernels")  # fixtures: tests/engine/conftest.py

NAMES = ("a", "b", "c")
MAX_STEPS = 3000        # a run that takes longer is a livelock
MAX_IDLE_STEPS = 60     # steps computing nothing while requests wait (adapter delays are <= 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The smallest Llama the engine runs: one layer, hidden 64, fp32, on the references; with
    one torch thread (ops this small run many times slower on threads that contend for cores)."""
    root = tmp_path_factory.mktemp("tiny-llama")
    make_model(root, "llama", hidden=64, layers=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with runtime.reference_kernels():
            yield load_model(root, dtype=torch.float32, progress=False)
    finally:
        torch.set_num_threads(threads)


class RandomPager(StaticAdapters):
    """A registry stand-in: an adapter reaches its GPU slot a random number of steps after it
    is first wanted (acquire or activate), loses it again at random while no running
    sequence uses it; a page-in fails now and then (its requests end with ERROR) and a
    resident adapter is force-unloaded now and then (its requests end with ABORT)."""

    def __init__(self, model, rng: random.Random, *, max_delay: int, evict: float, fail: float, force: float):
        super().__init__(model, {n: random_adapter(model, i + 1) for i, n in enumerate(NAMES)})
        self.rng, self.max_delay, self.evict, self.fail, self.force = rng, max_delay, evict, fail, force
        self.engine: Engine | None = None
        self.steps = 0
        self.resident = {n: False for n in NAMES}
        self.ready_at: dict[str, int | None] = {n: None for n in NAMES}  # paging in until this step
        self.active = {n: 0 for n in NAMES}
        self.ended: dict[str, tuple[FinishReason, str]] = {}  # request id -> why ended (pager, failed step)
        self.not_yet = 0  # activate calls answered None (a request left waiting for its adapter)

    def _want(self, name: str) -> None:
        if not self.resident[name] and self.ready_at[name] is None:
            self.ready_at[name] = self.steps + self.rng.randint(0, self.max_delay)

    def acquire(self, name: str) -> str:
        handle = super().acquire(name)
        self._want(handle)
        return handle

    def activate(self, handle: str) -> int | None:
        if not self.resident[handle]:
            self._want(handle)
            self.not_yet += 1
            return None
        self.active[handle] += 1
        return super().activate(handle)

    def deactivate(self, handle: str) -> None:
        self.active[handle] -= 1
        assert self.active[handle] >= 0, f"adapter {handle} deactivated more often than activated"

    def between_steps(self):
        self.steps += 1
        ends = []
        for name in NAMES:
            if self.resident[name]:
                if self.active[name] == 0 and self.rng.random() < self.evict:
                    self.resident[name] = False
                elif self.rng.random() < self.force:
                    ends.append((name, FinishReason.ABORT, f"adapter {name!r} was unloaded"))
            elif self.ready_at[name] is not None and self.steps >= self.ready_at[name]:
                self.ready_at[name] = None
                if self.rng.random() < self.fail:
                    ends.append((name, FinishReason.ERROR, f"adapter {name!r} could not be loaded"))
                else:
                    self.resident[name] = True
        for name, reason, message in ends:
            for req in self.engine.requests.values():
                if req.adapter_ref == name:
                    self.ended[req.request_id] = (reason, message)
        return ends


class StepFailed(RuntimeError):
    pass


STEP_FAILED = (FinishReason.ERROR, "step failed")


@dataclass
class Planned:
    """A request of the workload and what happened to it."""

    req: Request
    arrival: int                          # step at which it is added
    outputs: list = field(default_factory=list)
    aborted: bool = False                 # engine.abort(...) returned True for it


def workload(rng: random.Random, capacity: int, vocab: int) -> list[Planned]:
    """Random requests: prompts up to half of `capacity` (the cache or the context length, the
    smaller), prompt + max_tokens up to all of it."""
    planned = []
    arrival = 0
    for i in range(rng.randint(16, 40)):
        arrival += rng.choice([0, 0, 1, 2, 5])
        prompt_len = rng.randint(1, rng.choice([4, capacity // 4, capacity // 2]))
        max_tokens = rng.randint(1, min(32, capacity - prompt_len))
        kind = rng.random()
        params = dict(max_tokens=max_tokens, ignore_eos=rng.random() < 0.8)
        if kind < 0.4:  # greedy, with the runner-up's logprob (see same_up_to_a_tie)
            params.update(temperature=0, logprobs=2)
        else:
            params.update(temperature=rng.choice([0.7, 1.0, 1.5]), seed=rng.randint(0, 2**31))
        if rng.random() < 0.3:
            params["stop_token_ids"] = rng.sample(range(3, vocab), rng.randint(1, 8))
        if rng.random() < 0.15:
            params.update(stop=[rng.choice("aeiou st")], include_stop_str_in_output=rng.random() < 0.5)
        if rng.random() < 0.2 and "logprobs" not in params:
            params["logprobs"] = rng.randint(0, 2)
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        adapter = rng.choice([None, *NAMES])
        planned.append(Planned(Request(f"r{i}", prompt, SamplingParams(**params), adapter), arrival))
    return planned


def dump(engine: Engine, pager: RandomPager) -> str:
    sched = engine.scheduler
    lines = [f"free blocks {engine.allocator.num_free}/{engine.allocator.num_blocks - 1}, "
             f"in flight {engine._in_flight is not None}, pager step {pager.steps}, "
             f"resident {pager.resident}, ready_at {pager.ready_at}, active {pager.active}"]
    for req in engine.requests.values():
        where = "waiting" if req in sched.waiting else "running" if req in sched.running else "NOWHERE"
        lines.append(f"  {req.request_id}: {req.status.value} ({where}) adapter={req.adapter} "
                     f"prompt={len(req.prompt_ids)} out={len(req.output_ids)}/{req.params.max_tokens} "
                     f"pending={req.pending} computed={req.num_computed} blocks={len(req.block_table)} "
                     f"needs={engine.allocator.blocks_needed(req.block_table, req.num_tokens)} "
                     f"preempted={req.num_preemptions}")
    return "\n".join(lines)


def check_state(engine: Engine, pager: RandomPager) -> None:
    """Between steps: every live request in exactly one queue, its resources accounted for."""
    sched, alloc = engine.scheduler, engine.allocator
    queued = list(sched.waiting) + sched.running
    ids = [r.request_id for r in queued]
    assert len(ids) == len(set(ids)), f"a request is queued twice: {ids}"
    assert set(ids) == set(engine.requests), f"scheduler {sorted(ids)} != engine {sorted(engine.requests)}"
    for req in sched.waiting:
        assert req.status is Status.WAITING and not req.block_table and req.lora_slot == -1, req.request_id
    for req in sched.running:
        assert req.status is Status.RUNNING, req.request_id
        assert len(req.block_table) * alloc.block_size >= req.num_computed, req.request_id
    blocks = [b for r in sched.running for b in r.block_table]
    assert len(blocks) == len(set(blocks)) and 0 not in blocks, "a KV block is held twice"
    assert alloc.num_free + len(blocks) == alloc.num_blocks - 1, "KV blocks leaked"
    for name in NAMES:
        assert pager.active[name] == sum(r.adapter == name for r in sched.running), name
        assert pager.refcount[name] == sum(r.adapter == name for r in engine.requests.values()), name
    limit = 1 if engine.async_scheduling else 0
    assert all(r.pending <= limit for r in queued)


def run_stress(tiny, seed: int, async_scheduling: bool, stuck: bool = False):
    """One randomized run to the end; returns the requests by id, the preemptions and the
    page-in waits, once every check has passed. `stuck`: no adapter ever pages in, and
    nothing aborts or fails (the guard against waiting forever must catch it)."""
    shape = random.Random(seed)  # the workload and engine shape: the same in both modes
    bs = shape.choice([2, 4, 8])
    capacity = bs * shape.randint(max(4, 16 // bs), max(6, 64 // bs))
    max_num_seqs = shape.choice([1, 2, 4, 4, 6, 8, 8])
    max_batched = shape.randint(max_num_seqs, 24)
    watermark = shape.choice([0.0, 0.01, 0.1, 0.3])
    max_model_len = shape.choice([None, None, capacity // 2 + 1])  # a context length under the cache's
    vocab, eos = tiny.model.config.vocab_size, tiny.tokenizer.eos_token_id
    plan = workload(shape, min(capacity, max_model_len or capacity), vocab)
    # planned aborts at a step after arrival (-1: at once, before the request's first step)
    abort_plan = {p.req.request_id: shape.choice([-1, shape.randint(p.arrival, p.arrival + 40)])
                  for p in plan if shape.random() < 0.1}

    rng = random.Random(f"{seed}-{async_scheduling}")  # what depends on the schedule
    pager = RandomPager(tiny.model, rng, max_delay=rng.choice([0, 3, 8]), evict=rng.choice([0.0, 0.05, 0.3]),
                        fail=rng.choice([0.0, 0.0, 0.1]), force=rng.choice([0.0, 0.0, 0.003]))
    churn = rng.choice([0.0, 0.5, 1.0, 2.0])  # how often requests are aborted
    broken = rng.choice([0.0, 0.0, 0.0, 0.02])  # how often a step raises (then all fail, as AsyncEngine does)
    if stuck:
        pager.max_delay, pager.fail, pager.force, churn, broken, abort_plan = 10**9, 0.0, 0.0, 0.0, 0.0, {}
    engine = Engine(tiny.model, tiny.tokenizer, pager,
                    EngineConfig(kv_cache_tokens=capacity, block_size=bs, max_num_batched_tokens=max_batched,
                                 max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                 async_scheduling=async_scheduling))
    engine.scheduler.config.watermark = watermark
    pager.engine = engine
    by_id = {p.req.request_id: p for p in plan}
    arrivals: dict[int, list[Planned]] = {}
    for p in plan:
        arrivals.setdefault(p.arrival, []).append(p)
    context = f"seed {seed}, async {async_scheduling}, block {bs}, cache {capacity}, seqs {max_num_seqs}, " \
              f"budget {max_batched}, watermark {watermark}, max_model_len {max_model_len}"

    def channel(p: Planned):
        def on_output(out):
            assert not (p.outputs and p.outputs[-1].finished), \
                f"{p.req.request_id}: output after its last ({context})"
            p.outputs.append(out)
        return on_output

    def abort(req: Request) -> None:
        if engine.abort(req.request_id):
            by_id[req.request_id].aborted = True
        else:
            assert req.status is Status.FINISHED, f"{req.request_id} is live but could not be aborted"

    def broken_run(*args):
        raise StepFailed()

    step, idle = 0, 0
    preemptions = 0
    dropped: set[str] = set()  # requests with tokens in flight when a step raised (those tokens are gone)
    last_arrival = max(arrivals)
    while step <= last_arrival or engine.has_work():
        for p in arrivals.get(step, []):
            p.req.on_output = channel(p)
            engine.add_request(p.req)
            if abort_plan.get(p.req.request_id) == -1:
                abort(p.req)
        flight = engine._in_flight
        try:
            if rng.random() < broken:
                engine.runner.run = broken_run
            computed = engine.step()
        except StepFailed:
            dropped.update(r.request_id for r in (flight.sampled if flight else []))
            pager.ended.update(dict.fromkeys(engine.requests, STEP_FAILED))
            engine.abort_all(*STEP_FAILED)
            computed = 0
        finally:
            vars(engine.runner).pop("run", None)  # back to the class's method
        preemptions += len(engine.last_step.preempted)
        # aborts: planned ones, and at random a waiting, a running or a just-preempted request
        for request_id, at in abort_plan.items():
            if at == step and request_id in engine.requests:
                abort(engine.requests[request_id])
        roll = rng.random()
        if roll < 0.01 * churn and engine.scheduler.waiting:
            abort(rng.choice(list(engine.scheduler.waiting)))
        elif roll < 0.02 * churn and engine.scheduler.running:
            abort(rng.choice(engine.scheduler.running))
        elif roll < 0.1 * churn and engine.last_step.preempted:
            abort(rng.choice(engine.last_step.preempted))
        elif roll < 0.11 * churn and step >= plan[0].arrival:  # maybe finished already: abort says False
            abort(rng.choice([p for p in plan if p.arrival <= step]).req)
        check_state(engine, pager)
        idle = idle + 1 if computed == 0 and engine.has_work() else 0
        assert idle < MAX_IDLE_STEPS, f"requests wait while nothing runs ({context}):\n{dump(engine, pager)}"
        step += 1
        assert step < MAX_STEPS, f"no end after {step} steps ({context}):\n{dump(engine, pager)}"

    # nothing left behind
    assert not engine.has_work() and not engine.requests and engine._in_flight is None, context
    assert not engine.scheduler.waiting and not engine.scheduler.running, context
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1, context
    assert pager.active == dict.fromkeys(NAMES, 0) and pager.refcount == dict.fromkeys(NAMES, 0), context
    # every request ended exactly once, for the right reason, with the right tokens
    for p in plan:
        req, outs, rid = p.req, p.outputs, p.req.request_id
        where = f"{rid} ({context})"
        assert outs and [o.finished for o in outs].count(True) == 1 and outs[-1].finished, where
        assert req.status is Status.FINISHED and not req.block_table, where
        assert req.pending == 0 or rid in dropped, where
        last, tokens = outs[-1], [t for o in outs for t in o.token_ids]
        assert last.finish_reason is not None and last.finish_reason is req.finish_reason, where
        assert last.completion_tokens == len(tokens) and tokens == req.output_ids, where
        assert len(tokens) <= req.params.max_tokens, where
        stops = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else {eos})
        assert not stops & set(tokens[:-1]), f"{where}: generation went on past a stop token"
        if p.aborted:
            assert last.finish_reason is FinishReason.ABORT, where
        elif rid in pager.ended:
            reason, message = pager.ended[rid]
            assert (last.finish_reason, last.error) == (reason, message), where
        elif last.finish_reason is FinishReason.LENGTH:
            assert len(tokens) == req.params.max_tokens, where
        else:
            assert last.finish_reason is FinishReason.STOP, where
            assert (tokens and tokens[-1] in stops) or req.params.stop, where
    return by_id, preemptions, pager.not_yet


SEEDS = range(40)


def same_up_to_a_tie(p: Planned, q: Planned) -> bool:
    """A greedy request's tokens in two runs: the same, or the same up to a position where the
    first run's top two were within rounding (batches of other shapes, a recompute after a
    preemption, can order a near-tie either way)."""
    top = [lp.top for o in p.outputs for lp in (o.logprobs or [])]
    for i, (x, y) in enumerate(zip(p.req.output_ids, q.req.output_ids)):
        if x != y:
            return len(top[i]) == 2 and y == top[i][1][0] and top[i][0][1] - top[i][1][1] < 1e-4
    return len(p.req.output_ids) == len(q.req.output_ids)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_request_ends_exactly_once_under_preemption_aborts_and_paging(tiny, seed):
    runs = {mode: run_stress(tiny, seed, mode) for mode in (False, True)}
    # a greedy request that both modes ran to its end gave the same tokens in both
    (sync, _, _), (overlapped, _, _) = runs[False], runs[True]
    done = (FinishReason.STOP, FinishReason.LENGTH)
    for rid, p in sync.items():
        q = overlapped[rid]
        if p.req.params.temperature == 0 and p.outputs[-1].finish_reason in done \
                and q.outputs[-1].finish_reason in done:
            assert same_up_to_a_tie(p, q), f"seed {seed}: {rid} differs between the modes"


def test_the_stress_really_preempts_aborts_and_waits_for_adapters(tiny):
    """The workload does what it is meant to: preemptions, aborts of preempted requests,
    requests waiting for their adapter, every finish reason."""
    preempted = waits = preempted_aborted = 0
    reasons = set()
    for seed, async_scheduling in ((5, False), (14, False), (20, True)):
        by_id, n, not_yet = run_stress(tiny, seed, async_scheduling)
        preempted, waits = preempted + n, waits + not_yet
        reasons |= {p.outputs[-1].finish_reason for p in by_id.values()}
        preempted_aborted += sum(p.aborted and p.req.num_preemptions > 0 for p in by_id.values())
    assert preempted > 30 and waits > 10 and preempted_aborted > 0 and reasons == set(FinishReason)


def test_a_request_whose_adapter_never_pages_in_is_caught(tiny):
    """The stress's own guard: a request left waiting forever fails the run, with its state."""
    stuck = r"requests wait while nothing runs(.|\n)*: waiting \(waiting\) adapter=[abc] "
    with pytest.raises(AssertionError, match=stuck):
        run_stress(tiny, 3, False, stuck=True)


def test_a_refused_request_holds_no_adapter(tiny):
    pager = RandomPager(tiny.model, random.Random(0), max_delay=0, evict=0.0, fail=0.0, force=0.0)
    engine = Engine(tiny.model, tiny.tokenizer, pager, EngineConfig(kv_cache_tokens=64, block_size=4))
    req = Request("r", [5, 6, 7], SamplingParams(max_tokens=4, stop=["x"]), "a")
    req.detokenize = False  # stop strings need the engine's detokenizer: refused
    with pytest.raises(RequestError, match="stop strings"):
        engine.add_request(req)
    assert pager.refcount["a"] == 0 and not engine.requests and not engine.has_work()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_async_engine_consumers_that_finish_leave_or_abort_leave_nothing_behind(tiny, async_scheduling):
    """Through AsyncEngine.submit: consumers that read to the end, leave after a few batches,
    or abort their requests (as the engine process does for a client gone) and read on; every
    consumer ends within a bound, and the engine ends up idle with everything given back."""
    rng = random.Random(7)
    pager = RandomPager(tiny.model, rng, max_delay=4, evict=0.2, fail=0.0, force=0.0)
    engine = Engine(tiny.model, tiny.tokenizer, pager,
                    EngineConfig(kv_cache_tokens=48, block_size=4, max_num_batched_tokens=8, max_num_seqs=4,
                                 async_scheduling=async_scheduling))
    pager.engine = engine
    async_engine = AsyncEngine(engine).start()
    async_engine.post(lambda: torch.set_num_threads(1))  # the engine thread's own setting
    vocab = tiny.model.config.vocab_size
    plans = []
    for i in range(14):
        jobs = [(f"c{i}-{j}", [rng.randrange(3, vocab) for _ in range(rng.randint(1, 16))],
                 SamplingParams(max_tokens=rng.randint(1, 20), temperature=0, ignore_eos=True,
                                stop_token_ids=rng.sample(range(3, vocab), rng.randint(0, 3))))
                for j in range(rng.randint(1, 3))]
        plans.append((jobs, rng.choice([None, *NAMES]), rng.choice(["read", "read", "leave", "abort"])))

    async def consumer(jobs, adapter, how, delay):
        await asyncio.sleep(delay)
        seen: dict[str, list] = {rid: [] for rid, _, _ in jobs}
        batches = 0
        async for batch in async_engine.submit(jobs, adapter):
            for out in batch:
                assert not (seen[out.request_id] and seen[out.request_id][-1].finished), out.request_id
                seen[out.request_id].append(out)
            batches += 1
            if how == "leave" and batches == 2:
                break
            if how == "abort" and batches == 1:
                doomed = [rid for rid, _, _ in jobs]
                async_engine.post(lambda: [engine.abort(rid) for rid in doomed])
        return how, jobs, seen

    async def main():
        results = await asyncio.wait_for(asyncio.gather(*(consumer(j, a, h, 0.002 * i)
                                                          for i, (j, a, h) in enumerate(plans))), 120)
        for _ in range(500):  # the aborts of consumers that left run at the next step boundary
            if not await async_engine.call(engine.has_work):
                break
            await asyncio.sleep(0.01)
        state = await async_engine.call(lambda: (engine.has_work(), dict(engine.requests),
                                                  engine.allocator.num_free, dict(pager.active),
                                                  dict(pager.refcount)))
        return results, state

    try:
        results, (busy, left, free, active, refcount) = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert not busy and not left and free == engine.allocator.num_blocks - 1
    assert active == dict.fromkeys(NAMES, 0) and refcount == dict.fromkeys(NAMES, 0)
    for how, jobs, seen in results:
        if how == "leave":
            continue
        for rid, _, params in jobs:
            outs = seen[rid]
            assert outs and outs[-1].finished, rid
            tokens = [t for o in outs for t in o.token_ids]
            if how == "abort" and outs[-1].finish_reason is FinishReason.ABORT:
                assert len(tokens) < params.max_tokens, rid
            elif outs[-1].finish_reason is FinishReason.LENGTH:
                assert len(tokens) == params.max_tokens, rid
            else:
                assert outs[-1].finish_reason is FinishReason.STOP, rid
                assert tokens[-1] in params.stop_token_ids, rid
