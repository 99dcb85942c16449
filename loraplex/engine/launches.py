"""Every kernel launch a step within the engine's limits can make, worked out from shapes
before the first step. The same enumeration sizes the engine's workspace and drives the
kernel warm-up, so what is reserved and what is compiled cannot drift apart.

A step holds 1..max_tokens tokens (prompt chunks and decode tokens), at most max_decodes of
them decode tokens, whose block tables are at most max_blocks wide (an eager step's table is
as wide as its longest sequence; a CUDA graph's always max_blocks). Every kernel's launch
depends on these counts and on the model's fixed shapes only:

- NF4 products: one plan per (N, K, M bucket), fixed in the engine's `PlanTable`;
- LoRA shrink/expand: tile height and K split from the token count and slot count;
- decode attention: KV splits from the decode count and table width;
- norms, rotary, SiLU: one variant per model (nothing depends on the step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..kernels import attention, lora, lora_paged, nf4_matmul
from ..kernels.lora import BatchMeta
from ..kernels.lora_paged import PagedLoRA
from ..kernels.nf4_matmul import PlanTable
from ..kernels.workspace import Need, Workspace
from ..model.layers import QuantLinear
from ..model.llama import CausalLM

log = logging.getLogger("loraplex.engine")


@dataclass(frozen=True, slots=True)
class StepLimits:
    max_tokens: int   # tokens in one step (max_num_batched_tokens)
    max_decodes: int  # decode tokens in one step (max_num_seqs)
    max_blocks: int   # widest decode block table (max_model_len / block_size, rounded up)
    block_size: int


def plan_table(model: CausalLM, limits: StepLimits) -> PlanTable:
    """The NF4 plan of every product a step can run."""
    return PlanTable(model.linear_shapes(), limits.max_tokens, model.dtype, model.device)


# -- what each kernel can be asked for ------------------------------------------------------


def _stacks(model: CausalLM) -> list[PagedLoRA]:
    """One LoRA view per distinct geometry (they launch alike)."""
    seen: dict[tuple, PagedLoRA] = {}
    for linear in model.linears().values():
        stack = linear.lora
        if stack is not None:
            seen.setdefault((stack.in_features, stack.slices, stack.max_rank, stack.num_slots), stack)
    return list(seen.values())


def _linears(model: CausalLM) -> list[QuantLinear]:
    """One linear per distinct set of NF4 parts (shape, double quantization, bias)."""
    seen: dict[tuple, QuantLinear] = {}
    for linear in model.linears().values():
        key = tuple((tuple(w.shape), w.nested, w.nested_blocksize, b is not None)
                    for w, b in zip(linear.parts, linear.biases))
        seen.setdefault(key, linear)
    return list(seen.values())


def _shrink_variants(stack: PagedLoRA, limits: StepLimits,
                     device: torch.device) -> Iterator[tuple[int, lora.ShrinkLaunch]]:
    """(token count, launch) for every token count a step can have."""
    for t in range(1, limits.max_tokens + 1):
        yield t, lora_paged.paged_shrink_launch(stack, t, device)


def _decode_variants(model: CausalLM, limits: StepLimits) -> Iterator[tuple[int, int, int]]:
    """(decode tokens, table width, KV splits) for every decode batch and every table width
    that changes the split (the split sees the width only through its SPLIT_CHUNK count, up
    to 16 of them)."""
    c, bs = model.config, limits.block_size
    widths = sorted({min(limits.max_blocks, -(-chunks * attention.SPLIT_CHUNK // bs)) for chunks in range(1, 17)})
    for b in range(1, limits.max_decodes + 1):
        for width in widths:
            yield b, width, attention.decode_splits(b, c.num_kv_heads, width * bs, model.device)


def workspace_needs(model: CausalLM, limits: StepLimits, plans: PlanTable) -> Iterator[Need]:
    """Every workspace buffer any step within `limits` can ask for."""
    for (n, k, bucket), plan in plans.items():  # the most rows each bucket can hold
        yield from nf4_matmul.workspace_needs(plan, min(bucket, limits.max_tokens), n, k, model.dtype)
    for stack in _stacks(model):
        for _, launch in _shrink_variants(stack, limits, model.device):
            yield from launch.needs
    c = model.config
    for b, _, split in _decode_variants(model, limits):
        yield from attention.split_needs(b, c.num_heads, c.head_dim, split)


def size_workspace(model: CausalLM, limits: StepLimits, plans: PlanTable) -> Workspace:
    """The engine's workspace: every buffer at the largest size a step can need, allocated
    now and frozen (a larger request later raises, naming the buffer)."""
    ws = Workspace(model.device)
    ws.reserve(workspace_needs(model, limits, plans))
    ws.freeze()
    return ws


# -- warm-up --------------------------------------------------------------------------------


@torch.inference_mode()
def warm_up_kernels(model: CausalLM, limits: StepLimits, plans: PlanTable, workspace: Workspace) -> int:
    """Compile and run every NF4, LoRA and decode-attention variant a step within `limits`
    can select, on scratch inputs (the KV cache is only read; adapter slots are read as they
    are). Returns the number of launches made. The per-model kernels (norms, rotary, SiLU)
    are compiled by the warm-up steps the engine runs after this."""
    started, launches = time.perf_counter(), 0
    dev, dtype = model.device, model.dtype
    for linear in _linears(model):  # every plan of every product: one M per bucket
        for bucket in plans.buckets:
            m = min(bucket, limits.max_tokens)
            linear(torch.randn(m, linear.in_features, device=dev, dtype=dtype), None)
            launches += len(linear.parts)
    for stack in _stacks(model):  # every (tile height, K split) of the shrink; the expand follows the tiles
        variants: dict[tuple, int] = {}
        for t, launch in _shrink_variants(stack, limits, dev):
            variants.setdefault((launch.block_t, launch.split), t)
        for t in variants.values():
            meta = BatchMeta.build(torch.zeros(t, dtype=torch.int32, device=dev), stack.num_slots)
            y = torch.zeros(t, stack.out_features, device=dev, dtype=dtype)
            lora_paged.apply_paged_lora(torch.randn(t, stack.in_features, device=dev, dtype=dtype), y, stack,
                                        meta, workspace=workspace)
            launches += 2
    c, attn = model.config, model.layers[0].self_attn
    splits: dict[int, tuple[int, int]] = {}
    for b, width, split in _decode_variants(model, limits):
        splits.setdefault(split, (b, width))
    for b, width in splits.values():  # scratch block 0, one position: every split but the first is empty
        attention.paged_decode_attention(
            torch.randn(b, c.num_heads, c.head_dim, device=dev, dtype=dtype), attn.k_cache, attn.v_cache,
            torch.zeros(b, width, dtype=torch.int32, device=dev), torch.ones(b, dtype=torch.int32, device=dev),
            attn.scale, workspace)
        launches += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    log.info("warm-up: %d kernel launches over every variant within the limits in %.1fs",
             launches, time.perf_counter() - started)
    return launches
