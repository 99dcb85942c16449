"""Paged prefill (varlen) attention: the packed query rows of P prompt chunks against each
chunk's own sequence in the block KV cache, causally.

    out[t, h] = softmax(scale * q[t, h] @ K_i[:c_i + j + 1, h // G].T) @ V_i[:c_i + j + 1, h // G]
        t = cu_seqlens[i] + j (row j of chunk i),  c_i = context_lens[i],  G = Hq / Hkv

Chunk i holds the rows cu_seqlens[i] .. cu_seqlens[i+1]-1 of q [T, Hq, D]; its row j sits at
position c_i + j of sequence i and sees that sequence's positions 0 .. c_i + j. `k_cache`,
`v_cache` are [num_blocks, block_size, Hkv, D] as for decode (attention.py): position p of
chunk i lives in block `block_tables[i, p // block_size]` at offset `p % block_size`, and
the chunk's own K/V are already written. Entries of a block table past the chunk's last
position are never read (they may be -1 or stale). The caller guarantees cu_seqlens[0] == 0,
cu_seqlens[P] == T, non-decreasing, and c_i + len_i <= max_blocks * block_size; the wrapper
cannot check it without a host sync. The kernel needs a power-of-two head dim D in 16..256
(the reference takes any).

Kernel: one program per (query tile, kv head). A query tile is BLOCK_M consecutive rows of
one chunk, taken together with the G query heads that share the kv head: ROWS = BLOCK_M *
G_PAD rows (token-major, row r = token r // G_PAD, head r % G_PAD; G padded to a power of
two, the whole to at least 16 rows for `tl.dot`), so each K/V tile is loaded once for the
whole group. The program streams that kv head's K/V in tiles of BLOCK_N positions, reading
them in place through the block table (no gather, no head expansion; BLOCK_N independent of
the cache block size), up to its last query's position only: tiles wholly at or below its
first query's position run without masks, the few tiles on the diagonal mask
`key position <= row position`. Both products are `tl.dot` on tensor cores with fp32
accumulation; softmax is online (running max and sum in fp32, exp2 with log2(e) folded into
the scale); P is rounded to the cache dtype for P @ V, as in FlashAttention.

Grid, from shapes only (never values, no host sync; CUDA-graph capturable, one compiled
variant per model): (T // BLOCK_M + P, Hkv). Query tile k of chunk i gets the program
`cu_seqlens[i] // BLOCK_M + i + k`; these runs are disjoint and increasing in i, and all
fit below T // BLOCK_M + P. A program finds its chunk by a binary search of cu_seqlens in
the kernel (ceil(log2 P) scalar loads, the step count passed from P's shape); programs that
land past their chunk's last tile (at most one per chunk, the price of `+ P`) return at once.
There is no split over the keys: a prefill chunk has T / BLOCK_M tiles per kv head, enough
programs for the GPU except for very short chunks over long contexts (decode's case, which
attention.py's split-KV kernel serves).

On CPU the `_ref` function runs unless `TRITON_INTERPRET=1` (tests), as in attention.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import runtime
from .attention import block_n_for, check_q_and_cache
from .runtime import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


NUM_STAGES = 2


def prefill_tiles(group: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): BLOCK_M query positions per tile, so that a tile's BLOCK_M * G
    rows number 128 (64 for head dims above 128, to bound registers), at least one position;
    BLOCK_N key positions per K/V tile as for decode. Untuned: chosen without a GPU."""
    rows = 128 if head_dim <= 128 else 64
    return max(1, rows // _pow2(group)), block_n_for(head_dim)


def prefill_warps(rows: int, head_dim: int) -> int:
    """Warps per program: 8 for 128-row tiles of head dim >= 128 (fp32 accumulator of 64
    registers a thread), else 4."""
    return 8 if rows >= 128 and head_dim >= 128 else 4


def prefill_grid(num_tokens: int, num_chunks: int, kv_heads: int, block_m: int) -> tuple[int, int]:
    """Launch grid from shapes only: every chunk's query tiles (see the module docstring)."""
    return num_tokens // block_m + num_chunks, kv_heads


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------------------
# Checks and reference
# ----------------------------------------------------------------------------------------


def _check(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables) -> None:
    what = "paged_prefill_attention"
    check_q_and_cache(what, "T", q, k_cache, v_cache)
    num_blocks = k_cache.shape[0]
    if context_lens.dim() != 1 or context_lens.dtype != torch.int32:
        raise ValueError(f"{what}: context_lens must be int32 [P], got {context_lens.dtype} "
                         f"{list(context_lens.shape)}")
    p = context_lens.shape[0]
    if cu_seqlens.shape != (p + 1,) or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{what}: cu_seqlens must be int32 [{p + 1}] (P + 1 for P = {p} chunks), "
                         f"got {cu_seqlens.dtype} {list(cu_seqlens.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != p or block_tables.dtype != torch.int32:
        raise ValueError(f"{what}: block_tables must be int32 [{p}, max_blocks], "
                         f"got {block_tables.dtype} {list(block_tables.shape)}")
    if p and (num_blocks == 0 or block_tables.shape[1] == 0):
        raise ValueError(f"{what}: {p} chunks but an empty cache or block table")
    if p == 0 and q.shape[0]:
        raise ValueError(f"{what}: {q.shape[0]} query rows but no chunk")
    devices = {t.device for t in (q, k_cache, v_cache, cu_seqlens, context_lens, block_tables)}
    if len(devices) != 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(map(str, devices))}")


def _prefill_chunk_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                       context_len: int, scale: float) -> torch.Tensor:
    """One chunk, q [n, Hq, D] at positions context_len .. context_len+n-1: gather its blocks,
    expand the kv heads to every query head, SDPA (flash or memory-efficient on GPU)."""
    n, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    total = context_len + n
    table = table[: -(-total // block_size)].long()  # entries past the end may be garbage
    k = k_cache[table].reshape(-1, hkv, d)[:total]
    v = v_cache[table].reshape(-1, hkv, d)[:total]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, len, D]
    if context_len == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        # query i sits at position context_len + i and sees every key up to it
        rows = torch.arange(n, device=q.device)[:, None] + context_len
        mask = torch.arange(total, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cu_seqlens: torch.Tensor, context_lens: torch.Tensor,
                                block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Pure-PyTorch oracle and CPU path: per chunk (host ints: one sync), gather its blocks,
    `repeat_interleave` to every query head, SDPA with the causal mask offset by the
    context; [T, Hq, D] in q's dtype."""
    _check(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables)
    out = torch.empty_like(q)
    starts, contexts = cu_seqlens.tolist(), context_lens.tolist()
    for i, context in enumerate(contexts):
        rows = slice(starts[i], starts[i + 1])
        if rows.stop > rows.start:
            out[rows] = _prefill_chunk_ref(q[rows], k_cache, v_cache, block_tables[i], context, scale)
    return out


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------

if triton is not None:
    from .attention import online_softmax_step

    @triton.jit
    def _attend_tile(q, k_ptr, v_ptr, table, n0, kvh, row_pos, hi_pos, m_i, l_i, acc, scale_log2, stride_pos,
                     BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, DOT_FP32: tl.constexpr,
                     CAUSAL: tl.constexpr):
        """One K/V tile of BLOCK_N positions from n0 into the online softmax (m_i, l_i, acc).
        CAUSAL: a tile on the diagonal, masked per row (`key position <= row_pos`) and past
        hi_pos (table entries past the end are never read); else every row sees every key."""
        pos = n0 + tl.arange(0, BLOCK_N)
        dd = tl.arange(0, D)
        p_mask = pos < hi_pos
        if CAUSAL:
            block = tl.load(table + pos // BLOCK_SIZE, mask=p_mask, other=0)
        else:
            block = tl.load(table + pos // BLOCK_SIZE)
        kv = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * stride_pos + kvh * D
        if CAUSAL:
            k = tl.load(k_ptr + kv[:, None] + dd[None, :], mask=p_mask[:, None], other=0.0)
            v = tl.load(v_ptr + kv[:, None] + dd[None, :], mask=p_mask[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + kv[:, None] + dd[None, :])
            v = tl.load(v_ptr + kv[:, None] + dd[None, :])
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if CAUSAL:
            s = tl.where(pos[None, :] <= row_pos[:, None], s * scale_log2, float("-inf"))
        else:
            s = s * scale_log2
        return online_softmax_step(s, v, m_i, l_i, acc, DOT_FP32)

    @triton.jit(do_not_specialize=["num_chunks", "search_steps", "stride_bt"])  # change per step
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr, out_ptr,
        scale_log2, num_chunks, search_steps, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
        stride_pos,
        G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # grid = (T // BLOCK_M + P, Hkv). stride_pos = Hkv * D: elements between cached positions.
        tile = tl.program_id(0)
        kvh = tl.program_id(1)

        # The chunk: the last i with first_tile(i) = cu_seqlens[i] // BLOCK_M + i <= tile
        # (first_tile(0) = 0). Invariant: the chunk is in [lo, hi); search_steps halvings end it.
        lo = tile * 0
        hi = lo + num_chunks
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            right = tl.load(cu_seqlens_ptr + mid) // BLOCK_M + mid <= tile
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        chunk = lo
        start = tl.load(cu_seqlens_ptr + chunk)
        length = tl.load(cu_seqlens_ptr + chunk + 1) - start
        m0 = (tile - start // BLOCK_M - chunk) * BLOCK_M  # this tile's first row in the chunk
        if m0 >= length:  # a spare program past the chunk's tiles (or an empty chunk)
            return
        context = tl.load(context_lens_ptr + chunk)
        n_rows = tl.minimum(length - m0, BLOCK_M)  # real query positions of the tile
        first_pos = context + m0                   # position of the tile's first query
        hi_pos = first_pos + n_rows                # keys 0 .. hi_pos-1 are read, no further
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # tiles below it are seen by every row

        r = tl.arange(0, ROWS)
        m = r // G_PAD
        g = r % G_PAD
        row_mask = (m < n_rows) & (g < G)  # padding rows: zero queries, computed and dropped
        # padding rows see what the tile's last query sees: no key past hi_pos - 1
        row_pos = tl.minimum(first_pos + m, hi_pos - 1)
        token = start + m0 + m
        heads = kvh * G + g
        dd = tl.arange(0, D)
        q = tl.load(q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + dd[None, :],
                    mask=row_mask[:, None], other=0.0)
        if DOT_FP32:  # interpreter (its bf16 arithmetic is wrong) or an fp32 cache
            q = q.to(tl.float32)
        table = block_tables_ptr + chunk.to(tl.int64) * stride_bt

        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        # Every row sees key 0, in the first tile either loop runs: m_i is finite after it.
        for n0 in range(0, full_end, BLOCK_N):  # below every row's position: no masks at all
            m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, table, n0, kvh, row_pos, hi_pos, m_i, l_i, acc,
                                         scale_log2, stride_pos, BLOCK_N, BLOCK_SIZE, D, DOT_FP32, False)
        for n0 in range(full_end, hi_pos, BLOCK_N):  # the diagonal: causal mask per row
            m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, table, n0, kvh, row_pos, hi_pos, m_i, l_i, acc,
                                         scale_log2, stride_pos, BLOCK_N, BLOCK_SIZE, D, DOT_FP32, True)

        out = acc / l_i[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + dd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


# ----------------------------------------------------------------------------------------
# Launch wrapper
# ----------------------------------------------------------------------------------------


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Causal attention of the packed rows of P prompt chunks over their sequences in the
    paged KV cache; returns [T, Hq, D] in q's dtype (see the module docstring for the layout
    and contract). No host sync; the grid depends on shapes only."""
    _check(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables)
    if not runtime.use_triton(q.device):
        return paged_prefill_attention_ref(q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, scale)
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"paged_prefill_attention: the kernel needs a power-of-two head dim in 16..256, "
                         f"got {d}")
    out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    p = context_lens.shape[0]
    if t == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    cu_seqlens, context_lens = cu_seqlens.contiguous(), context_lens.contiguous()
    block_tables = block_tables.contiguous()
    group = hq // hkv
    block_m, block_n = prefill_tiles(group, d)
    rows = max(16, block_m * _pow2(group))
    runtime.launch(
        _paged_prefill_kernel, prefill_grid(t, p, hkv, block_m),
        q, k_cache, v_cache, cu_seqlens, context_lens, block_tables, out,
        scale * math.log2(math.e), p, (p - 1).bit_length(), q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), block_tables.stride(0), hkv * d,
        G=group, G_PAD=_pow2(group), BLOCK_M=block_m, ROWS=rows, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        D=d, DOT_FP32=INTERPRET or q.dtype == torch.float32,
        num_warps=prefill_warps(rows, d), num_stages=NUM_STAGES,
    )
    return out
