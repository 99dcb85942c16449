"""Paged multi-adapter LoRA kernels against their references, the per-token definition and
the slot kernels holding the same adapters; the launch from shapes only.

Without CUDA the Triton kernels run in Triton's interpreter (conftest.py): shapes stay small.
Every page no adapter owns is NaN, and so is every page that table entries outside the
slots' runs point to: a kernel that reads anything but real ranks poisons its output. Where
it matters, the shrink's h starts NaN too (`_nan_h`): the shrink must write only its own
rows and rank tiles, and the expand must read only what the shrink wrote.
"""

from itertools import accumulate

import pytest
import torch

from loraplex.kernels import runtime, splitk
from loraplex.kernels.lora import BatchMeta, LoRAConfig, LoRAStack, apply_lora, shrink_launch
from loraplex.kernels.lora_paged import (
    PagedLoRA,
    apply_paged_lora,
    paged_delta_ref,
    paged_expand,
    paged_expand_ref,
    paged_shrink,
    paged_shrink_launch,
    paged_shrink_ref,
    slice_weights,
)
from loraplex.kernels.workspace import Workspace, WorkspaceError

# output rounding (one ulp: the interpreter truncates) plus h rounded for the expand on GPU
TOL = {torch.bfloat16: (2**-7, 1e-2), torch.float16: (2**-10, 1e-2), torch.float32: (1e-5, 1e-5)}


# --- builders --------------------------------------------------------------------------------


def _adapters(k, slices, ranks, seed=0):
    """Per slot, per slice (A [r, K], B [N_l, r], scaling) in fp32, or None: ranks[s] is a rank
    for every slice or a tuple of one rank per slice (0: the adapter does not target it)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r_slot in ranks:
        per_slice = []
        for n, r in zip(slices, r_slot if isinstance(r_slot, tuple) else (r_slot,) * len(slices)):
            per_slice.append(None if r == 0 else (torch.randn(r, k, generator=g) / k**0.5,
                                                  torch.randn(n, r, generator=g) / r**0.5, 2.0 / r))
        out.append(per_slice)
    return out


def _paged(adapters, k, slices, width, dtype, device, max_rank=None, seed=0) -> PagedLoRA:
    """A PagedLoRA holding `adapters` in shuffled pages, one table run per slot (in shuffled
    slot order, a stray entry before each run pointing at a NaN page), records as column
    views of wider tensors laid out like the pool's ([S, 3, C] info, [S, C'] scaling)."""
    g = torch.Generator().manual_seed(1000 + seed)
    s_count, l_count = len(adapters), len(slices)
    top = max((e[0].shape[0] for per in adapters for e in per if e is not None), default=1)
    info = torch.full((s_count, 3, l_count + 3), 10**6, dtype=torch.int32)  # junk where never read
    info[:, 0] = 0
    scaling = torch.full((s_count, l_count + 1), 99.0)
    contents, table = [], []  # page contents in order; table entries: index into contents, or None (stray)
    for s in torch.randperm(s_count, generator=g).tolist():
        table.append(None)
        for l, entry in enumerate(adapters[s]):
            if entry is not None:
                a, b, scale = entry
                info[s, 0, 2 + l], scaling[s, 1 + l] = a.shape[0], scale
                for i, rows in ((1, a), (2, b.T)):
                    info[s, i, 2 + l] = len(table)
                    for page in rows.reshape(-1, width):
                        table.append(len(contents))
                        contents.append(page)
    spare = max(4, len(contents) // 2)
    ids = torch.randperm(len(contents) + spare, generator=g)
    pages = torch.full((len(ids), width), float("nan"))
    if contents:
        pages[ids[:len(contents)]] = torch.stack(contents)
    stray = ids[len(contents):].tolist()
    table = [stray[i % spare] if c is None else int(ids[c]) for i, c in enumerate(table)]
    info, scaling = info.to(device), scaling.to(device)
    return PagedLoRA(
        pages=pages.to(device, dtype), table=torch.tensor(table, dtype=torch.int32, device=device),
        rank=info[:, 0, 2: 2 + l_count], scaling=scaling[:, 1:], a_start=info[:, 1, 2: 2 + l_count],
        b_start=info[:, 2, 2: 2 + l_count], slices=tuple(slices), in_features=k,
        max_rank=max_rank or max(16, 1 << (top - 1).bit_length()),
        slice_starts=torch.tensor([0, *accumulate(slices)], dtype=torch.int32, device=device),
    )


def _stack(k, slices, ranks, width, dtype, device, max_rank=None, seed=0):
    """(PagedLoRA, the adapters it holds in `dtype` on `device`)."""
    adapters = _adapters(k, slices, ranks, seed)
    cast = [[None if e is None else (e[0].to(device, dtype), e[1].to(device, dtype), e[2]) for e in per]
            for per in adapters]
    return _paged(adapters, k, slices, width, dtype, device, max_rank, seed), cast


def _slot_stack(adapters, k, slices, dtype, device):
    """The slot kernels' LoRAStack holding the same adapters."""
    top = max(e[0].shape[0] for per in adapters for e in per if e is not None)
    stack = LoRAStack.allocate(len(adapters), k, slices, top, dtype, device)
    for s, per_slice in enumerate(adapters):
        stack.set_slot(s, per_slice)
    return stack


def _inputs(t, stack, slots=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    slot_ids = torch.randint(-1, stack.num_slots, (t,), generator=g, dtype=torch.int32) if slots is None \
        else torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(t, stack.in_features, generator=g)
    y0 = torch.randn(t, stack.out_features, generator=g)
    to = dict(device=stack.device, dtype=stack.dtype)
    return slot_ids.to(stack.device), x.to(**to), y0.to(**to)


def _assert_delta(y, y0, x, stack, slot_ids):
    expected = y0.float() + paged_delta_ref(x, stack, slot_ids)
    rtol, atol = TOL[y.dtype]
    size = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=atol * size)


def _nan_h(monkeypatch):
    """Make the shrink's torch.empty h NaN: what it leaves unset stays NaN, and anything it
    writes out of place (another segment's rows, base rows, rank tiles past a real rank) shows."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


# --- the builder and the gather --------------------------------------------------------------


def test_slice_weights_gathers_each_adapter_through_the_table(device):
    stack, adapters = _stack(32, (32, 16), [(3, 0), 0, (16, 1)], 16, torch.float32, device)
    assert stack.rank.stride() == (3 * 5, 1) and stack.scaling.stride() == (3, 1)  # the pool's layout
    assert torch.isnan(stack.pages).any()
    for s, per_slice in enumerate(adapters):
        for l, entry in enumerate(per_slice):
            got = slice_weights(stack, s, l)
            if entry is None:
                assert got is None
            else:
                assert torch.equal(got[0], entry[0]) and torch.equal(got[1], entry[1])


# --- end to end ------------------------------------------------------------------------------

CASES = {
    # name: (K, slices, page width, ranks per slot (per slice where a tuple))
    "qkv": (64, (64, 32, 32), 32, [(8, 0, 8), (0, 16, 3), 64, 0, (1, 1, 0)]),  # disjoint targets
    "gate_up": (96, (48, 80), 16, [(16, 0), (0, 5), 32, 0]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_apply_matches_definition_references_and_slot_kernels(device, case, dtype, monkeypatch):
    k, slices, width, ranks = CASES[case]
    stack, adapters = _stack(k, slices, ranks, width, dtype, device, seed=len(ranks))
    slot_ids, x, y0 = _inputs(37, stack, seed=3)  # more tokens than a tile, base tokens too
    meta = BatchMeta.build(slot_ids, stack.num_slots)
    _nan_h(monkeypatch)  # the expand reads no h entry the shrink left unset
    y = apply_paged_lora(x, y0.clone(), stack, meta)
    monkeypatch.undo()
    assert torch.isfinite(y).all()
    _assert_delta(y, y0, x, stack, slot_ids)
    rtol, atol = TOL[dtype]
    with runtime.reference_kernels():  # the CPU path
        torch.testing.assert_close(y, apply_paged_lora(x, y0.clone(), stack, meta), rtol=rtol, atol=atol)
    slots = apply_lora(x, y0.clone(), _slot_stack(adapters, k, slices, dtype, device), meta)
    if dtype == torch.float32 and device.type == "cuda":
        rtol, atol = 2**-10, 1e-3  # the slot kernels take tf32 products on fp32
    torch.testing.assert_close(y, slots, rtol=rtol, atol=atol)
    base = slot_ids < 0
    assert torch.equal(y[base], y0[base])  # base-model tokens untouched, bit for bit
    starts = list(accumulate(slices, initial=0))
    for s, per_slice in enumerate(adapters):  # so are the slices a slot's adapter does not target
        for l, entry in enumerate(per_slice):
            if entry is None:
                rows = slot_ids == s
                assert torch.equal(y[rows, starts[l]: starts[l + 1]], y0[rows, starts[l]: starts[l + 1]])


def test_ranks_1_to_256_in_one_batch(device, monkeypatch):
    stack, _ = _stack(64, (32,), [1, 3, 0, 8, 64, 256, 0], 32, torch.bfloat16, device)
    assert stack.max_rank == 256
    slot_ids, x, y0 = _inputs(24, stack, [5, 0, -1, 1, 3, 4, 5, 2, 6, 1, -1, 4] * 2)
    meta = BatchMeta.build(slot_ids, stack.num_slots)
    _nan_h(monkeypatch)  # four rank tiles a slice: the expand stops at the last real one
    y = apply_paged_lora(x, y0.clone(), stack, meta)
    h = paged_shrink(x, stack, meta)
    monkeypatch.undo()
    _assert_delta(y, y0, x, stack, slot_ids)
    mask = _defined(h, stack, meta)
    torch.testing.assert_close(h[mask], paged_shrink_ref(x, stack, meta)[mask], rtol=1e-5, atol=1e-5)
    if runtime.use_triton(device):
        assert torch.isnan(h[~mask]).all()


@pytest.mark.parametrize("pattern", ["no_tokens", "one_token", "one_slot", "all_base", "each_own"])
def test_edge_batches(device, pattern):
    stack, _ = _stack(32, (32, 16), [4, 16, (0, 2), 0], 16, torch.bfloat16, device)
    slots = {"no_tokens": [], "one_token": [1], "one_slot": [2] * 20,  # 20 > one 16-token tile
             "all_base": [-1] * 3, "each_own": [3, 2, 1, 0, -1]}[pattern]
    slot_ids, x, y0 = _inputs(len(slots), stack, slots)
    y = apply_paged_lora(x, y0.clone(), stack, BatchMeta.build(slot_ids, stack.num_slots))
    _assert_delta(y, y0, x, stack, slot_ids)
    if pattern == "all_base":
        assert torch.equal(y, y0)


def test_output_may_be_a_column_slice_of_a_wider_tensor(device):
    stack, _ = _stack(32, (48,), [16, 8], 16, torch.float16, device)
    slot_ids, x, _ = _inputs(5, stack, [1, -1, 0, 1, 0])
    wide = torch.randn(5, 80, device=device, dtype=torch.float16)
    before = wide.clone()
    apply_paged_lora(x, wide[:, 16:64], stack, BatchMeta.build(slot_ids, 2))
    assert torch.equal(wide[:, :16], before[:, :16]) and torch.equal(wide[:, 64:], before[:, 64:])
    _assert_delta(wide[:, 16:64], before[:, 16:64], x, stack, slot_ids)


# --- each kernel against its reference -------------------------------------------------------


def _defined(h, stack, meta):
    """Mask of the h entries the shrink defines: rows of adapted tokens, the rank tiles that
    hold real ranks (zeros past the real rank inside them)."""
    r, block_r = stack.max_rank, min(stack.max_rank, 64)
    slot_of_row = meta.slot_ids[meta.order.long()].long()
    mask = torch.zeros_like(h, dtype=torch.bool)
    for i, s in enumerate(slot_of_row.tolist()):
        if s >= 0:
            for l, rank in enumerate(stack.rank[s].tolist()):
                mask[i, l * r: l * r + -(-rank // block_r) * block_r] = True
    return mask


@pytest.mark.parametrize("split_k", [0, 1, 2, 4])  # 0: chosen; K = 96 is 3 chunks: 4 leaves one empty
def test_shrink_split_k_through_a_frozen_workspace(device, split_k, monkeypatch):
    stack, _ = _stack(96, (32, 64), [(8, 0), 64, (0, 20), 0], 32, torch.bfloat16, device)
    slot_ids, x, _ = _inputs(9, stack, [2, 0, -1, 1, 1, 3, 0, 2, 1])
    meta = BatchMeta.build(slot_ids, stack.num_slots)
    config = LoRAConfig(shrink_split_k=split_k)
    plan = paged_shrink_launch(stack, 9, x.device, config)
    assert plan.block_k == 32 and plan.grid == (meta.max_tiles, 2 * 64 // plan.block_r, plan.split)
    assert split_k == 0 or plan.split == split_k
    ws = Workspace(x.device)  # as an engine does: sized from the launch, frozen before the step
    ws.reserve(plan.needs)
    ws.freeze()
    _nan_h(monkeypatch)
    h = paged_shrink(x, stack, meta, config, ws)
    monkeypatch.undo()
    mask = _defined(h, stack, meta)
    expected = paged_shrink_ref(x, stack, meta)  # zero past the real ranks
    torch.testing.assert_close(h[mask], expected[mask], rtol=1e-5, atol=1e-5)
    if runtime.use_triton(device):  # the kernel leaves the rest unset (the reference zeroes it)
        assert torch.isnan(h[~mask]).all()
    assert not any(buf.any() for buf in ws.buffers().values())  # the workspace is clean again
    assert (plan.split > 1) == bool(ws.sizes())


def test_frozen_workspace_too_small_raises(device):
    stack, _ = _stack(96, (32,), [8], 32, torch.bfloat16, device)
    slot_ids, x, _ = _inputs(4, stack, [0] * 4)
    ws = Workspace(x.device)
    ws.reserve(paged_shrink_launch(stack, 2, x.device, LoRAConfig(shrink_split_k=2)).needs)
    ws.freeze()
    with pytest.raises(WorkspaceError, match="splitk.values"):
        paged_shrink(x, stack, BatchMeta.build(slot_ids, 1), LoRAConfig(shrink_split_k=2), ws)


def test_expand_matches_reference(device):
    stack, _ = _stack(32, (64, 32), [16, (0, 64), 8], 32, torch.float16, device)
    slot_ids, _, y0 = _inputs(6, stack, [1, 1, 0, -1, 2, 0])
    meta = BatchMeta.build(slot_ids, 3)
    h = torch.randn(6, stack.h_width, device=device) * 0.1
    got = paged_expand(h, stack, meta, y0.clone(), LoRAConfig(expand_block_n=16))
    expected = paged_expand_ref(h.half().float(), stack, meta, y0.float().clone())
    torch.testing.assert_close(got.float(), expected, rtol=2**-10, atol=2e-3)


# --- launches --------------------------------------------------------------------------------


def test_grid_from_shapes_only_and_no_host_sync(device, monkeypatch):
    """The same launches (grid, scalars, compile-time arguments) for other slot ids, ranks and
    page placements of the same shapes, and no .item() / .tolist() on the way."""
    if not runtime.use_triton(device):
        pytest.skip("the Triton kernels do not run here")
    runs = []
    for seed, ranks, slots in ((0, [4, 0, 64], [0, 0, 2, -1, 2]), (1, [64, 16, (0, 1)], [1, -1, -1, 1, 1])):
        stack, _ = _stack(64, (32, 32), ranks, 16, torch.bfloat16, device, max_rank=64, seed=seed)
        slot_ids, x, y0 = _inputs(5, stack, slots)
        runs.append((stack, BatchMeta.build(slot_ids, 3), x, y0))
    launches = []

    def record(kernel, grid, *args, **meta):
        scalars = tuple(a for a in args if not isinstance(a, torch.Tensor))
        launches.append((kernel.fn.__name__, grid, scalars, tuple(sorted(meta.items()))))

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the wrapper")

    monkeypatch.setattr(runtime, "launch", record)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    for stack, meta, x, y0 in runs:
        apply_paged_lora(x, y0, stack, meta, LoRAConfig(shrink_split_k=2))
    monkeypatch.undo()
    assert len(launches) == 4 and launches[:2] == launches[2:]
    plan = paged_shrink_launch(runs[0][0], 5, device, LoRAConfig(shrink_split_k=2))
    assert launches[0][1] == plan.grid == (5 // 16 + 1 + 3, 2 * 64 // 64, 2)
    assert launches[1][1] == (plan.grid[0], 32 // 16, 2)


def test_launch_tiles():
    stack, _ = _stack(96, (48,), [8], 48, torch.float32, "cpu")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    split = LoRAConfig(shrink_split_k=3)  # no device query
    assert paged_shrink_launch(stack, 4, cpu, split).block_k == 16  # 48 = 16 * 3: the largest power of two
    wide, _ = _stack(2048, (1024, 4096), [8], 1024, torch.float32, "cpu")
    assert paged_shrink_launch(wide, 4, cuda, split).block_k == 256
    assert paged_shrink_launch(wide, 4, cpu, split).block_k == 64
    assert paged_shrink_launch(wide, 4, cpu, LoRAConfig(shrink_block_k=100, shrink_split_k=1)).block_k == 64
    plan = paged_shrink_launch(wide, 300, cuda, split)
    assert plan.block_t == 64 and plan.block_r == 16
    assert plan.needs == splitk.splitk_needs(3, 300 * wide.h_width, plan.grid[0] * plan.grid[1])


# --- errors ----------------------------------------------------------------------------------


def test_input_errors(device):
    stack, _ = _stack(32, (16,), [4, 4], 16, torch.bfloat16, device)
    slot_ids, x, y = _inputs(2, stack, [0, 1])
    meta = BatchMeta.build(slot_ids, 2)
    with pytest.raises(ValueError, match=r"paged_shrink: expected \[2, 32\]"):
        paged_shrink(x[:, :16], stack, meta)
    with pytest.raises(ValueError, match="built for 3 slots"):
        paged_shrink(x, stack, BatchMeta.build(slot_ids, 3))
    with pytest.raises(ValueError, match="y must be"):
        paged_expand(torch.zeros(2, 16, device=device), stack, meta, y[:, :8])
    with pytest.raises(ValueError, match=r"paged_expand: expected \[2, 16\]"):
        paged_expand(torch.zeros(2, 32, device=device), stack, meta, y)
    with pytest.raises(ValueError, match="tensors on meta"):
        paged_shrink(x.to("meta"), stack, meta)
    if runtime.use_triton(device):
        with pytest.raises(ValueError, match="x is torch.float16"):
            paged_shrink(x.half(), stack, meta)
        with pytest.raises(ValueError, match="h must be contiguous fp32"):
            paged_expand(torch.zeros(2, 16, device=device, dtype=torch.bfloat16), stack, meta, y)


@pytest.mark.parametrize("broken,match", [
    (dict(in_features=40), "page width 16 must be a multiple of 16 dividing K = 40"),
    (dict(slices=(24,), slice_starts=torch.tensor([0, 24], dtype=torch.int32)), "every slice width"),
    (dict(max_rank=24), "power of two >= 16"),
    (dict(rank=torch.zeros(2, 1)), "rank must be"),
    (dict(table=torch.zeros(4, dtype=torch.int64)), "table"),
])
def test_layout_errors(broken, match):
    stack, _ = _stack(32, (16,), [4, 4], 16, torch.bfloat16, "cpu")
    for name, value in broken.items():
        setattr(stack, name, value)
    with pytest.raises(ValueError, match=match):
        stack.check()


# --- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
def test_llama_shapes_on_gpu():
    slices = (4096, 1024, 1024)  # q/k/v with GQA
    stack, _ = _stack(4096, slices, [16, 64, (0, 8, 8), 128] * 4, 1024, torch.bfloat16, "cuda")
    slot_ids, x, y0 = _inputs(512, stack, seed=5)
    y = apply_paged_lora(x, y0.clone(), stack, BatchMeta.build(slot_ids, stack.num_slots))
    rows = torch.randperm(512, device="cuda")[:32]  # the per-token oracle is slow: check a sample
    _assert_delta(y[rows], y0[rows], x[rows], stack, slot_ids[rows])


@pytest.mark.gpu
def test_cuda_graph_replay():
    stack, _ = _stack(4096, (4096,), [16, 64, 0, 8], 1024, torch.bfloat16, "cuda")
    slot_ids = torch.arange(16, device="cuda", dtype=torch.int32) % 5 - 1
    meta = BatchMeta.build(slot_ids, 4)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(16, 4096, device="cuda", dtype=torch.bfloat16)
    ws = Workspace("cuda")  # what a graph touches is sized and frozen before capture
    ws.reserve(paged_shrink_launch(stack, 16, x.device).needs)
    ws.freeze()
    apply_paged_lora(x, y, stack, meta, workspace=ws)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_paged_lora(x, y, stack, meta, workspace=ws)
    for _ in range(2):
        y.zero_()
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _assert_delta(y, torch.zeros_like(y), x, stack, slot_ids)


@pytest.mark.parametrize("t,distinct", [(64, 64), (64, 1), (1, 1), (1024, 8)])
def test_the_shrink_splits_like_the_slot_kernels_at_rank_16(monkeypatch, t, distinct):
    """A rank bound of 256 must not change the K split of a rank-16 batch: it is sized for the
    rank tiles that work (H200-sized grid, Llama-3-8B q/k/v, shapes only)."""
    monkeypatch.setattr(runtime, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    k, slices, slots = 4096, (4096, 1024, 1024), 64
    slot_stack = LoRAStack.allocate(slots, k, slices, 16, torch.bfloat16, "meta")
    c = len(slices) + 2
    records = torch.zeros(slots, 3, c, dtype=torch.int32, device="meta")
    paged = PagedLoRA(pages=torch.zeros(1, 1024, dtype=torch.bfloat16, device="meta"),
                      table=torch.zeros(1, dtype=torch.int32, device="meta"), rank=records[:, 0, :3],
                      scaling=torch.zeros(slots, c, device="meta")[:, :3], a_start=records[:, 1, :3],
                      b_start=records[:, 2, :3], slices=slices, slice_starts=torch.zeros(4, dtype=torch.int32, device="meta"),
                      in_features=k, max_rank=256)
    slot_plan, paged_plan = shrink_launch(slot_stack, t, cuda), paged_shrink_launch(paged, t, cuda)
    assert paged_plan.split == slot_plan.split and paged_plan.block_k == slot_plan.block_k == 256
