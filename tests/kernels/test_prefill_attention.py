"""Paged prefill attention: the kernel against its reference, the reference against dense
causal SDPA per sequence, and the launch grid from shapes only.

Without CUDA the Triton kernel runs in Triton's interpreter (conftest.py): shapes stay small.
"""

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import prefill_attention, runtime
from loraplex.kernels.prefill_attention import (paged_prefill_attention, paged_prefill_attention_ref,
                                                prefill_grid, prefill_tiles)
from tests.kernels.test_attention import bad_q_and_cache, paged_cache

# output rounding (the interpreter truncates to bf16: one ulp) plus P rounded for P @ V on GPU
TOL = {torch.bfloat16: (2**-7, 1e-2), torch.float16: (2**-9, 2e-3), torch.float32: (1e-5, 1e-5)}


def _chunks(block_size):
    """(context, length) per chunk, in one launch: a fresh prompt longer than a 16- or 32-row
    tile, a chunk starting exactly at a block boundary, a single row inside a block, a
    context longer than a K/V tile (64) starting inside a block, at 64 * k - 2 (the first
    K/V tile past the unmasked ones holds two keys the first query sees), a short chunk at
    context 3."""
    return [(0, 70), (2 * block_size, 5), (37, 1), (126, 17), (3, 40)]


def _paged(chunks, hq, hkv, d, block_size, dtype, device, seed=0):
    """q [T, Hq, D] packing every chunk's rows, a paged cache holding each sequence's K/V up to
    its chunk's end in shuffled blocks, cu_seqlens, context_lens and block tables, plus each
    sequence's contiguous K/V [context + length, Hkv, D]. Every slot no sequence wrote is
    NaN, as is a spare block that garbage table entries point to: reading any of them would
    poison the output."""
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, seqs = paged_cache([c + n for c, n in chunks], hkv, d, block_size, dtype, g)
    lens = [n for _, n in chunks]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(sum(lens), hq, d, generator=g)
    to = dict(device=device, dtype=dtype)
    contexts = torch.tensor([c for c, _ in chunks], dtype=torch.int32, device=device)
    return (q.to(**to), k_cache.to(**to), v_cache.to(**to), cu.to(device), contexts, tables.to(device), seqs)


def _check_kernel(chunks, hq, hkv, d, block_size, dtype, device):
    q, k_cache, v_cache, cu, contexts, tables, _ = _paged(chunks, hq, hkv, d, block_size, dtype, device)
    scale = d**-0.5
    out = paged_prefill_attention(q, k_cache, v_cache, cu, contexts, tables, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()  # no unwritten slot, no garbage block, was read
    # the reference in fp32 from the same (rounded) inputs: the exact answer
    expected = paged_prefill_attention_ref(q.float(), k_cache.float(), v_cache.float(), cu, contexts, tables,
                                           scale)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("hq,hkv,d,block_size,dtype", [
    (2, 2, 64, 16, torch.bfloat16),   # G = 1: 128-row tiles; a 130-row chunk takes two
    (4, 1, 128, 32, torch.float16),   # G = 4: 32 positions a tile
    (8, 1, 64, 16, torch.bfloat16),   # G = 8: 16 positions a tile
    (8, 2, 128, 16, torch.bfloat16),  # G = 4 over two kv heads
])
def test_kernel_matches_reference(device, hq, hkv, d, block_size, dtype):
    chunks = _chunks(block_size)
    if hq == hkv:
        chunks = chunks + [(20, 130)]
    _check_kernel(chunks, hq, hkv, d, block_size, dtype, device)


@pytest.mark.parametrize("hq,hkv,tiles", [
    (2, 2, (4, 16)),   # 4 rows a tile padded to 16; K/V tiles smaller than a cache block
    (12, 2, (2, 32)),  # G = 6 padded to 8 heads, x 2 positions = 16 rows
])
def test_small_tiles_match_reference(device, monkeypatch, hq, hkv, tiles):
    # many tiles per chunk and many diagonal tiles, an empty chunk in the middle, a tile
    # starting at BLOCK_N * k - 2
    monkeypatch.setattr(prefill_attention, "prefill_tiles", lambda group, head_dim: tiles)
    _check_kernel([(0, 9), (45, 6), (7, 0), (30, 6), (100, 1)], hq, hkv, 32, 32, torch.bfloat16, device)


def test_fp32_kernel(device):
    _check_kernel([(0, 20), (33, 7)], 4, 2, 32, 16, torch.float32, device)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_reference_matches_dense_causal_sdpa_per_sequence(device, hq, hkv):
    chunks = [(0, 9), (16, 5), (37, 1), (70, 12)]
    q, k_cache, v_cache, cu, contexts, tables, seqs = _paged(chunks, hq, hkv, 32, 16, torch.float32, device)
    out = paged_prefill_attention_ref(q, k_cache, v_cache, cu, contexts, tables, 0.3)
    for i, ((context, n), (k, v)) in enumerate(zip(chunks, seqs)):
        # the whole sequence's causal attention, independently, of which the chunk is the tail
        k = k.to(device).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, len, D]
        v = v.to(device).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        q_full = torch.cat([torch.zeros(context, hq, 32, device=device), q[cu[i]:cu[i + 1]]]).transpose(0, 1)
        expected = F.scaled_dot_product_attention(q_full, k, v, is_causal=True, scale=0.3).transpose(0, 1)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], expected[context:], rtol=1e-5, atol=1e-5)


def test_grid_from_shapes_only_and_no_host_sync(device, monkeypatch):
    """The same launch (grid and compile-time arguments) for different contexts and chunk
    lengths of the same shapes, and no .item() / .tolist() in the wrapper."""
    launches = []
    monkeypatch.setattr(runtime, "launch", lambda kernel, grid, *args, **meta: launches.append((grid, meta)))
    chunks_a = [(0, 30), (300, 2), (17, 8)]
    chunks_b = [(1000, 1), (5, 38), (0, 1)]  # same T and P, other lengths and contexts
    inputs = [_paged(c, 8, 2, 64, 16, torch.bfloat16, device)[:6] for c in (chunks_a, chunks_b)]
    if not runtime.use_triton(device):
        pytest.skip("the Triton kernel does not run here")

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the wrapper")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    for q, k_cache, v_cache, cu, contexts, tables in inputs:
        paged_prefill_attention(q, k_cache, v_cache, cu, contexts, tables, 0.125)
    assert len(launches) == 2 and launches[0] == launches[1]
    block_m = prefill_tiles(4, 64)[0]
    assert launches[0][0] == prefill_grid(40, 3, 2, block_m) == (40 // block_m + 3, 2)


def test_grid_covers_every_tile():
    """Tile k of chunk i runs on program cu[i] // BLOCK_M + i + k: disjoint runs below the grid."""
    for block_m in (1, 4, 16, 128):
        for lens in ([1], [5, 0, 17, 64], [128, 127, 1, 300], [3] * 9):
            cu = [sum(lens[:i]) for i in range(len(lens) + 1)]
            grid = prefill_grid(cu[-1], len(lens), 1, block_m)[0]
            used = [cu[i] // block_m + i + k for i, n in enumerate(lens) for k in range(-(-n // block_m))]
            assert len(set(used)) == len(used) and max(used, default=0) < grid


def test_tile_rows():
    """BLOCK_M * G rows is 128 for head dims up to 128 (64 above), at least one position."""
    assert prefill_tiles(1, 128) == (128, 64) and prefill_tiles(4, 128) == (32, 64)
    assert prefill_tiles(8, 64) == (16, 64) and prefill_tiles(8, 256) == (8, 32)
    assert prefill_tiles(6, 128) == (16, 64) and prefill_tiles(256, 128) == (1, 64)


@pytest.mark.parametrize("fn", [paged_prefill_attention, paged_prefill_attention_ref])
def test_no_rows(device, fn):
    k_cache = torch.zeros(4, 16, 2, 32, dtype=torch.bfloat16, device=device)
    q = torch.zeros(0, 4, 32, dtype=torch.bfloat16, device=device)
    for p in (0, 2):  # no chunk; two empty chunks
        i32 = dict(dtype=torch.int32, device=device)
        out = fn(q, k_cache, k_cache.clone(), torch.zeros(p + 1, **i32), torch.zeros(p, **i32),
                 torch.zeros(p, 3, **i32), 1.0)
        assert out.shape == (0, 4, 32) and out.dtype == torch.bfloat16


def _bad(case, device):
    i32 = dict(dtype=torch.int32, device=device)
    q, k, v = bad_q_and_cache(case, 6, device)
    cu, contexts = torch.tensor([0, 2, 6], **i32), torch.zeros(2, **i32)
    tables = torch.zeros(2, 4, **i32)
    if case == "cu_seqlens":
        cu = cu[:2]
    elif case == "cu_seqlens dtype":
        cu = cu.long()
    elif case == "context_lens":
        contexts = contexts[None]
    elif case == "tables":
        tables = tables.long()
    elif case == "tables rows":
        tables = tables[:1]
    elif case == "empty table":
        tables = tables[:, :0]
    elif case == "device":
        contexts = torch.zeros(2, dtype=torch.int32, device="meta")
    return q, k, v, cu, contexts, tables


@pytest.mark.parametrize("fn", [paged_prefill_attention, paged_prefill_attention_ref])
@pytest.mark.parametrize("case,match", [
    ("q 2-D", r"\[T, Hq, D\]"), ("v shape", "k_cache and v_cache"), ("head dim", "head dim"),
    ("heads", "multiple of kv heads"), ("block size", "power of two"), ("dtype", "one dtype"),
    ("contiguous", "contiguous"), ("cu_seqlens", "cu_seqlens"), ("cu_seqlens dtype", "cu_seqlens"),
    ("context_lens", "context_lens"), ("tables", "block_tables"), ("tables rows", "block_tables"),
    ("empty table", "empty"), ("device", "one device"),
])
def test_bad_inputs_raise(device, fn, case, match):
    with pytest.raises(ValueError, match=match):
        fn(*_bad(case, device), 1.0)


def test_kernel_rejects_head_dim_it_cannot_tile(device):
    if not runtime.use_triton(device):
        pytest.skip("the Triton kernel does not run here")
    i32 = dict(dtype=torch.int32, device=device)
    q = torch.zeros(3, 2, 24, dtype=torch.bfloat16, device=device)
    k = torch.zeros(2, 16, 2, 24, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        paged_prefill_attention(q, k, k.clone(), torch.tensor([0, 3], **i32), torch.zeros(1, **i32),
                                torch.zeros(1, 1, **i32), 1.0)
