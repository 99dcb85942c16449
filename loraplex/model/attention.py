"""Attention of one layer over the paged KV cache: prefill chunks with PyTorch's SDPA (flash
or memory-efficient kernels on GPU), decode tokens with the paged decode kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.attention import paged_decode_attention
from ..kernels.workspace import Workspace
from .step import StepMeta


def _prefill_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   context_len: int, scale: float) -> torch.Tensor:
    """q [n, Hq, D] at positions context_len .. context_len+n-1; keys and values of every
    position up to the chunk's end are already in the cache."""
    n, hq, d = q.shape
    total = context_len + n
    hkv = k_cache.shape[2]
    k = k_cache[block_table].reshape(-1, hkv, d)[:total]
    v = v_cache[block_table].reshape(-1, hkv, d)[:total]
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


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: StepMeta,
                    scale: float, workspace: Workspace | None = None) -> torch.Tensor:
    """Causal attention of every token of the step over its own sequence. q [T, Hq, D]."""
    out = torch.empty_like(q)
    for chunk in step.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        out[rows] = _prefill_chunk(q[rows], k_cache, v_cache, chunk.block_table, chunk.context_len, scale)
    if step.num_decodes:
        out[step.decode_start:] = paged_decode_attention(
            q[step.decode_start:], k_cache, v_cache, step.decode_block_tables, step.decode_seq_lens, scale,
            workspace)
    return out
