"""The slot arena: one row per slot holds every projection's LoRA; stacks are views into it."""

import pytest
import torch

from loraplex.kernels.lora import BatchMeta, LoRAStack, apply_lora, lora_delta_ref
from loraplex.kernels.lora_slots import LoRASlotPool, Projection

K = 48
PROJECTIONS = [
    Projection(("layers.0.q", "layers.0.k", "layers.0.v"), K, (32, 16, 16)),  # fused, 3 slices
    Projection(("layers.0.o",), 32, (K,)),
    Projection(("layers.1.down",), 80, (K,)),
]


class Lora:
    def __init__(self, a, b, scaling):
        self.a, self.b, self.scaling = a, b, scaling


def adapter(seed, rank, skip=()):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for p in PROJECTIONS:
        for key, n in zip(p.keys, p.slices):
            if key not in skip:
                modules[key] = Lora(torch.randn(rank, p.in_features, generator=g),
                                    torch.randn(n, rank, generator=g), 0.5 + seed)
    return modules


def standalone(modules, slots, max_rank, slot, dtype, device):
    """What each projection's own LoRAStack holds for `modules` in `slot` (the known-good path)."""
    out = []
    for p in PROJECTIONS:
        stack = LoRAStack.allocate(slots, p.in_features, p.slices, max_rank, dtype, device)
        stack.set_slot(slot, [None if modules.get(k) is None else (modules[k].a, modules[k].b, modules[k].scaling)
                              for k in p.keys])
        out.append(stack)
    return out


def test_write_pack_load_and_clear_match_separate_stacks(device):
    pool = LoRASlotPool(PROJECTIONS, 3, 8, torch.bfloat16, device)
    assert pool.weights.shape[0] == 3 and pool.rank_capacity == 16
    mods = adapter(1, 5, skip={"layers.0.k"})
    pool.write(1, mods)
    row = pool.new_row()
    pool.pack(row, adapter(2, 8))
    pool.load(2, row)
    for got, want1, want2 in zip(pool.stacks, standalone(mods, 3, 8, 1, torch.bfloat16, device),
                                 standalone(adapter(2, 8), 3, 8, 2, torch.bfloat16, device)):
        for name in ("a", "b", "scaling", "rank"):
            g = getattr(got, name)
            assert torch.equal(g[1], getattr(want1, name)[1]) and torch.equal(g[2], getattr(want2, name)[2]), name
            assert not g[0].any(), name  # untouched slot
    assert pool.stacks[0].rank[1].tolist() == [5, 0, 5]
    pool.clear(1)
    assert not pool.weights[1].any() and not pool.rank[1].any() and pool.weights[2].any()
    # a row reused for another adapter holds nothing of the previous one
    pool.pack(row, adapter(3, 2, skip={"layers.1.down"}))
    pool.load(2, row)
    assert pool.stacks[2].rank[2].tolist() == [0] and not pool.stacks[2].b[2].any()


def test_kernels_read_the_arena_views(device):
    """Slot strides of the views are the whole row, not the stack's own size."""
    dtype = torch.bfloat16
    pool = LoRASlotPool(PROJECTIONS, 4, 16, dtype, device)
    for slot, rank in ((0, 16), (2, 3), (3, 9)):
        pool.write(slot, {k: Lora(m.a / K**0.5, m.b / 4, m.scaling) for k, m in adapter(slot, rank).items()})
    g = torch.Generator().manual_seed(0)
    slot_ids = torch.tensor([0, 3, -1, 2, 0, 1, 3, 3, 2, -1, 0], dtype=torch.int32)
    for stack, p in zip(pool.stacks, PROJECTIONS):
        assert stack.a.stride(0) == pool.row_width
        x = torch.randn(len(slot_ids), p.in_features, generator=g).to(device, dtype)
        y0 = torch.randn(len(slot_ids), sum(p.slices), generator=g).to(device, dtype)
        y = apply_lora(x, y0.clone(), stack, BatchMeta.build(slot_ids.to(device), 4))
        expected = y0.float() + lora_delta_ref(x, stack, slot_ids)
        torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=1e-2 * expected.abs().max().item())


def test_bad_keys_and_slots_are_refused():
    pool = LoRASlotPool(PROJECTIONS, 2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="not in the model"):
        pool.write(0, {"layers.9.q": Lora(torch.zeros(2, K), torch.zeros(32, 2), 1.0)})
    with pytest.raises(ValueError, match="outside 0..1"):
        pool.write(2, {})
    with pytest.raises(ValueError, match="rank 9 is over the slots. maximum rank 8"):
        pool.write(0, adapter(0, 9))
    assert not pool.weights.any()
