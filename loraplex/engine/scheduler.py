"""Continuous batching: which tokens run in the next step.

Each step is one flat batch: one decode token for every running sequence, then prompt chunks
(chunked prefill) under a token budget. A request is admitted only when the KV blocks for
its whole current length are free and its adapter sits in a GPU slot; a request whose
adapter is still paging in waits without holding up the requests behind it. When decoding
sequences run out of blocks, the most recently admitted ones are preempted (their blocks
freed, recomputed later from their tokens) rather than failing anything. With a prefix
cache, an admitted request starts from the longest prefix of its tokens already in the cache
and prefills only the rest.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .adapters import AdapterProvider
from .kv_cache import BlockAllocator
from .prefix_cache import PrefixCache
from .request import Request, Status


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256              # running sequences at most
    max_num_batched_tokens: int = 2048   # tokens per step (decodes + prompt chunks)
    watermark: float = 0.01              # blocks kept free at admission, for decodes to grow into

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode")


@dataclass(slots=True)
class ScheduledStep:
    prefills: list[tuple[Request, int]] = field(default_factory=list)  # (request, prompt tokens this step)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    cache_lookups: list[tuple[Request, int, int]] = field(default_factory=list)  # admitted: (request,
                                                   # tokens looked up in the prefix cache, tokens found)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, adapters: AdapterProvider | None,
                 prefix_cache: PrefixCache | None = None):
        self.config = config
        self.allocator = allocator
        self.adapters = adapters
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order; preemption takes from the end

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out, freeing its blocks and GPU slot."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release_resources(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED

    def _release_resources(self, req: Request) -> None:
        self.allocator.free(req.block_table)
        if req.adapter_ref is not None:
            self.adapters.deactivate(req.adapter_ref)
        req.lora_slot = -1

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release_resources(req)
        req.num_computed = req.num_published = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.config.max_num_batched_tokens

        # 1. one token for each decoding sequence, oldest first; preempt the newest for blocks
        for req in list(self.running):
            if req.status is not Status.RUNNING or not req.is_decoding or req.out_of_tokens:
                continue  # (out of tokens: its last token is still in flight, async scheduling)
            while not self.allocator.grow(req.block_table, req.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                step.decodes.append(req)
                budget -= 1

        # 2. prompt chunks of sequences already admitted (their blocks were allocated then)
        for req in self.running:
            if budget == 0:
                break
            if not req.is_decoding:
                chunk = min(req.num_uncomputed, budget)
                step.prefills.append((req, chunk))
                budget -= chunk

        # 3. admit waiting requests in arrival order, unless this step had to preempt
        if step.preempted:
            return step
        # the watermark only guards sequences already running (alone, a request may use it all)
        reserve = int(self.config.watermark * self.allocator.num_blocks) if self.running else 0
        paging_in: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            slot = -1
            if req.adapter_ref is not None:
                slot = self.adapters.activate(req.adapter_ref)
                if slot is None:  # not in a GPU slot yet: let the requests behind it go first
                    paging_in.append(self.waiting.popleft())
                    continue
            looked_up = self.prefix_cache.match(req) if self.prefix_cache is not None else None
            cached = looked_up or 0
            need = self.allocator.blocks_needed(req.block_table, req.num_tokens)
            if need > self.allocator.num_free - reserve:
                if cached:
                    self.prefix_cache.unmatch(req)
                if req.adapter_ref is not None:
                    self.adapters.deactivate(req.adapter_ref)
                break
            self.allocator.grow(req.block_table, req.num_tokens)
            self.waiting.popleft()
            req.status, req.lora_slot = Status.RUNNING, slot
            if req.first_scheduled is None:
                req.first_scheduled = time.monotonic()
                req.num_cached_tokens = cached
            if looked_up is not None:
                step.cache_lookups.append((req, req.num_tokens, cached))
            self.running.append(req)
            chunk = min(req.num_uncomputed, budget)
            step.prefills.append((req, chunk))
            budget -= chunk
        self.waiting.extendleft(reversed(paging_in))
        return step
