"""Paged adapter memory: the run allocator, the page format, placement, release and compaction.

Layout checks gather each slot's weights back through the page table as the kernels address
them (the `PagedLoRA` contract), independently of the kernels and their references.
"""

import random

import pytest
import torch

from loraplex.kernels.lora_pool import (LoRAPagePool, PageRuns, Projection, full_adapter_pages, page_width_for,
                                        rank_bound)

K = 48
PROJECTIONS = [
    Projection(("layers.0.q", "layers.0.k", "layers.0.v"), K, (32, 16, 16)),  # fused, 3 slices
    Projection(("layers.0.o",), 32, (K,)),
    Projection(("layers.1.down",), 80, (K,)),
]


class Lora:
    def __init__(self, a, b, scaling):
        self.a, self.b, self.scaling = a, b, scaling


def adapter(seed, ranks):
    """`ranks` maps module keys to ranks; keys left out are not targeted."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for p in PROJECTIONS:
        for key, n in zip(p.keys, p.slices):
            if ranks.get(key):
                r = ranks[key]
                modules[key] = Lora(torch.randn(r, p.in_features, generator=g), torch.randn(n, r, generator=g),
                                    0.5 + seed)
    return modules


def gathered(pool, slot):
    """{key: (A, B, scaling)} of `slot`, read through the table exactly as the kernels address it."""
    table, pages, w = pool.table.tolist(), pool.pages, pool.page_width
    out = {}
    for p, stack in zip(PROJECTIONS, pool.stacks):
        for l, key in enumerate(p.keys):
            r = int(stack.rank[slot, l])
            if not r:
                continue
            kp, np_ = p.in_features // w, p.slices[l] // w
            a0, b0 = int(stack.a_start[slot, l]), int(stack.b_start[slot, l])
            a = torch.stack([torch.cat([pages[table[a0 + i * kp + j]] for j in range(kp)]) for i in range(r)])
            bt = torch.stack([torch.cat([pages[table[b0 + i * np_ + j]] for j in range(np_)]) for i in range(r)])
            out[key] = (a, bt.T, float(stack.scaling[slot, l]))
    return out


def assert_holds(pool, slot, modules):
    got = gathered(pool, slot)
    assert got.keys() == modules.keys()
    for key, m in modules.items():
        a, b, scaling = got[key]
        assert torch.equal(a, m.a.to(pool.dtype)) and torch.equal(b, m.b.to(pool.dtype)), key
        assert scaling == pytest.approx(m.scaling), key


# -- the run allocator ------------------------------------------------------------------------


def test_runs_take_best_fit_then_largest_first_and_merge_on_give():
    runs = PageRuns(10)
    assert runs.take(3) == [(0, 3)] and runs.take(2) == [(3, 2)] and runs.take(5) == [(5, 5)]
    assert runs.take(1) is None and runs.free == 0
    runs.give([(3, 2)])
    runs.give([(0, 1), (8, 2)])
    assert runs.runs() == [(0, 1), (3, 2), (8, 2)] and runs.free == 5
    assert runs.take_contiguous(2) == 3          # the smallest run that holds it
    assert runs.take(3) == [(0, 1), (8, 2)]      # no run holds 3: the largest runs first
    runs.give([(0, 10)])
    assert runs.runs() == [(0, 10)]              # merged back into one
    with pytest.raises(RuntimeError, match="already free"):
        runs.give([(4, 1)])
    with pytest.raises(RuntimeError, match="out of range"):
        PageRuns(4).give([(3, 2)])


def test_runs_never_fragment_away_free_indices():
    rng = random.Random(0)
    runs, held = PageRuns(200), []
    for _ in range(2000):
        if held and (rng.random() < 0.5 or runs.free < 40):
            runs.give(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 40)
            taken = runs.take(n)
            assert taken is not None and sum(length for _, length in taken) == n
            held.append(taken)
        assert runs.free == 200 - sum(length for t in held for _, length in t)
    for taken in held:
        runs.give(taken)
    assert runs.runs() == [(0, 200)]


# -- sizes --------------------------------------------------------------------------------------


def test_page_width_divides_every_row_and_adapters_cost_their_real_ranks():
    assert page_width_for(PROJECTIONS) == 16
    llama8b = [Projection(("q", "k", "v"), 4096, (4096, 1024, 1024)), Projection(("o",), 4096, (4096,)),
               Projection(("g", "u"), 4096, (14336, 14336)), Projection(("d",), 14336, (4096,))]
    assert page_width_for(llama8b) == 1024
    # per rank: A rows of every slice (K each) plus B columns (N_l each), in 1024-element pages
    assert full_adapter_pages(llama8b, 1) == (3 * 4096 + 6144 + 4096 + 4096 + 2 * 4096 + 28672 + 14336 + 4096) // 1024
    pool = LoRAPagePool(llama8b, 1, 8, 1, torch.bfloat16, "cpu")
    # rank-8 q/v only, per layer: 8 * (4096 + 4096 + 4096 + 1024) = 13,312 elements per rank
    assert pool.pages_for({"q": 8, "v": 8}) * pool.page_width == 8 * 13312
    assert rank_bound(1) == 16 and rank_bound(17) == 32 and rank_bound(256) == 256
    with pytest.raises(ValueError, match="between 1 and 1024"):
        rank_bound(2000)
    with pytest.raises(ValueError, match="multiples of 16"):
        page_width_for([Projection(("x",), 24, (40,))])


def test_pack_takes_pages_for_real_ranks_and_targets_only():
    pool = LoRAPagePool(PROJECTIONS, 4, 64, 400, torch.float32, "cpu")
    ranks = {"layers.0.q": 8, "layers.0.v": 3, "layers.1.down": 1}
    packed = pool.pack(adapter(1, ranks))
    want = (8 * (48 + 32) + 3 * (48 + 16) + 1 * (80 + 48)) // 16
    assert packed.num_pages == pool.pages_for(ranks) == want
    assert packed.nbytes() == want * pool.page_bytes + pool.record_bytes
    assert packed.rank.tolist() == [8, 0, 3, 0, 1]
    with pytest.raises(ValueError, match="rank 65 is outside 1..64"):
        pool.pack(adapter(1, {"layers.0.o": 65}))
    with pytest.raises(ValueError, match="not in the model"):
        pool.pack({"layers.9.q": adapter(1, {"layers.0.q": 2})["layers.0.q"]})


# -- placement ----------------------------------------------------------------------------------


def test_load_places_scattered_pages_and_release_gives_them_back(device):
    pool = LoRAPagePool(PROJECTIONS, 3, 64, 200, torch.bfloat16, device)
    first = adapter(1, {"layers.0.q": 8, "layers.0.k": 2, "layers.1.down": 5})
    second = adapter(2, {"layers.0.v": 16, "layers.0.o": 4})
    pool.write(0, first)
    pool.write(2, second)
    assert_holds(pool, 0, first)
    assert_holds(pool, 2, second)
    assert not pool.info[1].any()  # untouched slot
    used = pool.pages_used
    pool.release(0)
    third = adapter(3, {"layers.0.q": 16, "layers.0.k": 4})  # 96 pages: more than the hole, so two runs
    pool.write(1, third)
    assert len(pool.placed[1].page_runs) == 2
    assert pool.pages_used == used - pool.pack(first).num_pages + pool.pack(third).num_pages
    assert_holds(pool, 1, third)
    assert_holds(pool, 2, second)
    with pytest.raises(RuntimeError, match="already held"):
        pool.load(1, pool.pack(first))
    with pytest.raises(RuntimeError, match="do not fit"):
        pool.load(0, pool.pack(adapter(4, {"layers.0.q": 64, "layers.1.down": 64})))
    pool.release(1)
    pool.release(2)
    assert pool.pages_free == pool.num_pages and pool._free_pages.runs() == [(0, 200)]


def test_compaction_keeps_every_slot_and_makes_room_for_a_long_run(device):
    """Table runs fragment under churn while free pages do not; compaction packs the runs."""
    pool = LoRAPagePool(PROJECTIONS, 6, 64, 120, torch.float32, device)
    small = {"layers.0.o": 4}  # 20 pages: six of them fill the pool and its table
    mods = {s: adapter(s, small) for s in range(6)}
    for s in range(6):
        pool.write(s, mods[s])
    for s in (0, 2, 4):
        pool.release(s)
    big = adapter(9, {"layers.0.q": 8})  # 40 pages: free pages suffice, no table run does
    packed = pool.pack(big)
    assert pool.fits(packed.num_pages) and not pool.table_fits(packed.num_pages)
    with pytest.raises(RuntimeError, match="compact it first"):
        pool.load(0, packed)
    pool.compact_table()
    assert pool.table_fits(packed.num_pages)
    pool.load(0, packed)
    for s in (1, 3, 5):
        assert_holds(pool, s, mods[s])
    assert_holds(pool, 0, big)


def test_thousand_cycles_of_random_ranks_and_targets_place_exactly_and_free_everything():
    """Long churn with ranks 1..64 and random targets: every adapter that fits in the free pages
    is placed (compacting the table when its runs are too short), reads back exactly, and the
    pool is wholly free at the end."""
    rng = random.Random(1)
    keys = [k for p in PROJECTIONS for k in p.keys]
    pool = LoRAPagePool(PROJECTIONS, 8, 64, 600, torch.float32, "cpu")
    held, compactions = {}, 0
    for cycle in range(1000):
        free_slots = [s for s in range(8) if s not in held]
        ranks = {k: rng.choice([1, 4, 16, 33, 64]) for k in rng.sample(keys, rng.randint(1, len(keys)))}
        mods = adapter(cycle, ranks)
        need = pool.pages_for(ranks)
        while held and (not free_slots or not pool.fits(need)):  # evict at random until it fits
            slot = rng.choice(sorted(held))
            pool.release(slot)
            del held[slot]
            free_slots.append(slot)
        if not pool.fits(need):
            continue  # larger than the pool: never placed
        if not pool.table_fits(need):
            pool.compact_table()
            compactions += 1
        slot = rng.choice(free_slots)
        pool.load(slot, pool.pack(mods))
        held[slot] = mods
        if cycle % 97 == 0:
            for s, m in held.items():
                assert_holds(pool, s, m)
    assert compactions > 0
    for s, m in held.items():
        assert_holds(pool, s, m)
        pool.release(s)
    assert pool.pages_free == pool.num_pages and not pool.placed
    assert pool._free_pages.runs() == [(0, 600)] and pool._free_table.runs() == [(0, 600)]
