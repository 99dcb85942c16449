"""Prefix cache: a new sequence reuses the KV blocks of the longest prefix already computed.

A full block is found by its key, a hash of (the adapter version it was computed under, the
previous block's key, its token ids): equal keys mean the same tokens from the start, run
through the same weights. KV depends on the adapter (its deltas on q/k/v and on every layer
before), so blocks are shared only between sequences of one adapter version, or between
base-model sequences (version 0). A replaced adapter is a new version; once a version is gone
its blocks are dropped (`drop`). The hash is cryptographic (blake2b, 128 bits) because a
collision would hand one client another's KV: Python's `hash` of a tuple can be forced.

The blocks themselves, their references and the LRU order of cached blocks no sequence uses
are the allocator's (`kv_cache.BlockAllocator`); this module decides which keys a sequence
looks up and publishes:
  match(req)    at admission: reuse the leading cached blocks. At least the last token is
                always recomputed (its logits are needed), so that block is never shared.
  publish(reqs) after each launch: blocks whose positions are all computed and whose tokens
                are known on the host get their keys (prompt and generated tokens alike, so
                a preempted sequence and the next turn of a chat find them).
A request that asks for prompt logprobs does not match: those need every prompt position run.
"""

from __future__ import annotations

import hashlib
from array import array

from .kv_cache import BlockAllocator
from .request import Request

BASE_VERSION = 0  # the base model's "adapter version"


def block_key(parent: bytes, version: int, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(version.to_bytes(8, "little", signed=True))
    h.update(array("q", tokens).tobytes())
    return h.digest()


class PrefixCache:
    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.block_size = allocator.block_size

    def _keys(self, req: Request, num_blocks: int) -> list[bytes]:
        """The keys of the request's first `num_blocks` full blocks (extended as tokens come)."""
        keys, bs = req.block_keys, self.block_size
        if len(keys) < num_blocks:
            ids = req.all_ids
            for i in range(len(keys), num_blocks):
                keys.append(block_key(keys[-1] if keys else b"", req.cache_version, ids[i * bs:(i + 1) * bs]))
        return keys[:num_blocks]

    def match(self, req: Request) -> int | None:
        """Give a request with no blocks the cached blocks of its longest cached prefix; returns
        the tokens reused (its `num_computed` now), None if it may not use the cache."""
        if req.params.prompt_logprobs is not None or req.block_table:
            return None
        usable = min(len(req.prompt_ids) + len(req.output_ids), req.num_tokens - 1) // self.block_size
        req.block_table = self.allocator.lookup(self._keys(req, usable))
        req.num_computed = len(req.block_table) * self.block_size
        req.num_published = len(req.block_table)
        return req.num_computed

    def unmatch(self, req: Request) -> None:
        """Undo `match` (the request could not be admitted after all)."""
        self.allocator.free(req.block_table)
        req.num_computed = req.num_published = 0

    def publish(self, reqs) -> None:
        """After a launch, for the requests it ran (a cheap test each: most steps complete no block)."""
        bs = self.block_size
        for req in reqs:
            if req.num_computed // bs > req.num_published:
                self._publish(req)

    def _publish(self, req: Request) -> None:
        full = min(req.num_computed, len(req.prompt_ids) + len(req.output_ids)) // self.block_size
        if full <= req.num_published:
            return  # the block's last token is still on the device (async scheduling)
        keys = self._keys(req, full)
        for i in range(req.num_published, full):
            self.allocator.publish(req.block_table[i], keys[i], req.cache_version)
        req.num_published = full

    def drop(self, version: int) -> int:
        """An adapter version went away: its blocks are never reused and free at once."""
        return self.allocator.drop_tag(version)
