"""The prefix cache: the allocator's block states, keys per adapter version, and the engine
with the cache on against the engine with it off (greedy, token for token)."""

from __future__ import annotations

import pytest
import torch

from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.kv_cache import BlockAllocator
from loraplex.engine.prefix_cache import block_key
from loraplex.engine.request import FinishReason, Request
from loraplex.engine.sampling import SamplingParams
from tests.factory import random_adapter

pytestmark = pytest.mark.usefixtures("reference_kernels")

BS = 4


# -- the allocator ----------------------------------------------------------------------------

def test_released_blocks_stay_findable_until_grow_needs_them_tail_first():
    alloc = BlockAllocator(7, BS)  # 6 usable blocks
    table: list[int] = []
    assert alloc.grow(table, 3 * BS)
    keys = [bytes([i]) * 16 for i in range(3)]
    for block, key in zip(table, keys):
        assert alloc.publish(block, key, tag=0)
    owned = list(table)
    alloc.free(table)
    assert alloc.num_free == 6 and alloc.num_cached == 3 and alloc.usage() == 0.0

    hit = alloc.lookup(keys[:2] + [b"x" * 16])  # the longest cached run, with a reference each
    assert hit == owned[:2] and alloc.num_free == 4
    alloc.free(hit)

    other: list[int] = []
    assert alloc.grow(other, 3 * BS)  # the three never-cached blocks first
    assert not set(other) & set(owned) and alloc.num_cached == 3
    assert alloc.grow(other, 4 * BS)  # then the chain's tail: released first, evicted first
    assert other[-1] == owned[2] and alloc.lookup(keys) == owned[:2]
    assert not alloc.grow(other, 7 * BS) and len(other) == 4  # all or nothing


def test_a_key_is_held_by_one_block_and_a_dropped_tag_frees_its_blocks():
    alloc = BlockAllocator(6, BS)
    a, b = [], []
    alloc.grow(a, 2 * BS)
    alloc.grow(b, BS)
    assert alloc.publish(a[0], b"k0", tag=1) and alloc.publish(a[1], b"k1", tag=1)
    assert not alloc.publish(b[0], b"k0", tag=1)  # same prefix computed twice at once: b's stays private
    assert alloc.publish(b[0], b"k2", tag=2)
    alloc.free(b)
    assert alloc.drop_tag(1) == 2  # in use by a: unfindable now, freed when a lets go
    assert alloc.lookup([b"k0"]) == [] and alloc.num_cached == 1
    alloc.free(a)
    assert alloc.num_free == 5 and alloc.num_cached == 1
    alloc.clear_cache()
    assert alloc.num_cached == 0 and alloc.num_free == 5 and alloc.lookup([b"k2"]) == []


def test_block_keys_chain_and_carry_the_adapter_version():
    tokens = [1, 2, 3, 4]
    root = block_key(b"", 0, tokens)
    assert root == block_key(b"", 0, list(tokens))
    assert len({root, block_key(b"", 1, tokens), block_key(b"", 0, [1, 2, 3, 5]),
                block_key(root, 0, tokens)}) == 4


# -- the engine -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(loaded):
    return {"a": random_adapter(loaded.model, 1), "b": random_adapter(loaded.model, 2, rank=8)}


def make_engine(loaded, adapters, cache: bool = True, **config):
    provider = StaticAdapters(loaded.model, adapters, max_rank=8)
    return Engine(loaded.model, loaded.tokenizer, provider,
                  EngineConfig(**{"block_size": BS, "kv_cache_tokens": 512, "max_num_seqs": 8,
                                  "max_num_batched_tokens": 64, "enable_prefix_caching": cache, **config}))


def prompt(seed: int, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine, arrivals: dict[int, list[Request]], max_steps: int = 2000):
    """{step: requests}; returns ({request id: tokens}, {request id: last output}, step stats)."""
    tokens, last, stats = {}, {}, []
    engine.on_step = stats.append

    def sink(out):
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
        last[out.request_id] = out

    step = 0
    while step <= max(arrivals) or engine.has_work():
        for req in arrivals.get(step, []):
            req.on_output = sink
            engine.add_request(req)
        engine.step()
        step += 1
        assert step < max_steps
    return tokens, last, stats


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_a_repeated_prefix_is_prefilled_once(loaded, adapters):
    vocab = loaded.model.config.vocab_size
    system = prompt(1, 22, vocab)
    engine = make_engine(loaded, adapters)
    first = Request("first", system + [7, 8], greedy(4))
    second = Request("second", system + [9], greedy(4))
    tokens, last, stats = run(engine, {0: [first], 8: [second]})
    assert last["first"].cached_tokens == 0
    assert last["second"].cached_tokens == 20  # 5 full blocks of the shared 22 tokens
    looked = [lookup for s in stats for lookup in s.cache_lookups]
    assert looked == [(None, 24, 0), (None, 23, 20)]
    assert sum(s.prefill_tokens for s in stats) == 24 + 3

    off = make_engine(loaded, adapters, cache=False)
    again, _, _ = run(off, {0: [Request("second", system + [9], greedy(4))]})
    assert tokens["second"] == again["second"]
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1  # cached, yet free to take


def test_a_whole_cached_prompt_still_runs_its_last_token(loaded, adapters):
    """A prompt of whole blocks, all cached: the last block is recomputed (its logits are
    needed, and a shared block is never written)."""
    p = prompt(2, 4 * BS, loaded.model.config.vocab_size)
    engine = make_engine(loaded, adapters)
    tokens, last, _ = run(engine, {0: [Request("x", p, greedy(3))], 6: [Request("y", p, greedy(3))]})
    assert last["y"].cached_tokens == 3 * BS and tokens["x"] == tokens["y"]


def test_kv_depends_on_the_adapter_so_blocks_are_shared_per_adapter_only(loaded, adapters):
    """Same prompt on the base model and two adapters: the first block's keys differ in every
    layer, so reusing one adapter's blocks for another would be wrong; none are."""
    p = prompt(3, 3 * BS + 1, loaded.model.config.vocab_size)
    engine = make_engine(loaded, adapters)
    blocks = {}
    engine.on_step = None
    for name in (None, "a", "b"):
        req = Request(f"r-{name}", p, greedy(2), name)  # still running after its prefill
        engine.add_request(req)
        engine.step()
        blocks[name] = req.block_table[0]
        engine.run_until_done()
    k = engine.kv_cache.k
    for one, other in [(None, "a"), (None, "b"), ("a", "b")]:
        assert blocks[one] != blocks[other]
        for layer in range(len(k)):
            assert not torch.allclose(k[layer][blocks[one]], k[layer][blocks[other]], atol=1e-3), (one, other, layer)
    _, last, _ = run(engine, {0: [Request(f"again-{n}", p, greedy(1), n) for n in (None, "a", "b")]})
    assert {rid: out.cached_tokens for rid, out in last.items()} == {
        "again-None": 3 * BS, "again-a": 3 * BS, "again-b": 3 * BS}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_shared_system_prompts_under_preemption_give_the_outputs_of_no_cache(loaded, adapters, async_scheduling):
    """Two system prompts, each shared by base and adapter requests arriving over time, in a
    cache small enough to preempt: the same greedy tokens as without the cache."""
    vocab = loaded.model.config.vocab_size
    systems = [prompt(10, 13, vocab), prompt(11, 8, vocab)]
    names = [None, "a", "b", None, "a", "b", "a", None, "b", "a"]

    def workload():
        arrivals: dict[int, list[Request]] = {}
        for i, name in enumerate(names):
            p = systems[i % 2] + prompt(100 + i, 1 + i % 5, vocab)
            arrivals.setdefault(3 * (i // 3), []).append(Request(f"q{i}", p, greedy(10 + i % 4), name))
        return arrivals

    config = dict(kv_cache_tokens=96, max_num_batched_tokens=24, async_scheduling=async_scheduling)
    cached_run = workload()
    on = make_engine(loaded, adapters, **config)
    tokens_on, last, stats = run(on, cached_run)
    tokens_off, _, _ = run(make_engine(loaded, adapters, cache=False, **config), workload())
    assert tokens_on == tokens_off
    assert sum(r.num_preemptions for rs in cached_run.values() for r in rs) > 0, "meant to preempt"
    assert sum(found for s in stats for _, _, found in s.cache_lookups) > 0
    assert {out.finish_reason for out in last.values()} == {FinishReason.LENGTH}
    assert on.allocator.num_free == on.allocator.num_blocks - 1


def test_aborted_requests_leave_their_blocks_for_the_next(loaded, adapters):
    p = prompt(4, 5 * BS + 2, loaded.model.config.vocab_size)
    engine = make_engine(loaded, adapters)
    gone = Request("gone", p, greedy(50), "a")
    engine.add_request(gone)
    for _ in range(3):
        engine.step()
    assert engine.abort("gone")
    _, last, _ = run(engine, {0: [Request("next", p, greedy(2), "a")]})
    assert last["next"].cached_tokens == 5 * BS
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1


def test_prompt_logprobs_requests_compute_every_position(loaded, adapters):
    p = prompt(5, 3 * BS + 3, loaded.model.config.vocab_size)
    engine = make_engine(loaded, adapters)
    first_tokens, _, _ = run(engine, {0: [Request("warm", p, greedy(2))]})
    tokens, last, stats = run(engine, {0: [Request("lp", p, greedy(2, prompt_logprobs=1))]})
    assert last["lp"].cached_tokens == 0 and sum(s.prefill_tokens for s in stats) == len(p)
    assert not [lookup for s in stats for lookup in s.cache_lookups]  # not a query: it may not use the cache
    assert tokens["lp"] == first_tokens["warm"]


def test_a_failed_step_empties_the_cache(loaded, adapters, monkeypatch):
    p = prompt(6, 4 * BS + 1, loaded.model.config.vocab_size)
    engine = make_engine(loaded, adapters)
    run(engine, {0: [Request("ok", p, greedy(2))]})
    assert engine.allocator.num_cached == 4
    real = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device fault")))
    engine.add_request(Request("doomed", prompt(7, 9, loaded.model.config.vocab_size), greedy(2)))
    with pytest.raises(RuntimeError, match="device fault"):
        engine.step()
    engine.abort_all(FinishReason.ERROR, "device fault")
    assert engine.allocator.num_cached == 0 and engine.allocator.num_free == engine.allocator.num_blocks - 1
    monkeypatch.setattr(engine.runner, "run", real)
    _, last, _ = run(engine, {0: [Request("after", p, greedy(2))]})
    assert last["after"].cached_tokens == 0


def test_churn_through_a_small_cache_evicts_and_stays_exact(loaded, adapters):
    """Prompts over three popular prefixes (one per model) mixed with one-off long prompts,
    through a cache that holds few blocks: cached blocks are evicted as needed, popular
    prefixes are found again, and every output equals the cache-off run."""
    vocab = loaded.model.config.vocab_size
    heads = [prompt(20 + i, 9 + 2 * i, vocab) for i in range(3)]
    names = [None, "a", "b"]

    def workload():
        arrivals = {}
        for i in range(24):
            if i % 3 == 2:  # a one-off prompt of 4 blocks
                req = Request(f"c{i}", prompt(300 + i, 4 * BS + 1, vocab), greedy(3), names[i % 3])
            else:
                h = (i // 3 + i) % 3
                req = Request(f"c{i}", heads[h] + prompt(200 + i, 2, vocab), greedy(3), names[h])
            arrivals[2 * i] = [req]
        return arrivals

    on = make_engine(loaded, adapters, kv_cache_tokens=64)
    tokens_on, last, stats = run(on, workload())
    tokens_off, _, _ = run(make_engine(loaded, adapters, cache=False, kv_cache_tokens=64), workload())
    assert tokens_on == tokens_off
    hits = [found for s in stats for _, _, found in s.cache_lookups]  # one admission per request, in order
    popular = [i for i in range(24) if i % 3 != 2]
    heads_of = {i: (i // 3 + i) % 3 for i in popular}
    found_again = [i for i in popular if hits[i]]
    evicted = [i for i in popular if not hits[i] and any(heads_of[j] == heads_of[i] for j in popular if j < i)]
    assert len(found_again) >= 6 and evicted and not any(hits[i] for i in range(24) if i % 3 == 2)
    assert on.allocator.num_free == on.allocator.num_blocks - 1
