"""Attention of one layer over the paged KV cache: the prompt chunks of a step with the paged
prefill kernel, its decode tokens with the paged decode kernel (both read the cache in place)."""

from __future__ import annotations

import torch

from ..kernels.attention import paged_decode_attention
from ..kernels.prefill_attention import paged_prefill_attention
from ..kernels.workspace import Workspace
from .step import StepMeta


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: StepMeta,
                    scale: float, workspace: Workspace | None = None) -> torch.Tensor:
    """Causal attention of every token of the step over its own sequence. q [T, Hq, D]."""
    if not step.num_decodes:
        return paged_prefill_attention(q, k_cache, v_cache, step.prefill_cu_seqlens, step.prefill_context_lens,
                                       step.prefill_block_tables, scale)
    decodes = paged_decode_attention(q[step.decode_start:], k_cache, v_cache, step.decode_block_tables,
                                     step.decode_seq_lens, scale, workspace)
    if not step.decode_start:
        return decodes
    prefills = paged_prefill_attention(q[:step.decode_start], k_cache, v_cache, step.prefill_cu_seqlens,
                                       step.prefill_context_lens, step.prefill_block_tables, scale)
    return torch.cat([prefills, decodes])
