"""Paged KV cache: fixed-size blocks allocated at start, handed to sequences as they grow."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.kv_size * torch.empty((), dtype=dtype).element_size()


def blocks_for_memory(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                      memory_fraction: float, block_size: int, reserve_bytes: int = 0) -> int:
    """Blocks that fit in `memory_fraction` of the GPU's memory, after what is allocated now
    (weights, adapter slots) and `reserve_bytes` for activations."""
    if device.type != "cuda":
        raise ValueError("sizing the KV cache from a memory fraction needs a CUDA device; give a token count")
    total = torch.cuda.get_device_properties(device).total_memory
    free = total * memory_fraction - torch.cuda.memory_reserved(device) - reserve_bytes
    blocks = int(free // (kv_bytes_per_token(config, dtype) * block_size))
    if blocks < 1:
        raise ValueError(f"no memory left for the KV cache at memory fraction {memory_fraction}: "
                         f"{torch.cuda.memory_reserved(device) / 2**30:.1f} GiB are in use of {total / 2**30:.1f} GiB")
    return blocks


@dataclass
class KVCache:
    """Per layer k and v [num_blocks, block_size, Hkv, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> KVCache:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
                   block_size=block_size)

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]


class BlockAllocator:
    """Free list of cache blocks. Block 0 is kept back as a scratch target for padding rows."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks `table` needs to hold `num_tokens` positions."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` to hold `num_tokens` positions; False (and no change) if blocks ran out."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self._free):
            return False
        table.extend(self._free.pop() for _ in range(need))
        return True

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()

    def usage(self) -> float:
        return 1.0 - self.num_free / (self.num_blocks - 1)
