"""Batched multi-adapter LoRA kernels against their references and the per-token definition.

Without CUDA the Triton kernels run in Triton's interpreter (conftest.py).
"""

import pytest
import torch

from loraplex.kernels import splitk
from loraplex.kernels.lora import (
    BatchMeta,
    LoRAConfig,
    LoRAStack,
    apply_lora,
    lora_delta_ref,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    padded_rank,
    shrink_launch,
)
from loraplex.kernels.workspace import Workspace, standalone

RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _stack(slots, k, slices, ranks, dtype, device, missing=(), seed=0):
    """A stack whose slot s holds an adapter of rank ranks[s] (0: empty slot); (s, l) in
    `missing` marks slices that slot's adapter does not target."""
    g = torch.Generator().manual_seed(seed)
    stack = LoRAStack.allocate(slots, k, slices, max(ranks), dtype, device)
    for s, r in enumerate(ranks):
        if r == 0:
            continue
        per_slice = []
        for l, n in enumerate(slices):
            if (s, l) in missing:
                per_slice.append(None)
            else:
                a = torch.randn(r, k, generator=g) / k**0.5
                b = torch.randn(n, r, generator=g) / r**0.5
                per_slice.append((a.to(device, dtype), b.to(device, dtype), 2.0 / r))
        stack.set_slot(s, per_slice)
    return stack


def _assert_delta(y, y0, x, stack, slot_ids):
    expected = y0.float() + lora_delta_ref(x, stack, slot_ids)
    # bf16 rounding of h before the expand product, plus one output ulp (interpreter truncates)
    torch.testing.assert_close(y.float(), expected, rtol=RTOL[y.dtype], atol=1e-2 * expected.abs().max().item())


# --- BatchMeta -------------------------------------------------------------------------------


@pytest.mark.parametrize("t,slots,block_t", [(0, 4, 16), (1, 4, 16), (37, 5, 16), (100, 8, 64), (64, 64, 16)])
def test_batch_meta_tiles_cover_every_adapted_token_once(device, t, slots, block_t):
    g = torch.Generator().manual_seed(t)
    slot_ids = torch.randint(-1, slots, (t,), generator=g, dtype=torch.int32).to(device)
    meta = BatchMeta.build(slot_ids, slots, block_t)
    ids = slot_ids.cpu().tolist()
    order = meta.order.cpu().tolist()
    assert sorted(order) == list(range(t))
    keys = [ids[i] if ids[i] >= 0 else slots for i in order]
    assert keys == sorted(keys)  # sorted by slot, base tokens last
    covered = []
    for s, row in zip(meta.tile_slot.cpu().tolist(), meta.tile_row.cpu().tolist()):
        if s < 0:
            continue
        start, length = int(meta.seg_start[s]), int(meta.seg_len[s])
        assert start <= row < start + length
        covered += [order[i] for i in range(row, min(row + block_t, start + length))]
    assert sorted(covered) == sorted(i for i in range(t) if ids[i] >= 0)
    assert meta.max_tiles == -(-t // block_t) + min(slots, t)
    assert [int(n) for n in meta.seg_len] == [ids.count(s) for s in range(slots)]
    assert meta.active.tolist() == [s in ids for s in range(slots)]


def test_batch_meta_rejects_a_matrix():
    with pytest.raises(ValueError, match="1-D"):
        BatchMeta.build(torch.zeros(2, 2, dtype=torch.int32), 4)


# --- end to end: shrink + expand -------------------------------------------------------------

CASES = {
    # name: (slices, ranks per slot, slices missing per slot)
    "single": ((96,), [8, 16, 64, 0], ()),
    "qkv": ((64, 32, 32), [8, 16, 64, 16], ((1, 1), (3, 0))),  # GQA widths, missing targets
    "gate_up": ((80, 80), [16, 8, 0, 64], ((0, 1),)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 5, 33, 100])
def test_apply_lora_matches_the_definition(device, case, dtype, t):
    slices, ranks, missing = CASES[case]
    stack = _stack(len(ranks), 128, slices, ranks, dtype, device, missing, seed=t)
    g = torch.Generator().manual_seed(100 + t)
    slot_ids = torch.randint(-1, len(ranks), (t,), generator=g, dtype=torch.int32).to(device)
    x = torch.randn(t, 128, generator=g).to(device, dtype)
    y0 = torch.randn(t, sum(slices), generator=g).to(device, dtype)
    y = apply_lora(x, y0.clone(), stack, BatchMeta.build(slot_ids, len(ranks)))
    _assert_delta(y, y0, x, stack, slot_ids)


@pytest.mark.parametrize("pattern", ["all_base", "one_adapter", "each_token_its_own", "empty_segments"])
def test_edge_batches(device, pattern):
    slots, t = 8, 8
    stack = _stack(slots, 64, (64, 32), [16] * slots, torch.bfloat16, device)
    slot_ids = {
        "all_base": [-1] * t,
        "one_adapter": [3] * t,
        "each_token_its_own": list(range(t)),
        "empty_segments": [0, 0, 7, 7, 7, -1, 0, 7],  # slots 1..6 have no tokens
    }[pattern]
    slot_ids = torch.tensor(slot_ids, dtype=torch.int32, device=device)
    x = torch.randn(t, 64, device=device, dtype=torch.bfloat16)
    y0 = torch.randn(t, 96, device=device, dtype=torch.bfloat16)
    y = apply_lora(x, y0.clone(), stack, BatchMeta.build(slot_ids, slots))
    _assert_delta(y, y0, x, stack, slot_ids)
    base = slot_ids < 0
    assert torch.equal(y[base], y0[base])  # base-model tokens are untouched, bit for bit


def test_untargeted_slices_and_empty_slots_are_untouched(device):
    stack = _stack(3, 64, (32, 32), [16, 16, 0], torch.bfloat16, device, missing=((0, 1),))
    slot_ids = torch.tensor([0, 1, 2, 0], dtype=torch.int32, device=device)
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    y0 = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    y = apply_lora(x, y0.clone(), stack, BatchMeta.build(slot_ids, 3))
    assert torch.equal(y[[0, 3], 32:], y0[[0, 3], 32:])  # slot 0 does not target slice 1
    assert torch.equal(y[2], y0[2])  # slot 2 holds no adapter
    assert not torch.equal(y[1], y0[1])
    assert stack.targets().tolist() == [[True, False], [True, True], [False, False]]


def test_output_may_be_a_column_slice_of_a_wider_tensor(device):
    stack = _stack(2, 64, (48,), [16, 8], torch.float16, device)
    slot_ids = torch.tensor([1, -1, 0, 1, 0], dtype=torch.int32, device=device)
    x = torch.randn(5, 64, device=device, dtype=torch.float16)
    wide = torch.randn(5, 80, device=device, dtype=torch.float16)
    before = wide.clone()
    apply_lora(x, wide[:, 16:64], stack, BatchMeta.build(slot_ids, 2))
    assert torch.equal(wide[:, :16], before[:, :16]) and torch.equal(wide[:, 64:], before[:, 64:])
    _assert_delta(wide[:, 16:64], before[:, 16:64], x, stack, slot_ids)


# --- each kernel against its reference -------------------------------------------------------


def _defined(h, stack, meta):
    """Mask of h entries the shrink defines: rows of adapted tokens, columns inside real rank."""
    r = stack.max_rank
    slot_of_row = meta.slot_ids[meta.order.long()].long()
    mask = torch.zeros_like(h, dtype=torch.bool)
    for i, s in enumerate(slot_of_row.tolist()):
        if s >= 0:
            for l, rank in enumerate(stack.rank[s].tolist()):
                mask[i, l * r: l * r + rank] = True
    return mask


@pytest.mark.parametrize("split_k", [1, 3, 8])
def test_shrink_matches_reference_and_leaves_workspace_clean(device, split_k):
    stack = _stack(4, 320, (64, 32, 32), [8, 64, 16, 0], torch.bfloat16, device, missing=((2, 2),))
    slot_ids = torch.tensor([2, 0, -1, 1, 1, 3, 0, 2, 1], dtype=torch.int32, device=device)
    meta = BatchMeta.build(slot_ids, 4)
    x = torch.randn(9, 320, device=device, dtype=torch.bfloat16)
    h = lora_shrink(x, stack, meta, LoRAConfig(shrink_block_k=64, shrink_split_k=split_k))
    expected = lora_shrink_ref(x, stack, meta)
    mask = _defined(h, stack, meta)
    torch.testing.assert_close(h[mask], expected[mask], rtol=1e-5, atol=1e-5)
    buffers = standalone(x.device).buffers()
    assert not any(buffers[n].any() for n in (splitk.VALUES, splitk.TICKETS) if n in buffers)


def test_expand_matches_reference(device):
    stack = _stack(3, 64, (64, 48), [16, 64, 8], torch.float16, device, missing=((1, 0),))
    slot_ids = torch.tensor([1, 1, 0, -1, 2, 0], dtype=torch.int32, device=device)
    meta = BatchMeta.build(slot_ids, 3)
    h = torch.randn(6, stack.a.shape[1], device=device) * 0.1
    y0 = torch.randn(6, 112, device=device, dtype=torch.float16)
    got = lora_expand(h, stack, meta, y0.clone(), LoRAConfig(expand_block_n=32))
    expected = lora_expand_ref(h.half().float(), stack, meta, y0.float().clone())
    torch.testing.assert_close(got.float(), expected, rtol=2**-10, atol=2e-3)


# --- weights and errors ----------------------------------------------------------------------


def test_padded_rank():
    assert [padded_rank(r) for r in (1, 8, 16, 17, 64, 100, 128)] == [16, 16, 16, 32, 64, 128, 128]
    with pytest.raises(ValueError, match="between 1 and 128"):
        padded_rank(129)


def test_set_slot_validates_and_replaces():
    stack = LoRAStack.allocate(2, 32, (16, 8), max_rank=16)
    with pytest.raises(ValueError, match="expected 2 slices"):
        stack.set_slot(0, [None])
    with pytest.raises(ValueError, match="slice 1: expected A"):
        stack.set_slot(0, [None, (torch.zeros(4, 32), torch.zeros(16, 4), 1.0)])
    with pytest.raises(ValueError, match="rank 32 outside"):
        stack.set_slot(0, [(torch.zeros(32, 32), torch.zeros(16, 32), 1.0), None])
    stack.set_slot(1, [(torch.ones(16, 32), torch.ones(16, 16), 0.5), (torch.ones(4, 32), torch.ones(8, 4), 2.0)])
    stack.set_slot(1, [(torch.ones(4, 32), torch.ones(16, 4), 1.0), None])  # a smaller adapter replaces it
    assert stack.rank[1].tolist() == [4, 0]
    assert not stack.a[1, 4:].any() and not stack.b[1, :, 4:].any()  # nothing of the old one remains


def test_shape_errors(device):
    stack = _stack(2, 64, (32,), [16, 16], torch.bfloat16, device)
    meta = BatchMeta.build(torch.tensor([0, 1], dtype=torch.int32, device=device), 2)
    with pytest.raises(ValueError, match=r"expected \[2, 64\]"):
        lora_shrink(torch.randn(2, 32, device=device, dtype=torch.bfloat16), stack, meta)
    with pytest.raises(ValueError, match="built for 3 slots"):
        lora_shrink(torch.randn(2, 64, device=device, dtype=torch.bfloat16), stack,
                    BatchMeta.build(torch.tensor([0, 1], dtype=torch.int32, device=device), 3))
    with pytest.raises(ValueError, match="y must be"):
        lora_expand(torch.zeros(2, 16, device=device), stack, meta, torch.zeros(2, 31, device=device))


# --- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 1024, 8192])
@pytest.mark.parametrize("distinct", [1, 64])
def test_llama_shapes_on_gpu(t, distinct):
    slices = (4096, 4096, 4096)  # Llama-2-7B q/k/v
    stack = _stack(64, 4096, slices, [16, 64] * 32, torch.bfloat16, "cuda")
    slot_ids = (torch.arange(t, device="cuda") % distinct).to(torch.int32)
    x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
    y0 = torch.randn(t, 12288, device="cuda", dtype=torch.bfloat16)
    y = apply_lora(x, y0.clone(), stack, BatchMeta.build(slot_ids, 64))
    rows = torch.randperm(t, device="cuda")[:64]  # the per-token oracle is slow: check a sample
    expected = y0[rows].float() + lora_delta_ref(x[rows], stack, slot_ids[rows])
    torch.testing.assert_close(y[rows].float(), expected, rtol=2**-7, atol=1e-2 * expected.abs().max().item())


@pytest.mark.gpu
def test_cuda_graph_replay():
    stack = _stack(8, 4096, (4096,), [16] * 8, torch.bfloat16, "cuda")
    slot_ids = torch.arange(16, device="cuda", dtype=torch.int32) % 8
    meta = BatchMeta.build(slot_ids, 8)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(16, 4096, device="cuda", dtype=torch.bfloat16)
    ws = Workspace("cuda")  # what a graph touches is sized and frozen before capture
    ws.reserve(shrink_launch(stack, 16, x.device).needs)
    ws.freeze()
    apply_lora(x, y, stack, meta, workspace=ws)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_lora(x, y, stack, meta, workspace=ws)
    for _ in range(2):
        y.zero_()
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _assert_delta(y, torch.zeros_like(y), x, stack, slot_ids)
