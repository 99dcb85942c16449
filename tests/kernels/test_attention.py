"""Paged decode attention: the kernel against its reference, the reference against SDPA.

Without CUDA the Triton kernels run in Triton's interpreter (conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import attention, runtime
from loraplex.kernels.attention import decode_splits, paged_decode_attention, paged_decode_attention_ref

# output rounding (the interpreter truncates to bf16: one ulp) plus P rounded for P @ V on GPU
TOL = {torch.bfloat16: (2**-7, 1e-2), torch.float16: (2**-9, 2e-3), torch.float32: (1e-5, 1e-5)}

# ragged lengths: 1, ends of cache blocks (64, 3 * block_size), mid-block, several K/V tiles
LENS = {1: [77], 3: [1, 64, 45], 5: [130, 1, "3bs", 17, 66]}


def paged_cache(lens, hkv, d, block_size, dtype, g):
    """A paged cache holding each sequence's K/V (lens[i] positions) in shuffled blocks, block
    tables, and each sequence's contiguous K/V [len, Hkv, D] (rounded to `dtype`, in fp32).
    Every slot no sequence wrote is NaN, as is a spare block that garbage table entries
    point to: reading any of them would poison the output."""
    blocks = [-(-n // block_size) for n in lens]
    max_blocks = max(blocks) + 2
    num_blocks = sum(blocks) + 3
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    poison = num_blocks - 1
    order = torch.randperm(num_blocks - 1, generator=g).tolist()  # non-contiguous, shuffled
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    seqs = []
    for b, n in enumerate(lens):
        k = torch.randn(n, hkv, d, generator=g)
        v = torch.randn(n, hkv, d, generator=g)
        mine, order = order[:blocks[b]], order[blocks[b]:]
        tables[b, :blocks[b]] = torch.tensor(mine, dtype=torch.int32)
        tables[b, blocks[b]::2] = poison  # garbage past the end: -1 and a NaN block in turn
        for j, blk in enumerate(mine):
            rows = slice(j * block_size, min(n, (j + 1) * block_size))
            k_cache[blk, : rows.stop - rows.start] = k[rows]
            v_cache[blk, : rows.stop - rows.start] = v[rows]
        seqs.append((k.to(dtype).float(), v.to(dtype).float()))
    return k_cache, v_cache, tables, seqs


def _paged(lens, hq, hkv, d, block_size, dtype, device, seed=0):
    """q [B, Hq, D], the paged cache (`paged_cache`), block tables and seq_lens, plus each
    sequence's contiguous K/V."""
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, seqs = paged_cache(lens, hkv, d, block_size, dtype, g)
    q = torch.randn(len(lens), hq, d, generator=g)
    to = dict(device=device, dtype=dtype)
    return (q.to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(device),
            torch.tensor(lens, dtype=torch.int32, device=device), seqs)


def _lens(batch, block_size):
    return [3 * block_size if n == "3bs" else n for n in LENS[batch]]


def _check_kernel(lens, hq, hkv, d, block_size, dtype, device):
    q, k_cache, v_cache, tables, seq_lens, _ = _paged(lens, hq, hkv, d, block_size, dtype, device)
    scale = d**-0.5
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()  # no slot past a sequence's end, no garbage block, was read
    # the reference in fp32 from the same (rounded) inputs: the exact answer
    expected = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), tables, seq_lens,
                                          scale)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("d,block_size,dtype", [(32, 4, torch.bfloat16), (64, 16, torch.bfloat16),
                                                (64, 4, torch.float16), (32, 16, torch.float16)])
def test_kernel_matches_reference(device, batch, hq, hkv, d, block_size, dtype):
    _check_kernel(_lens(batch, block_size), hq, hkv, d, block_size, dtype, device)


@pytest.mark.parametrize("split", [2, 4, 8])  # 8: the short sequences leave splits empty
@pytest.mark.parametrize("hq,hkv,dtype", [(8, 2, torch.bfloat16), (4, 4, torch.float16)])
def test_split_kv_matches_reference(device, monkeypatch, split, hq, hkv, dtype):
    monkeypatch.setattr(attention, "decode_splits", lambda *args: split)
    _check_kernel(_lens(5, 16), hq, hkv, 64, 16, dtype, device)


def test_fp32_kernel(device):
    _check_kernel([1, 40, 70], 4, 2, 32, 8, torch.float32, device)


def test_decode_splits_fill_the_gpu_only_when_batch_is_small(monkeypatch):
    monkeypatch.setattr(runtime, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert decode_splits(1, 8, 4096, cuda) == 16      # batch-1 long context: split
    assert decode_splits(1, 8, 512, cuda) == 2        # at least 256 positions per split
    assert decode_splits(64, 8, 4096, cuda) == 1      # enough programs already
    assert decode_splits(1, 8, 100, cuda) == 1


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_reference_matches_sdpa_per_sequence(device, hq, hkv):
    lens = [1, 29, 64]
    q, k_cache, v_cache, tables, seq_lens, seqs = _paged(lens, hq, hkv, 32, 16, torch.float32, device)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.3)
    for b, (k, v) in enumerate(seqs):
        k = k.to(device).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, len, D]
        v = v.to(device).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        expected = F.scaled_dot_product_attention(q[b][:, None], k, v, scale=0.3)[:, 0]
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [paged_decode_attention, paged_decode_attention_ref])
def test_empty_batch(device, fn):
    k_cache = torch.zeros(4, 16, 2, 32, dtype=torch.bfloat16, device=device)
    q = torch.zeros(0, 4, 32, dtype=torch.bfloat16, device=device)
    tables = torch.zeros(0, 3, dtype=torch.int32, device=device)
    out = fn(q, k_cache, k_cache.clone(), tables, torch.zeros(0, dtype=torch.int32, device=device), 1.0)
    assert out.shape == (0, 4, 32) and out.dtype == torch.bfloat16


def bad_q_and_cache(case, rows, device):
    """q [rows, 4, 32] and a paged cache (2 kv heads, blocks of 16), broken as `case` says for
    the checks both attention kernels share (`check_q_and_cache`); fine for any other case."""
    q = torch.zeros(rows, 4, 32, dtype=torch.bfloat16, device=device)
    k = torch.zeros(8, 16, 2, 32, dtype=torch.bfloat16, device=device)
    v = k.clone()
    if case == "q 2-D":
        q = q[0]
    elif case == "v shape":
        v = v[:, :, :1]
    elif case == "head dim":
        q = torch.zeros(rows, 4, 64, dtype=torch.bfloat16, device=device)
    elif case == "heads":
        q = torch.zeros(rows, 3, 32, dtype=torch.bfloat16, device=device)
    elif case == "block size":
        k = v = torch.zeros(8, 12, 2, 32, dtype=torch.bfloat16, device=device)
    elif case == "dtype":
        v = v.half()
    elif case == "int dtype":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "contiguous":
        k = torch.zeros(8, 2, 16, 32, dtype=torch.bfloat16, device=device).transpose(1, 2)
    return q, k, v


def _bad(case, device):
    q, k, v = bad_q_and_cache(case, 2, device)
    tables = torch.zeros(2, 4, dtype=torch.int32, device=device)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    if case == "tables":
        tables = tables.long()
    elif case == "tables rows":
        tables = tables[:1]
    elif case == "seq_lens":
        lens = torch.ones(3, dtype=torch.int32, device=device)
    elif case == "empty table":
        tables = tables[:, :0]
    elif case == "device":
        lens = torch.ones(2, dtype=torch.int32, device="meta")
    return q, k, v, tables, lens


@pytest.mark.parametrize("fn", [paged_decode_attention, paged_decode_attention_ref])
@pytest.mark.parametrize("case,match", [
    ("q 2-D", r"\[B, Hq, D\]"), ("v shape", "k_cache and v_cache"), ("head dim", "head dim"),
    ("heads", "multiple of kv heads"), ("block size", "power of two"), ("dtype", "one dtype"),
    ("int dtype", "one dtype"), ("contiguous", "contiguous"), ("tables", "block_tables"),
    ("tables rows", "block_tables"), ("seq_lens", "seq_lens"), ("empty table", "empty"),
    ("device", "one device"),
])
def test_bad_inputs_raise(device, fn, case, match):
    with pytest.raises(ValueError, match=match):
        fn(*_bad(case, device), 1.0)


def test_kernel_rejects_head_dim_it_cannot_tile(device):
    if not runtime.use_triton(device):
        pytest.skip("the Triton kernel does not run here")
    q = torch.zeros(1, 2, 24, dtype=torch.bfloat16, device=device)
    k = torch.zeros(2, 16, 2, 24, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        paged_decode_attention(q, k, k.clone(), torch.zeros(1, 1, dtype=torch.int32, device=device),
                               torch.ones(1, dtype=torch.int32, device=device), 1.0)
