"""Per-step metadata: built once by the engine's runner and passed down through every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.lora import BatchMeta


@dataclass(slots=True)
class StepMeta:
    """One engine step: T tokens, prefill chunks first, then one decode token per sequence."""

    positions: torch.Tensor      # [T] int64 position of each token in its sequence
    slot_mapping: torch.Tensor   # [T] int64 flat KV cache row (block * block_size + offset) to write
    cos: torch.Tensor            # [T, head_dim] rope tables gathered at `positions` (activation dtype)
    sin: torch.Tensor            # [T, head_dim]
    # the step's P prompt chunks (all None when it has none):
    prefill_cu_seqlens: torch.Tensor | None    # [P + 1] int32: chunk i is rows cu[i] .. cu[i+1]-1
    prefill_context_lens: torch.Tensor | None  # [P] int32 positions of chunk i's sequence cached before it
    prefill_block_tables: torch.Tensor | None  # [P, widest] int32 (zero-padded) blocks of chunk i's sequence
    decode_start: int            # rows 0 .. decode_start-1 are prompt chunks, decode_start .. T-1 decodes
    decode_block_tables: torch.Tensor  # [D, max_blocks] int32
    decode_seq_lens: torch.Tensor      # [D] int32 positions to attend, the new token included
    lora: BatchMeta | None       # per-token adapter slots; None when no token uses an adapter
    logits_rows: torch.Tensor    # [S] int64 rows whose next-token logits are wanted

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_decodes(self) -> int:
        return self.num_tokens - self.decode_start
