"""Split-K without a memset: shared by the NF4 and LoRA kernels.

Several programs reduce over disjoint shares of K into one output tile. Each adds its fp32
partial atomically into a shared fp32 buffer and takes a ticket; the program that draws
the last ticket reads the sum, writes the output tile, and puts zeros back into its part of
the workspace and its ticket. The workspace is therefore clean between launches: no memset
kernel before, no reduction kernel after, and the launch grid never depends on data (CUDA
graphs can capture it). One stream must issue these kernels at a time (the engine thread).
The buffers come from a `Workspace` (workspace.py): the NF4 and LoRA kernels share them.
"""

from __future__ import annotations

import torch

from .workspace import Need

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


VALUES = "splitk.values"    # fp32 partial sums, one per output element of the largest split launch
TICKETS = "splitk.tickets"  # int32 arrival counters, one per output tile


def splitk_needs(split: int, values: int, tiles: int) -> tuple[Need, ...]:
    """Workspace of a launch over `tiles` output tiles holding `values` elements in all, split
    `split` ways along K (nothing without a split)."""
    if split <= 1:
        return ()
    return Need(VALUES, values, torch.float32), Need(TICKETS, tiles, torch.int32)


def split_for(tiles: int, k_chunks: int, sms: int) -> int:
    """K splits for `tiles` output tiles: enough programs for ~2 waves over the SMs, never
    more splits than K chunks (nor 16)."""
    split = 1
    while tiles * split < 2 * sms and split * 2 <= min(k_chunks, 16):
        split *= 2
    return split


if triton is not None:

    @triton.jit
    def k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        # Contiguous run of BLOCK_K chunks of K owned by split `pid_k` (may be empty).
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = pid_k * per_split
        return k_lo, tl.minimum(k_lo + per_split, K)

    @triton.jit
    def write_tile(acc, offs_m, offs_n, M, N, y_ptr, bias_ptr, ws_ptr, ticket_ptr, tile_id,
                   HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
        # acc: fp32 [BLOCK_M, BLOCK_N] partial (or, SPLIT_K == 1, whole) result for rows offs_m
        # and columns offs_n of the row-major [M, N] output y; tile_id is unique per tile.
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        idx = offs_m[:, None] * N + offs_n[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(ws_ptr + idx, acc, mask=mask, sem="relaxed")
            tl.debug_barrier()  # all partial adds of this program precede its ticket (release)
            ticket = tl.atomic_add(ticket_ptr + tile_id, 1, sem="acq_rel")
            if ticket == SPLIT_K - 1:  # last one in: reduce, then leave the workspace clean
                acc = tl.atomic_add(ws_ptr + idx, tl.zeros_like(acc), mask=mask, sem="relaxed")
                acc = tl.where(mask, acc, 0.0)  # masked lanes of an atomic return garbage
                tl.store(ws_ptr + idx, tl.zeros_like(acc), mask=mask)
                tl.store(ticket_ptr + tile_id, 0)
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + idx, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + idx, acc.to(y_ptr.dtype.element_ty), mask=mask)
