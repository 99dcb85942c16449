"""CUDA graphs for decode-only steps: at batch 1 a 7B decode step is ~450 kernel launches of a
few microseconds each, so launch overhead alone would rival the ~1.2 ms weight-read floor.

One graph per padded batch size over static input buffers, captured last at start-up
(`Engine.warm_up`). A step with B decode tokens copies its inputs into the buffers, pads up to
the next captured size (padding rows write their keys and values to the scratch block 0,
attend one position there and use no adapter) and replays. Everything inside (NF4 matmul
plans, the LoRA tile list, attention splits) is sized from shapes only, which is what makes
the steps capturable; everything outside that a graph touches (KV cache, adapter slots, the
engine's workspace and plans, these buffers) is allocated once, before capture, and never
replaced: the workspace is frozen, and `run` checks that the rest are the ones captured.
Before capture (and on CPU, in tests) `run` takes the same padded path eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from ..kernels.lora import BatchMeta
from ..model.llama import CausalLM
from ..model.step import StepMeta

log = logging.getLogger("loraplex.engine")

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: CausalLM, max_batch: int, max_blocks: int):
        self.model = model
        dev = model.device
        self.sizes = sorted({b for b in BATCH_SIZES if b < max_batch} | {max_batch})
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.lora_slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._state: tuple | None = None

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def _bound_state(self) -> tuple:
        """Identity of the long-lived state a graph bakes in: KV cache, adapter stacks, the
        workspace and plans bound to the model."""
        first = self.model.layers[0].self_attn
        stack = first.qkv_proj.lora
        return (id(first.k_cache), id(stack.a) if stack is not None else None, id(first.workspace),
                id(first.qkv_proj.plans))

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, b: int) -> torch.Tensor:
        positions = self.positions[:b]
        cos, sin = self.model.rope(positions)
        lora = BatchMeta.build(self.lora_slots[:b], self.model.lora_slots) if self.model.lora_slots else None
        step = StepMeta(positions=positions, slot_mapping=self.slot_mapping[:b], cos=cos, sin=sin,
                        prefill_cu_seqlens=None, prefill_context_lens=None, prefill_block_tables=None,
                        decode_start=0, decode_block_tables=self.block_tables[:b], decode_seq_lens=self.seq_lens[:b],
                        lora=lora, logits_rows=self.rows[:b])
        return self.model(self.input_ids[:b], step)

    def capture(self) -> None:
        """Capture one graph per size (CUDA). The model's workspace must be frozen: a graph
        bakes in its buffers, which must never be replaced."""
        workspace = self.model.layers[0].self_attn.workspace
        if workspace is None or not workspace.frozen:
            raise RuntimeError("decode graphs need the engine's frozen workspace bound to the model "
                               "(CausalLM.bind_kernels) before capture")
        self._state = self._bound_state()
        started = time.perf_counter()
        # Run every size eagerly first (Triton kernels compile if warm_up did not run; cuBLAS and
        # the allocator settle), then capture largest first so the smaller graphs reuse its pool.
        for b in self.sizes:
            self._forward(b)
        torch.cuda.synchronize()
        pool = None
        for b in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            # thread_local: the registry's loader thread may allocate pinned host rows meanwhile
            # (capture may happen at the first step, with page-ins under way); it never touches
            # this stream
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch 1..%d) in %.1fs", len(self.sizes), self.max_batch,
                 time.perf_counter() - started)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            lora_slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of B decode tokens (B <= max_batch). The result is a view of a static
        buffer: consume it before the next call."""
        if self.captured and self._bound_state() != self._state:
            raise RuntimeError("the model's KV cache, adapter slots or kernel workspace were replaced after the "
                               "decode graphs were captured (another Engine on this model?); create a new Engine")
        b = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= b)
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(slot_mapping, non_blocking=True)
        self.lora_slots[:b].copy_(lora_slots, non_blocking=True)
        self.block_tables[:b].zero_()
        self.block_tables[:b, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.seq_lens[:b].copy_(seq_lens, non_blocking=True)
        if size > b:  # padding rows: scratch block 0, one position, no adapter
            self.slot_mapping[b:size].zero_()
            self.positions[b:size].zero_()
            self.lora_slots[b:size].fill_(-1)
            self.block_tables[b:size].zero_()
            self.seq_lens[b:size].fill_(1)
        if not self.captured:
            return self._forward(size)[:b]
        self.graphs[size].replay()
        return self.outputs[size][:b]
