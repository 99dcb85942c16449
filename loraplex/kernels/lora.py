"""Batched multi-adapter LoRA: every token gets the delta of its own adapter, one launch per op.

    y[t, slice l] += scaling[s, l] * (x[t] @ A_l[s].T) @ B_l[s].T     for s = slot[t] >= 0

A projection's adapters live stacked over S GPU slots (`LoRAStack`); a fused projection
(q/k/v, gate/up) has L slices that share the input x and write disjoint column ranges of
one output. Two kernels per projection and step (the SGMV idea of Punica and S-LoRA):

- `lora_shrink`: h = x @ A[s].T for the tokens of every active slot at once (fp32
  accumulation, h kept in fp32). All L slices' A are stacked along the rank axis, so the
  fused case is one product; rank tiles beyond a slot's real rank are skipped. Split-K (the
  self-cleaning workspace of `splitk.py`) keeps the GPU busy when few tokens are in flight.
- `lora_expand`: y[t, slice l] += scaling[s, l] * h[:, slice l] @ B[s, slice l].T, reading
  only the real rank of each slot and slice, for all slices in one launch.

Both walk `BatchMeta` tiles: runs of BLOCK_T tokens of one slot, in slot-sorted order.
The meta is built once per step on the device (no host sync) and the grid is a static
bound (`max_tiles`), so a step can be captured in a CUDA graph; unused tiles exit at once.
Tokens of slot -1 (base model only) are in no tile and get no delta.

On CPU the `*_ref` functions run unless `TRITON_INTERPRET=1` (tests), as in `nf4_matmul`.

The engine reads adapters from paged memory (`lora_paged.py`, `lora_pool.py`), which reuses
`BatchMeta`; these slot kernels, every slot pre-allocated at rank capacity, stay as the
baseline `bench/lora.py` measures the paged kernels against.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch

from . import runtime
from .runtime import INTERPRET
from .splitk import split_for, splitk_needs
from .workspace import Need, Workspace, standalone

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None



# ----------------------------------------------------------------------------------------
# Stacked weights of one projection
# ----------------------------------------------------------------------------------------


def padded_rank(max_rank: int) -> int:
    """Rank capacity of a stack: a power of two >= 16, so rank tiles never straddle slices."""
    if not 1 <= max_rank <= 128:
        raise ValueError(f"max rank must be between 1 and 128, got {max_rank}")
    return max(16, 1 << (max_rank - 1).bit_length())


@dataclass(eq=False)
class LoRAStack:
    """LoRA weights of one projection (L fused slices) for S GPU slots.

    a        [S, L * R, K]  A of slice l in rows l*R .. l*R + rank[s, l], zeros beyond
    b        [S, N, R]      B of slice l in rows slice_starts[l] .. slice_starts[l + 1]
    scaling  [S, L] fp32    alpha / r (or alpha / sqrt(r) for rsLoRA), per slot and slice
    rank     [S, L] int32   real rank; 0 marks a slice the slot's adapter does not target
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: torch.Tensor
    rank: torch.Tensor
    slices: tuple[int, ...]
    slice_starts: torch.Tensor  # [L + 1] int32, on the device, for the kernels

    @classmethod
    def allocate(cls, slots: int, in_features: int, slices: Sequence[int], max_rank: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> LoRAStack:
        """Zeroed slots (no adapter anywhere) for a projection with output slices `slices`."""
        if slots < 1 or not slices or min(slices) < 1:
            raise ValueError(f"need at least one slot and positive slice widths, got {slots} and {list(slices)}")
        r = padded_rank(max_rank)
        n_slices = len(slices)
        starts = torch.tensor([0, *accumulate(slices)], dtype=torch.int32, device=device)
        return cls(
            a=torch.zeros(slots, n_slices * r, in_features, dtype=dtype, device=device),
            b=torch.zeros(slots, sum(slices), r, dtype=dtype, device=device),
            scaling=torch.zeros(slots, n_slices, dtype=torch.float32, device=device),
            rank=torch.zeros(slots, n_slices, dtype=torch.int32, device=device),
            slices=tuple(slices),
            slice_starts=starts,
        )

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.b.shape[2]

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def in_features(self) -> int:
        return self.a.shape[2]

    @property
    def out_features(self) -> int:
        return self.b.shape[1]

    def targets(self) -> torch.Tensor:
        """[S, L] bool: which slices each slot's adapter targets."""
        return self.rank > 0

    def set_slot(self, slot: int, per_slice: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None]) -> None:
        """Put one adapter into `slot`: for each slice, (A [r, K], B [N_l, r], scaling), or
        None where the adapter does not target that slice."""
        if len(per_slice) != self.num_slices:
            raise ValueError(f"expected {self.num_slices} slices, got {len(per_slice)}")
        r_max, k = self.max_rank, self.in_features
        starts = self.slice_starts.tolist()
        for l, entry in enumerate(per_slice):
            if entry is None:
                continue
            a, b, _ = entry
            r = a.shape[0]
            if a.shape != (r, k) or b.shape != (self.slices[l], r):
                raise ValueError(f"slice {l}: expected A [r, {k}] and B [{self.slices[l]}, r], "
                                 f"got A {list(a.shape)} and B {list(b.shape)}")
            if not 1 <= r <= r_max:
                raise ValueError(f"slice {l}: rank {r} outside 1..{r_max}")
        # every element is written once (data or zero padding): no clearing pass first, which
        # would double the memory traffic of packing a large adapter
        for l, entry in enumerate(per_slice):
            a_rows = self.a[slot, l * r_max: (l + 1) * r_max]
            b_cols = self.b[slot, starts[l]: starts[l + 1]]
            r = 0 if entry is None else entry[0].shape[0]
            if r:
                a_rows[:r].copy_(entry[0])
                b_cols[:, :r].copy_(entry[1])
            if r < r_max:
                a_rows[r:].zero_()
                b_cols[:, r:].zero_()
            self.scaling[slot, l] = 0.0 if entry is None else entry[2]
            self.rank[slot, l] = r


# ----------------------------------------------------------------------------------------
# Per-step metadata
# ----------------------------------------------------------------------------------------


def default_block_t(num_tokens: int) -> int:
    return 16 if num_tokens <= 256 else 64


def max_tiles(num_tokens: int, num_slots: int, block_t: int) -> int:
    """Static bound on the tiles of a step: every slot's last tile may be partial."""
    return -(-num_tokens // block_t) + min(num_slots, num_tokens)


@dataclass
class BatchMeta:
    """Which adapter slot each token of a step uses, arranged for the kernels.

    Built once per engine step with device-side ops only (no host sync) and passed to every
    layer. Shapes depend on the token count and slot count only, never on the data.
    """

    slot_ids: torch.Tensor   # [T] int32 slot of each token; -1 = base model only
    order: torch.Tensor      # [T] int32 token indices sorted by slot (stable), base tokens last
    seg_start: torch.Tensor  # [S] int32 first sorted position of each slot's tokens
    seg_len: torch.Tensor    # [S] int32 number of tokens per slot (0: slot inactive this step)
    tile_slot: torch.Tensor  # [max_tiles] int32 slot of each tile of block_t sorted rows; -1: unused
    tile_row: torch.Tensor   # [max_tiles] int32 first sorted position of each tile
    num_tokens: int
    num_slots: int
    block_t: int

    @classmethod
    def build(cls, slot_ids: torch.Tensor, num_slots: int, block_t: int | None = None) -> BatchMeta:
        if slot_ids.dim() != 1:
            raise ValueError(f"slot ids must be one per token (1-D), got shape {list(slot_ids.shape)}")
        t = slot_ids.numel()
        block_t = block_t or default_block_t(t)
        device = slot_ids.device
        key = slot_ids.to(torch.int64)
        key = torch.where(key >= 0, key, num_slots)  # base tokens sort after every slot
        order = torch.sort(key, stable=True).indices
        counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
        counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_slots]
        seg_start = torch.cumsum(counts, 0) - counts
        tiles = (counts + block_t - 1) // block_t
        tile_end = torch.cumsum(tiles, 0)
        index = torch.arange(max_tiles(t, num_slots, block_t), device=device)
        tile_slot = torch.searchsorted(tile_end, index, right=True)
        clamped = tile_slot.clamp(max=num_slots - 1)
        tile_row = seg_start[clamped] + (index - (tile_end - tiles)[clamped]) * block_t
        tile_slot = torch.where(tile_slot < num_slots, tile_slot, -1)
        i32 = torch.int32
        return cls(slot_ids.to(i32), order.to(i32), seg_start.to(i32), counts.to(i32),
                   tile_slot.to(i32), tile_row.to(i32), t, num_slots, block_t)

    @property
    def max_tiles(self) -> int:
        return self.tile_slot.numel()

    @property
    def active(self) -> torch.Tensor:
        """[S] bool: slots with at least one token this step."""
        return self.seg_len > 0


# ----------------------------------------------------------------------------------------
# References (CPU fallback and test oracle)
# ----------------------------------------------------------------------------------------


def lora_delta_ref(x: torch.Tensor, stack: LoRAStack, slot_ids: torch.Tensor) -> torch.Tensor:
    """fp32 [T, N] delta straight from the definition, one token at a time (the oracle)."""
    r_max = stack.max_rank
    starts = stack.slice_starts.tolist()
    delta = torch.zeros(x.shape[0], stack.out_features, dtype=torch.float32, device=x.device)
    for t, s in enumerate(slot_ids.tolist()):
        if s < 0:
            continue
        for l in range(stack.num_slices):
            r = int(stack.rank[s, l])
            if r:
                a = stack.a[s, l * r_max: l * r_max + r].float()
                b = stack.b[s, starts[l]: starts[l + 1], :r].float()
                delta[t, starts[l]: starts[l + 1]] = stack.scaling[s, l] * (x[t].float() @ a.T) @ b.T
    return delta


def lora_shrink_ref(x: torch.Tensor, stack: LoRAStack, meta: BatchMeta) -> torch.Tensor:
    """h [T, L * R] fp32 in slot-sorted order (row i is token order[i]); base rows zero."""
    h = torch.zeros(meta.num_tokens, stack.a.shape[1], dtype=torch.float32, device=x.device)
    for s, start, length in zip(range(meta.num_slots), meta.seg_start.tolist(), meta.seg_len.tolist()):
        if length:
            tokens = meta.order[start: start + length].long()
            h[start: start + length] = x[tokens].float() @ stack.a[s].float().T
    return h


def lora_expand_ref(h: torch.Tensor, stack: LoRAStack, meta: BatchMeta, y: torch.Tensor) -> torch.Tensor:
    """y[token, slice l] += scaling * h[:, slice l] @ B.T, in place; returns y."""
    r_max = stack.max_rank
    starts = stack.slice_starts.tolist()
    for s, start, length in zip(range(meta.num_slots), meta.seg_start.tolist(), meta.seg_len.tolist()):
        if not length:
            continue
        tokens = meta.order[start: start + length].long()
        for l in range(stack.num_slices):
            r = int(stack.rank[s, l])
            if r:
                b = stack.b[s, starts[l]: starts[l + 1], :r].float()
                delta = stack.scaling[s, l] * h[start: start + length, l * r_max: l * r_max + r] @ b.T
                y[tokens, starts[l]: starts[l + 1]] += delta.to(y.dtype)
    return y


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if triton is not None:
    from .splitk import k_range, write_tile

    @triton.jit
    def _tile_rows(tile_slot_ptr, tile_row_ptr, seg_start_ptr, seg_len_ptr, order_ptr, pid_t,
                   BLOCK_M: tl.constexpr):
        # Slot of tile pid_t (-1: unused), its sorted rows, which of them are real, their tokens.
        s = tl.load(tile_slot_ptr + pid_t)
        s_safe = tl.maximum(s, 0)
        rows = tl.load(tile_row_ptr + pid_t) + tl.arange(0, BLOCK_M)
        seg_end = tl.load(seg_start_ptr + s_safe) + tl.load(seg_len_ptr + s_safe)
        row_mask = rows < tl.where(s >= 0, seg_end, 0)
        tokens = tl.load(order_ptr + rows, mask=row_mask, other=0)
        return s, s_safe, rows, row_mask, tokens

    @triton.jit(do_not_specialize=["T"])  # T changes from step to step: one compiled kernel for all
    def _lora_shrink_kernel(
        x_ptr, a_ptr, h_ptr, rank_ptr, order_ptr, tile_slot_ptr, tile_row_ptr, seg_start_ptr,
        seg_len_ptr, ws_ptr, ticket_ptr, T, K, LR, R, stride_as, stride_rank,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # grid = (max_tiles, L * R / BLOCK_R, SPLIT_K): h[rows, r-tile] = x[tokens] @ A[s, r-tile].T
        pid_t = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_k = tl.program_id(2)
        s, s_safe, rows, row_mask, tokens = _tile_rows(tile_slot_ptr, tile_row_ptr, seg_start_ptr,
                                                       seg_len_ptr, order_ptr, pid_t, BLOCK_M)
        r0 = pid_r * BLOCK_R
        sl = r0 // R  # the slice this rank tile belongs to (BLOCK_R divides R)
        real = tl.load(rank_ptr + s_safe * stride_rank + sl)
        if (s >= 0) & (r0 - sl * R < real):  # same verdict for every split: tickets stay consistent
            rr = r0 + tl.arange(0, BLOCK_R)
            r_mask = rr - sl * R < real  # padded rank rows are zero: do not even load them
            a_rows = a_ptr + s_safe.to(tl.int64) * stride_as + rr.to(tl.int64)[:, None] * K
            x_rows = x_ptr + tokens.to(tl.int64)[:, None] * K
            k_lo, k_hi = k_range(pid_k, K, BLOCK_K, SPLIT_K)
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = tl.multiple_of(k0, BLOCK_K) + tl.arange(0, BLOCK_K)
                k_mask = kk < K
                x = tl.load(x_rows + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                a = tl.load(a_rows + kk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
                if DOT_FP32:  # interpreter: its bf16 arithmetic is wrong, compute in fp32
                    acc = tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(a), acc)
            out_rows = tl.where(row_mask, rows, T)  # rows of the next segment are not ours
            write_tile(acc, out_rows, rr, T, LR, h_ptr, h_ptr, ws_ptr, ticket_ptr,
                       pid_t * tl.num_programs(1) + pid_r, False, SPLIT_K)

    @triton.jit
    def _lora_expand_kernel(
        h_ptr, b_ptr, y_ptr, scaling_ptr, rank_ptr, slice_starts_ptr, order_ptr, tile_slot_ptr,
        tile_row_ptr, seg_start_ptr, seg_len_ptr, LR, R, stride_bs, stride_scaling, stride_rank, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # grid = (max_tiles, cdiv(widest slice, BLOCK_N), L):
        # y[tokens, cols of slice l] += scaling[s, l] * h[rows, l*R : l*R + rank] @ B[s, cols, :rank].T
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        sl = tl.program_id(2)
        s, s_safe, rows, row_mask, tokens = _tile_rows(tile_slot_ptr, tile_row_ptr, seg_start_ptr,
                                                       seg_len_ptr, order_ptr, pid_t, BLOCK_M)
        real = tl.load(rank_ptr + s_safe * stride_rank + sl)
        n_lo = tl.load(slice_starts_ptr + sl) + pid_n * BLOCK_N
        n_hi = tl.load(slice_starts_ptr + sl + 1)
        if (s >= 0) & (real > 0) & (n_lo < n_hi):
            cols = n_lo + tl.arange(0, BLOCK_N)
            c_mask = cols < n_hi
            h_rows = h_ptr + rows.to(tl.int64)[:, None] * LR + sl * R
            b_rows = b_ptr + s_safe.to(tl.int64) * stride_bs + cols.to(tl.int64)[:, None] * R
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            # Whole rank chunks, unmasked along the rank (so loads stay 16-byte vectors): B is
            # zero-padded past the real rank, and the shrink wrote zeros there in h (it writes
            # whole BLOCK_R tiles of the same size).
            for r0 in range(0, real, BLOCK_R):
                rr = tl.multiple_of(r0, BLOCK_R) + tl.arange(0, BLOCK_R)
                h = tl.load(h_rows + rr[None, :], mask=row_mask[:, None], other=0.0)
                b = tl.load(b_rows + rr[None, :], mask=c_mask[:, None], other=0.0, eviction_policy="evict_first")
                if DOT_FP32:
                    acc = tl.dot(h, tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(h.to(b.dtype), tl.trans(b), acc)
            scale = tl.load(scaling_ptr + s_safe * stride_scaling + sl)
            y_ptrs = y_ptr + tokens.to(tl.int64)[:, None] * stride_y + cols[None, :]
            mask = row_mask[:, None] & c_mask[None, :]
            y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAConfig:
    """Tile sizes; BLOCK_M is the meta's block_t. split_k 0 = chosen from the grid size;
    block_k 0 = 256 compiled, 64 in the interpreter (small models' tests then see split-K)."""

    shrink_block_k: int = 0
    shrink_split_k: int = 0
    expand_block_n: int = 128
    num_warps: int = 4


def _rank_tile(stack: LoRAStack) -> int:
    # One rank tile for both kernels: the shrink writes whole tiles (zeros past the real rank)
    # and the expand reads whole tiles of the same size without a rank mask.
    return min(stack.max_rank, 64)


@dataclass(frozen=True)
class ShrinkLaunch:
    """How `lora_shrink` runs T tokens over a stack: tile sizes, K split, grid, workspace."""

    block_t: int
    block_r: int
    block_k: int
    split: int
    grid: tuple[int, int, int]
    needs: tuple[Need, ...]


def shrink_launch(stack: LoRAStack, num_tokens: int, device: torch.device,
                  config: LoRAConfig = LoRAConfig(), block_t: int | None = None) -> ShrinkLaunch:
    """The launch of `lora_shrink` for `num_tokens` tokens (from shapes only: the grid is the
    meta's static tile bound, never the data)."""
    t, k, lr = num_tokens, stack.in_features, stack.a.shape[1]
    block_t = block_t or default_block_t(t)
    block_r = _rank_tile(stack)
    block_k = min(config.shrink_block_k or (256 if device.type == "cuda" else 64), triton.next_power_of_2(k))
    tiles, r_tiles = max_tiles(t, stack.num_slots, block_t), lr // block_r
    split = config.shrink_split_k or split_for(tiles * r_tiles, triton.cdiv(k, block_k), runtime.num_sms(device))
    return ShrinkLaunch(block_t, block_r, block_k, split, (tiles, r_tiles, split),
                        splitk_needs(split, t * lr, tiles * r_tiles))


def _check(x_or_h: torch.Tensor, stack: LoRAStack, meta: BatchMeta, width: int, what: str) -> None:
    if x_or_h.dim() != 2 or x_or_h.shape != (meta.num_tokens, width):
        raise ValueError(f"{what}: expected [{meta.num_tokens}, {width}], got {list(x_or_h.shape)}")
    if meta.num_slots != stack.num_slots:
        raise ValueError(f"{what}: meta was built for {meta.num_slots} slots, the stack has {stack.num_slots}")
    if x_or_h.device != stack.a.device:
        raise ValueError(f"{what}: tensors on {x_or_h.device}, adapter weights on {stack.a.device}")


def lora_shrink(x: torch.Tensor, stack: LoRAStack, meta: BatchMeta,
                config: LoRAConfig = LoRAConfig(), workspace: Workspace | None = None) -> torch.Tensor:
    """h[i] = x[order[i]] @ A[slot].T for every token with a slot: fp32 [T, L * R], rows in
    slot-sorted order (`meta.order`); rows of base-model tokens are left unset. `workspace`
    holds the split-K scratch (an engine passes its frozen one; default: a growable one)."""
    _check(x, stack, meta, stack.in_features, "lora_shrink")
    if not runtime.use_triton(x.device):
        return lora_shrink_ref(x, stack, meta)
    if x.dtype != stack.a.dtype:
        raise ValueError(f"lora_shrink: x is {x.dtype}, adapter weights are {stack.a.dtype}")
    t, k = x.shape
    lr, r = stack.a.shape[1], stack.max_rank
    h = torch.empty(t, lr, dtype=torch.float32, device=x.device)
    if t == 0:
        return h
    x = x.contiguous()
    plan = shrink_launch(stack, t, x.device, config, meta.block_t)
    partials, tickets = (workspace or standalone(x.device)).take(plan.needs) or (h, h)  # unused without a split
    runtime.launch(
        _lora_shrink_kernel, plan.grid,
        x, stack.a, h, stack.rank, meta.order, meta.tile_slot, meta.tile_row, meta.seg_start,
        meta.seg_len, partials, tickets, t, k, lr, r, stack.a.stride(0), stack.rank.stride(0),
        BLOCK_M=meta.block_t, BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, SPLIT_K=plan.split, DOT_FP32=INTERPRET,
        num_warps=config.num_warps,
    )
    return h


def lora_expand(h: torch.Tensor, stack: LoRAStack, meta: BatchMeta, y: torch.Tensor,
                config: LoRAConfig = LoRAConfig()) -> torch.Tensor:
    """y[token, slice l] += scaling[s, l] * h[:, slice l] @ B[s, slice l].T in place, for every
    token with a slot and every slice its adapter targets; returns y. `h` is what
    `lora_shrink` returned for the same stack and meta (finite, zero past each real rank)."""
    _check(h, stack, meta, stack.a.shape[1], "lora_expand")
    if y.shape != (meta.num_tokens, stack.out_features) or y.stride(-1) != 1:
        raise ValueError(f"lora_expand: y must be [{meta.num_tokens}, {stack.out_features}] with unit "
                         f"column stride, got {list(y.shape)} strides {y.stride()}")
    if not runtime.use_triton(y.device):
        return lora_expand_ref(h, stack, meta, y)
    if meta.num_tokens == 0:
        return y
    widest = max(stack.slices)
    block_n = min(config.expand_block_n, triton.next_power_of_2(widest))
    runtime.launch(
        _lora_expand_kernel, (meta.max_tiles, triton.cdiv(widest, block_n), stack.num_slices),
        h, stack.b, y, stack.scaling, stack.rank, stack.slice_starts, meta.order, meta.tile_slot,
        meta.tile_row, meta.seg_start, meta.seg_len, stack.a.shape[1],
        stack.max_rank, stack.b.stride(0), stack.scaling.stride(0), stack.rank.stride(0), y.stride(0),
        BLOCK_M=meta.block_t, BLOCK_N=block_n, BLOCK_R=_rank_tile(stack), DOT_FP32=INTERPRET,
        num_warps=config.num_warps,
    )
    return y


def apply_lora(x: torch.Tensor, y: torch.Tensor, stack: LoRAStack, meta: BatchMeta,
               config: LoRAConfig = LoRAConfig(), workspace: Workspace | None = None) -> torch.Tensor:
    """y += every token's own LoRA delta (shrink then expand); returns y."""
    return lora_expand(lora_shrink(x, stack, meta, config, workspace), stack, meta, y, config)
