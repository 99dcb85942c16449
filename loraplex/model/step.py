"""Per-step metadata: built once by the engine's runner and passed down through every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.lora import BatchMeta


@dataclass(slots=True)
class PrefillChunk:
    """A run of one sequence's prompt tokens in this step (host-side ints)."""

    start: int                # first row of the chunk in the flat batch
    length: int               # tokens in the chunk
    context_len: int          # positions of this sequence already in the KV cache before the chunk
    block_table: torch.Tensor  # [blocks covering context_len + length] int64 KV block ids


@dataclass(slots=True)
class StepMeta:
    """One engine step: T tokens, prefill chunks first, then one decode token per sequence."""

    positions: torch.Tensor      # [T] int64 position of each token in its sequence
    slot_mapping: torch.Tensor   # [T] int64 flat KV cache row (block * block_size + offset) to write
    cos: torch.Tensor            # [T, head_dim] rope tables gathered at `positions` (activation dtype)
    sin: torch.Tensor            # [T, head_dim]
    prefills: list[PrefillChunk]
    decode_start: int            # rows decode_start .. T-1 are decode tokens
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
