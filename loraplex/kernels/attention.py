"""Paged decode attention: one new query token per sequence against its block KV cache.

    out[b, h] = softmax(scale * q[b, h] @ K_b[:, h // G].T) @ V_b[:, h // G]     G = Hq / Hkv

K_b, V_b are the first seq_lens[b] cached positions of sequence b. The cache holds them in
fixed-size blocks: `k_cache`, `v_cache` are [num_blocks, block_size, Hkv, D], and position
p of sequence b lives in block `block_tables[b, p // block_size]` at offset
`p % block_size`. Entries of a block table past the sequence's last block are never read
(they may be -1 or stale). The caller guarantees 1 <= seq_lens[b] <= max_blocks * block_size
(the current token's K/V already written); the wrapper cannot check it without a host sync.
The kernel needs a power-of-two head dim D in 16..256 (the reference takes any).

Kernel: one program per (sequence, kv head, KV split). It handles the G query heads that
share the kv head together, padded to 16 rows so that both products run on tensor cores
(`tl.dot`), and streams that kv head's K/V tiles of BLOCK_N positions up to the sequence's
real length only, gathering each position's block through the block table (so BLOCK_N is
independent of the cache's block size), masking the last partial tile. Softmax is online
(running max and sum in fp32, exp2 with log2(e) folded into the scale); P is rounded to the
cache dtype for the P @ V product, as in FlashAttention, and accumulated in fp32.

Split-KV: with few sequences (batch-1 long-context decode) B * Hkv programs cannot fill the
GPU, so the positions of each sequence are split over SPLIT programs (`decode_splits`, from
shapes only). Each writes its unnormalized fp32 partial (acc, running max, running sum)
and a small second kernel combines them. With SPLIT == 1 the first kernel writes the output
directly.

The launch grid depends on shapes only (never on seq_lens or block tables): the loop bound
is each sequence's length, loaded in the kernel, so decode steps can be captured in CUDA
graphs.

On CPU the `_ref` function runs unless `TRITON_INTERPRET=1` (tests), as in `lora`.
"""

from __future__ import annotations

import math

import torch

from . import runtime
from .runtime import INTERPRET
from .splitk import split_for
from .workspace import Need, Workspace, standalone

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

NUM_WARPS = 4
NUM_STAGES = 2
SPLIT_CHUNK = 256  # positions per KV split at least (below that the combine costs more than it buys)


def block_n_for(head_dim: int) -> int:
    """Positions per K/V tile: 64 (32 for head dims above 128, to bound registers)."""
    return 64 if head_dim <= 128 else 32


def group_rows(group: int) -> int:
    """Rows of the padded query-head group (tl.dot needs at least 16)."""
    return max(16, 1 << (group - 1).bit_length())


def decode_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """KV splits per (sequence, kv head): enough programs for ~2 waves over the SMs, each
    split covering at least SPLIT_CHUNK positions of the longest possible sequence."""
    return split_for(batch * kv_heads, -(-max_len // SPLIT_CHUNK), runtime.num_sms(device))


PARTIALS, MAXES, SUMS = "attention.partials", "attention.maxes", "attention.sums"


def split_needs(batch: int, q_heads: int, head_dim: int, split: int) -> tuple[Need, ...]:
    """Workspace of a split decode launch: each split's unnormalized fp32 output, running max
    and running sum per (sequence, query head); nothing without a split."""
    if split <= 1:
        return ()
    rows = batch * q_heads * split
    return (Need(PARTIALS, rows * head_dim, torch.float32), Need(MAXES, rows, torch.float32),
            Need(SUMS, rows, torch.float32))


# ----------------------------------------------------------------------------------------
# Checks and reference
# ----------------------------------------------------------------------------------------


def check_q_and_cache(what: str, rows: str, q: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor) -> None:
    """ValueError unless q [rows, Hq, D] and the paged caches [num_blocks, block_size, Hkv, D]
    fit together (shared by the decode and prefill kernels)."""
    if q.dim() != 3:
        raise ValueError(f"{what}: q must be [{rows}, Hq, D], got shape {list(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{what}: k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], "
                         f"got {list(k_cache.shape)} and {list(v_cache.shape)}")
    _, hq, d = q.shape
    _, block_size, hkv, d_kv = k_cache.shape
    if d_kv != d:
        raise ValueError(f"{what}: head dim of q is {d}, of the cache {d_kv}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{what}: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"{what}: block size must be a power of two, got {block_size}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"{what}: q, k_cache, v_cache must share one dtype of bf16/fp16/fp32, "
                         f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{what}: k_cache and v_cache must be contiguous")


def _check(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    what = "paged_decode_attention"
    check_q_and_cache(what, "B", q, k_cache, v_cache)
    b, num_blocks = q.shape[0], k_cache.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype != torch.int32:
        raise ValueError(f"{what}: block_tables must be int32 [{b}, max_blocks], "
                         f"got {block_tables.dtype} {list(block_tables.shape)}")
    if seq_lens.shape != (b,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"{what}: seq_lens must be int32 [{b}], got {seq_lens.dtype} {list(seq_lens.shape)}")
    if b and (num_blocks == 0 or block_tables.shape[1] == 0):
        raise ValueError(f"{what}: {b} sequences but an empty cache or block table")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(map(str, devices))}")


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Pure-PyTorch oracle and fallback, loop-free (no host sync): gather every sequence's
    blocks, mask positions >= seq_len, fp32 softmax; [B, Hq, D] in q's dtype."""
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    b, hq, d = q.shape
    num_blocks, block_size, hkv, _ = k_cache.shape
    if b == 0:
        return q.new_empty(0, hq, d)
    # entries past a sequence's end are arbitrary: clamp them to a real block, mask them below
    blocks = block_tables.long().clamp(0, num_blocks - 1)
    length = blocks.shape[1] * block_size
    k = k_cache[blocks].reshape(b, length, hkv, d).float().repeat_interleave(hq // hkv, dim=2)
    v = v_cache[blocks].reshape(b, length, hkv, d).float().repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bhd,bphd->bhp", q.float(), k) * scale
    past_end = torch.arange(length, device=q.device)[None, :] >= seq_lens[:, None]
    scores = scores.masked_fill(past_end[:, None, :], float("-inf"))
    v = v.masked_fill(past_end[:, :, None, None], 0.0)  # unwritten slots may hold NaN: 0 * NaN
    return torch.einsum("bhp,bphd->bhd", scores.softmax(dim=-1), v).to(q.dtype)


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def online_softmax_step(s, v, m_i, l_i, acc, DOT_FP32: tl.constexpr):
        """Fold one tile of base-2 logits s [M, N] (masked to -inf) and its values v [N, D] into
        the running maximum m_i, sum l_i and output acc [M, D]; shared by the decode and
        prefill kernels. Returns the new (m_i, l_i, acc)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=["stride_bt"])  # the table's width changes from step to step
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, m_ptr, l_ptr,
        scale_log2, stride_qb, stride_qh, stride_bt, stride_pos, Hq,
        G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        D: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # grid = (B, Hkv, SPLIT). stride_pos = Hkv * D: elements between cached positions.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b)
        # this split's run of whole BLOCK_N tiles of positions (may be empty)
        per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), SPLIT) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, seq_len)

        g = tl.arange(0, BLOCK_G)
        dd = tl.arange(0, D)
        heads = kvh * G + g
        g_mask = g < G  # padding rows: zero queries, computed and dropped
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dd[None, :],
                    mask=g_mask[:, None], other=0.0)
        if DOT_FP32:  # interpreter (its bf16 arithmetic is wrong) or an fp32 cache
            q = q.to(tl.float32)
        table = block_tables_ptr + b * stride_bt

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            p_mask = pos < hi
            # the block of each position; table entries past the end are masked, never read
            block = tl.load(table + pos // BLOCK_SIZE, mask=p_mask, other=0)
            row = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * stride_pos + kvh * D
            k = tl.load(k_ptr + row[:, None] + dd[None, :], mask=p_mask[:, None], other=0.0)
            v = tl.load(v_ptr + row[:, None] + dd[None, :], mask=p_mask[:, None], other=0.0)
            if DOT_FP32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(p_mask[None, :], s * scale_log2, float("-inf"))
            # every tile holds at least one real position, so the new maximum is finite
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_FP32)

        rows = b * Hq + heads
        if SPLIT == 1:
            out = acc / l_i[:, None]
            tl.store(out_ptr + rows[:, None] * D + dd[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=g_mask[:, None])
        else:  # unnormalized partials; an empty split leaves max -inf, sum 0, acc 0
            part = rows * SPLIT + split
            tl.store(out_ptr + part[:, None] * D + dd[None, :], acc, mask=g_mask[:, None])
            tl.store(m_ptr + part, m_i, mask=g_mask)
            tl.store(l_ptr + part, l_i, mask=g_mask)

    @triton.jit
    def _split_combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, D: tl.constexpr, SPLIT: tl.constexpr):
        # grid = (B * Hq,): out[row] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
        row = tl.program_id(0)
        s = tl.arange(0, SPLIT)
        dd = tl.arange(0, D)
        m = tl.load(m_ptr + row * SPLIT + s)
        l = tl.load(l_ptr + row * SPLIT + s)
        acc = tl.load(acc_ptr + (row * SPLIT + s)[:, None] * D + dd[None, :])
        w = tl.exp2(m - tl.max(m, 0))  # split 0 is never empty: the max is finite; empty splits weigh 0
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(out_ptr + row * D + dd, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------
# Launch wrapper
# ----------------------------------------------------------------------------------------


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           workspace: Workspace | None = None) -> torch.Tensor:
    """Decode attention of one query token per sequence over the paged KV cache; returns
    [B, Hq, D] in q's dtype (see the module docstring for the layout and contract).
    `workspace` holds the split partials (an engine passes its frozen one; default: a
    growable one)."""
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    if not runtime.use_triton(q.device):
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"paged_decode_attention: the kernel needs a power-of-two head dim in 16..256, "
                         f"got {d}")
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables = block_tables.contiguous()
    group = hq // hkv
    split = decode_splits(b, hkv, block_tables.shape[1] * block_size, q.device)
    acc, m, l = (workspace or standalone(q.device)).take(split_needs(b, hq, d, split)) or (out, out, out)
    runtime.launch(
        _paged_decode_kernel, (b, hkv, split),
        q, k_cache, v_cache, block_tables, seq_lens, acc, m, l,
        scale * math.log2(math.e), q.stride(0), q.stride(1), block_tables.stride(0), hkv * d, hq,
        G=group, BLOCK_G=group_rows(group), BLOCK_N=block_n_for(d), BLOCK_SIZE=block_size, D=d,
        SPLIT=split, DOT_FP32=INTERPRET or q.dtype == torch.float32,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if split > 1:
        runtime.launch(_split_combine_kernel, (b * hq,), acc, m, l, out, D=d, SPLIT=split, num_warps=NUM_WARPS)
    return out
