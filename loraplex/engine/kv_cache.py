"""Paged KV cache: fixed-size blocks allocated at start, handed to sequences as they grow."""

from __future__ import annotations

from collections import OrderedDict
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
    """Reference-counted cache blocks, some of them content-addressed (the prefix cache).

    Block 0 is kept back as a scratch target for padding rows. Every other block is in one of
    three states, told apart by its reference count and key:
      in use     refs > 0: in the block tables of that many running sequences;
      cached     refs == 0 with a key: free, but its KV is still good and found by its key,
                 kept in LRU order (the most recently released last) until `grow` needs it;
      free       refs == 0, no key.
    A key is published (`publish`) only for a block whose positions are all computed and
    never written again (full); `lookup` takes a reference on each block of a chain of keys.
    Each key carries a tag (the adapter version it was computed under) so that everything of
    a version that went away can be dropped at once (`drop_tag`)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        self._tag: list[object] = [None] * num_blocks
        self._by_key: dict[bytes, int] = {}
        self._by_tag: dict[object, set[int]] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # refs == 0 with a key, oldest release first

    @property
    def num_free(self) -> int:
        """Blocks `grow` can hand out: free ones and cached ones no sequence uses."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks with a published key, in use or not."""
        return len(self._by_key)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks `table` needs to hold `num_tokens` positions."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` to hold `num_tokens` positions; False (and no change) if blocks ran out.
        Free blocks go first, then the least recently released cached ones lose their keys."""
        need = -(-num_tokens // self.block_size) - len(table)
        if need <= 0:  # (most calls: a decode within its last block)
            return True
        if need > len(self._free) + len(self._cached):
            return False
        for _ in range(need):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached.popitem(last=False)
                self._unpublish(block)
            self._refs[block] = 1
            table.append(block)
        return True

    def free(self, table: list[int]) -> None:
        """Drop the table's references. Its last blocks are released first, so that of a cached
        chain the tail is evicted before the head that other prompts share."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._key[block] is None:
                    self._free.append(block)
                else:
                    self._cached[block] = None
        table.clear()

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest leading run of `keys` that is cached, each with a new
        reference (the caller gives them back with `free`)."""
        blocks = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def publish(self, block: int, key: bytes, tag: object) -> bool:
        """Make a full, computed in-use block findable by `key`; False when another block holds
        that key already (two sequences computed the same prefix at once: this one stays private)."""
        if key in self._by_key or self._key[block] is not None:
            return False
        self._key[block], self._tag[block] = key, tag
        self._by_key[key] = block
        self._by_tag.setdefault(tag, set()).add(block)
        return True

    def drop_tag(self, tag: object) -> int:
        """Unpublish every block computed under `tag`: never found again, and those no sequence
        uses are free at once. Returns how many blocks lost their key."""
        blocks = list(self._by_tag.get(tag, ()))
        for block in blocks:
            self._unpublish(block)
            if self._refs[block] == 0:
                del self._cached[block]
                self._free.append(block)
        return len(blocks)

    def num_cached_under(self, tag: object) -> int:
        """Blocks with a published key computed under `tag`."""
        return len(self._by_tag.get(tag, ()))

    def clear_cache(self) -> None:
        """Unpublish everything (after a failed step, whose blocks may hold partial writes)."""
        for tag in list(self._by_tag):
            self.drop_tag(tag)

    def _unpublish(self, block: int) -> None:
        key, tag = self._key[block], self._tag[block]
        del self._by_key[key]
        tagged = self._by_tag[tag]
        tagged.discard(block)
        if not tagged:
            del self._by_tag[tag]
        self._key[block] = self._tag[block] = None

    def usage(self) -> float:
        """Fraction of blocks in use by sequences (cached blocks nobody uses count as free)."""
        return 1.0 - self.num_free / (self.num_blocks - 1)
