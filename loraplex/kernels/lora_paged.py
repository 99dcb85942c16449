"""Batched multi-adapter LoRA over paged adapter memory: the slot kernels' math, weights
read through page tables.

    y[t, slice l] += scaling[s, l] * (x[t] @ A_l[s].T) @ B_l[s].T     for s = slot[t] >= 0

Adapter weights live in one pool of fixed-size pages shared by every projection
(`lora_pool.LoRAPagePool`). A page holds W elements of one rank-row: a row of A (length K)
or a column of B (length N_l), each split over K / W or N_l / W pages. A slot is a small
record (rank, scaling, where its rows start in the page table), so an adapter takes pages
for its real ranks and real targets only, and the number of slots costs almost nothing.

The two kernels per projection and step are those of `lora.py`, over the same `BatchMeta`
tiles (built on the device, static grid, unused tiles exit at once: CUDA-graph capturable):

- `paged_shrink`: h = x @ A[s].T, fp32 [T, L * R], grid (tiles, L * R / BLOCK_R, split-K).
  A K-chunk of BLOCK_K elements (a power of two dividing W) lies in one page, so a rank tile
  of A is BLOCK_R page ids from the table, then one contiguous BLOCK_K run per page. Rank-rows
  past the slot's real rank have no pages and are never loaded (masked to zero); rank tiles
  wholly past it exit. Split-K goes through the shared self-cleaning workspace (`splitk.py`).
- `paged_expand`: y[t, slice l] += scaling * h[:, slice l] @ B[s, slice l].T in place, all
  slices in one launch, grid (tiles, widest slice / BLOCK_N, L). A BLOCK_N column tile (a
  power of two dividing W) of B.T's real rank-rows is again one contiguous run per page.

Both accumulate in fp32; the products run on the activation dtype (in fp32 for fp32 weights
and in the interpreter). On CPU the `paged_*_ref` functions run unless `TRITON_INTERPRET=1`
(tests); they gather each active slot's slices once per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from . import runtime
from .lora import BatchMeta, LoRAConfig, ShrinkLaunch, default_block_t, max_tiles
from .runtime import INTERPRET
from .splitk import split_for, splitk_needs
from .workspace import Workspace, standalone

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@dataclass(eq=False)
class PagedLoRA:
    """LoRA weights of one projection (L fused slices) for S slots, read through page tables.

    pages    [P, W]  activation dtype: the pool every projection shares (W: page width)
    table    [E] int32 page ids. For slot s and slice l:
               A rank-row r, page j (0 <= j < K // W):   table[a_start[s, l] + r * (K // W) + j]
               B rank-row r (B[:, r], length N_l),
                          page j (0 <= j < N_l // W):     table[b_start[s, l] + r * (N_l // W) + j]
    rank     [S, L] int32  real rank; 0 marks a slice the slot's adapter does not target
    scaling  [S, L] fp32   alpha / r (or alpha / sqrt(r) for rsLoRA)
    a_start  [S, L] int32
    b_start  [S, L] int32
    (rank, scaling, a_start and b_start are column views of [S, C] pool tensors: stride(1) == 1)

    K and every N_l are multiples of W. `max_rank` R is the rank bound per slice: h, the
    shrink's output, is [T, L * R] fp32, slice l in columns l*R .. l*R + rank.
    """

    pages: torch.Tensor
    table: torch.Tensor
    rank: torch.Tensor
    scaling: torch.Tensor
    a_start: torch.Tensor
    b_start: torch.Tensor
    slices: tuple[int, ...]
    slice_starts: torch.Tensor  # [L + 1] int32, on the device, for the kernels
    in_features: int
    max_rank: int

    @property
    def num_slots(self) -> int:
        return self.rank.shape[0]

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def out_features(self) -> int:
        return sum(self.slices)

    @property
    def page_width(self) -> int:
        return self.pages.shape[1]

    @property
    def h_width(self) -> int:
        return self.num_slices * self.max_rank

    @property
    def dtype(self) -> torch.dtype:
        return self.pages.dtype

    @property
    def device(self) -> torch.device:
        return self.pages.device

    def __post_init__(self):
        self.check()  # once: the layout is fixed for the view's life, so no launch repeats it

    def check(self) -> None:
        """Raise ValueError unless the layout is one the kernels can read (shapes and dtypes
        only: no data is looked at, so it costs no device sync)."""
        s, l, w = self.num_slots, self.num_slices, self.page_width
        if self.pages.dim() != 2 or self.table.dim() != 1 or self.table.dtype != torch.int32:
            raise ValueError(f"paged LoRA: pages must be [P, W] and table [E] int32, got pages "
                             f"{list(self.pages.shape)}, table {list(self.table.shape)} {self.table.dtype}")
        for name, dtype in (("rank", torch.int32), ("scaling", torch.float32),
                            ("a_start", torch.int32), ("b_start", torch.int32)):
            t = getattr(self, name)
            if t.shape != (s, l) or t.dtype != dtype or (l > 1 and t.stride(1) != 1):
                raise ValueError(f"paged LoRA: {name} must be [{s}, {l}] {dtype} with unit column stride, "
                                 f"got {list(t.shape)} {t.dtype} strides {t.stride()}")
        if self.slice_starts.shape != (l + 1,):
            raise ValueError(f"paged LoRA: slice_starts must have {l + 1} entries, "
                             f"got {list(self.slice_starts.shape)}")
        # K-chunks and N-tiles are powers of two dividing W, and tl.dot needs 16 at least
        if w % 16 or self.in_features % w or any(n % w for n in self.slices):
            raise ValueError(f"paged LoRA: the page width {w} must be a multiple of 16 dividing K = "
                             f"{self.in_features} and every slice width {list(self.slices)}")
        r = self.max_rank
        if r < 16 or r & (r - 1):
            raise ValueError(f"paged LoRA: max_rank must be a power of two >= 16, got {r}")
        others = {t.device for t in (self.table, self.rank, self.scaling, self.a_start, self.b_start,
                                     self.slice_starts)}
        if others != {self.device}:
            raise ValueError(f"paged LoRA: pages on {self.device}, its records on {sorted(map(str, others))}")


# ----------------------------------------------------------------------------------------
# References (CPU path and test oracle)
# ----------------------------------------------------------------------------------------


def _rows(stack: PagedLoRA, start: int, rows: int, width: int) -> torch.Tensor:
    # `rows` rank-rows of length `width`, their pages listed row by row from table[start]
    ids = stack.table[start: start + rows * (width // stack.page_width)]
    return stack.pages.index_select(0, ids).view(rows, width)


def _records(stack: PagedLoRA) -> list[list[tuple[int, int, int, float]]]:
    # (rank, a_start, b_start, scaling) per slot and slice: one host copy per call, not per slice
    return [list(zip(*per_slot)) for per_slot in zip(
        stack.rank.tolist(), stack.a_start.tolist(), stack.b_start.tolist(), stack.scaling.tolist())]


def slice_weights(stack: PagedLoRA, slot: int, l: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A [r, K] and B [N_l, r] of one slot's slice l, gathered through the table (None where
    the slot's adapter does not target slice l)."""
    r = int(stack.rank[slot, l])
    if not r:
        return None
    return (_rows(stack, int(stack.a_start[slot, l]), r, stack.in_features),
            _rows(stack, int(stack.b_start[slot, l]), r, stack.slices[l]).T)


def paged_delta_ref(x: torch.Tensor, stack: PagedLoRA, slot_ids: torch.Tensor) -> torch.Tensor:
    """fp32 [T, N] delta straight from the definition, one token at a time (the oracle)."""
    starts = list(accumulate(stack.slices, initial=0))
    weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}
    delta = torch.zeros(x.shape[0], stack.out_features, dtype=torch.float32, device=x.device)
    for t, s in enumerate(slot_ids.tolist()):
        if s < 0:
            continue
        for l in range(stack.num_slices):
            if (s, l) not in weights:
                weights[s, l] = slice_weights(stack, s, l)
            if weights[s, l] is not None:
                a, b = (w.float() for w in weights[s, l])
                delta[t, starts[l]: starts[l + 1]] = stack.scaling[s, l] * (x[t].float() @ a.T) @ b.T
    return delta


def _segments(meta: BatchMeta):
    # (slot, first sorted row, tokens) of every slot with tokens this step
    for s, (start, length) in enumerate(zip(meta.seg_start.tolist(), meta.seg_len.tolist())):
        if length:
            yield s, start, meta.order[start: start + length].long()


def paged_shrink_ref(x: torch.Tensor, stack: PagedLoRA, meta: BatchMeta) -> torch.Tensor:
    """h [T, L * R] fp32 in slot-sorted order (row i is token order[i]); zero outside real ranks."""
    r_max, k = stack.max_rank, stack.in_features
    records = _records(stack)
    h = torch.zeros(meta.num_tokens, stack.h_width, dtype=torch.float32, device=x.device)
    for s, start, tokens in _segments(meta):
        xs = x[tokens].float()
        for l, (r, a0, _, _) in enumerate(records[s]):
            if r:
                a = _rows(stack, a0, r, k).float()
                h[start: start + len(tokens), l * r_max: l * r_max + r] = xs @ a.T
    return h


def paged_expand_ref(h: torch.Tensor, stack: PagedLoRA, meta: BatchMeta, y: torch.Tensor) -> torch.Tensor:
    """y[token, slice l] += scaling * h[:, slice l] @ B.T, in place; returns y."""
    r_max = stack.max_rank
    records = _records(stack)
    for s, start, tokens in _segments(meta):
        hs = h[start: start + len(tokens)]
        deltas = []  # one row block per slice, so each slot's delta is added in one op
        for l, (r, _, b0, scale) in enumerate(records[s]):
            if r:
                b = _rows(stack, b0, r, stack.slices[l]).float()  # [r, N_l]: B.T
                deltas.append(scale * hs[:, l * r_max: l * r_max + r] @ b)
            else:
                deltas.append(hs.new_zeros(len(tokens), stack.slices[l]))
        y.index_add_(0, tokens, torch.cat(deltas, dim=1).to(y.dtype))
    return y


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if triton is not None:
    from .lora import _tile_rows
    from .splitk import k_range, write_tile

    @triton.jit
    def _page_tile(pages_ptr, table_ptr, first, rr, r_mask, row_pages, offset,
                   PAGE_W: tl.constexpr, BLOCK: tl.constexpr):
        # [BLOCK_R, BLOCK] elements offset .. offset + BLOCK of rank-rows rr (whose first page
        # is table[first + rr * row_pages]): one page per row, since BLOCK divides PAGE_W and
        # offset is a multiple of BLOCK. Rows past the real rank have no pages: never loaded.
        page = tl.load(table_ptr + first + rr * row_pages + offset // PAGE_W, mask=r_mask, other=0)
        cols = tl.max_contiguous(tl.multiple_of(offset % PAGE_W + tl.arange(0, BLOCK), BLOCK), BLOCK)
        ptrs = pages_ptr + page.to(tl.int64)[:, None] * PAGE_W + cols[None, :]
        return tl.load(ptrs, mask=r_mask[:, None], other=0.0, eviction_policy="evict_first")

    @triton.jit(do_not_specialize=["T"])  # T changes from step to step: one compiled kernel for all
    def _paged_shrink_kernel(
        x_ptr, pages_ptr, table_ptr, h_ptr, rank_ptr, a_start_ptr, order_ptr, tile_slot_ptr,
        tile_row_ptr, seg_start_ptr, seg_len_ptr, ws_ptr, ticket_ptr, T, K, LR, R,
        stride_rank, stride_a_start,
        PAGE_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
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
            rr = r0 - sl * R + tl.arange(0, BLOCK_R)  # rank-rows of slice sl
            r_mask = rr < real
            a_first = tl.load(a_start_ptr + s_safe * stride_a_start + sl)
            x_rows = x_ptr + tokens.to(tl.int64)[:, None] * K
            k_lo, k_hi = k_range(pid_k, K, BLOCK_K, SPLIT_K)
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):  # BLOCK_K divides K: no K mask
                kc = tl.multiple_of(k0, BLOCK_K)
                x = tl.load(x_rows + (kc + tl.arange(0, BLOCK_K))[None, :], mask=row_mask[:, None], other=0.0)
                a = _page_tile(pages_ptr, table_ptr, a_first, rr, r_mask, K // PAGE_W, kc, PAGE_W, BLOCK_K)
                if DOT_FP32:  # interpreter or fp32 weights: products in fp32 (see _dot_fp32)
                    acc = tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(a), acc)
            # the whole rank tile is written (zeros past the real rank): the expand reads it unmasked
            out_rows = tl.where(row_mask, rows, T)  # rows of the next segment are not ours
            write_tile(acc, out_rows, r0 + tl.arange(0, BLOCK_R), T, LR, h_ptr, h_ptr, ws_ptr, ticket_ptr,
                       pid_t * tl.num_programs(1) + pid_r, False, SPLIT_K)

    @triton.jit
    def _paged_expand_kernel(
        h_ptr, pages_ptr, table_ptr, y_ptr, scaling_ptr, rank_ptr, b_start_ptr, slice_starts_ptr,
        order_ptr, tile_slot_ptr, tile_row_ptr, seg_start_ptr, seg_len_ptr, LR, R,
        stride_scaling, stride_rank, stride_b_start, stride_y,
        PAGE_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        # grid = (max_tiles, widest slice / BLOCK_N, L):
        # y[tokens, cols of slice l] += scaling[s, l] * h[rows, l*R : l*R + rank] @ B[s, l][cols, :rank].T
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        sl = tl.program_id(2)
        s, s_safe, rows, row_mask, tokens = _tile_rows(tile_slot_ptr, tile_row_ptr, seg_start_ptr,
                                                       seg_len_ptr, order_ptr, pid_t, BLOCK_M)
        real = tl.load(rank_ptr + s_safe * stride_rank + sl)
        n_first = tl.load(slice_starts_ptr + sl)
        width = tl.load(slice_starts_ptr + sl + 1) - n_first
        n0 = pid_n * BLOCK_N  # within the slice; BLOCK_N divides its width: whole tiles only
        if (s >= 0) & (real > 0) & (n0 < width):
            b_first = tl.load(b_start_ptr + s_safe * stride_b_start + sl)
            h_rows = h_ptr + rows.to(tl.int64)[:, None] * LR + sl * R
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for r0 in range(0, real, BLOCK_R):
                rr = tl.multiple_of(r0, BLOCK_R) + tl.arange(0, BLOCK_R)
                # h unmasked along the rank (16-byte vector loads): the shrink wrote zeros past
                # the real rank of this tile, and B's missing rows load as zeros anyway
                h = tl.load(h_rows + rr[None, :], mask=row_mask[:, None], other=0.0)
                b_t = _page_tile(pages_ptr, table_ptr, b_first, rr, rr < real, width // PAGE_W, n0,
                                 PAGE_W, BLOCK_N)
                if DOT_FP32:
                    acc = tl.dot(h, b_t.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(h.to(b_t.dtype), b_t, acc)
            scale = tl.load(scaling_ptr + s_safe * stride_scaling + sl)
            # slices start at multiples of W (every N_l is one), so BLOCK_N-aligned: vector y access
            cols = tl.max_contiguous(tl.multiple_of(n_first + n0 + tl.arange(0, BLOCK_N), BLOCK_N), BLOCK_N)
            y_ptrs = y_ptr + tokens.to(tl.int64)[:, None] * stride_y + cols[None, :]
            y = tl.load(y_ptrs, mask=row_mask[:, None], other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=row_mask[:, None])


# ----------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------


def _page_block(page_width: int, cap: int) -> int:
    """The largest power of two that divides the page width and is at most `cap`: a chunk of
    that many elements never crosses a page (and, as W divides K and N_l, never their end)."""
    return min(page_width & -page_width, 1 << (cap.bit_length() - 1))


def _dot_fp32(stack: PagedLoRA) -> bool:
    # The interpreter's bf16 arithmetic is wrong, and fp32 weights want fp32 products, not tf32.
    return INTERPRET or stack.dtype == torch.float32


def _rank_tile(stack: PagedLoRA) -> int:
    # One rank tile for both kernels: the shrink writes whole tiles, the expand reads them.
    return min(stack.max_rank, 64)


def paged_shrink_launch(stack: PagedLoRA, num_tokens: int, device: torch.device,
                        config: LoRAConfig = LoRAConfig(), block_t: int | None = None) -> ShrinkLaunch:
    """The launch of `paged_shrink` for `num_tokens` tokens (from shapes only: the grid is the
    meta's static tile bound times every rank tile, never the data)."""
    t, k, lr = num_tokens, stack.in_features, stack.h_width
    block_t = block_t or default_block_t(t)
    block_r = _rank_tile(stack)
    block_k = _page_block(stack.page_width, config.shrink_block_k or (256 if device.type == "cuda" else 64))
    tiles, r_tiles = max_tiles(t, stack.num_slots, block_t), lr // block_r
    # The split is sized for the tiles that work: one rank tile per slice (every rank up to
    # BLOCK_R), not all L * R / BLOCK_R of the rank bound, whose tiles past the real rank exit
    # at once. So a rank-16 batch splits as the slot kernels do, whatever the bound.
    split = config.shrink_split_k or split_for(tiles * stack.num_slices, k // block_k, runtime.num_sms(device))
    return ShrinkLaunch(block_t, block_r, block_k, split, (tiles, r_tiles, split),
                        splitk_needs(split, t * lr, tiles * r_tiles))


def _check(x_or_h: torch.Tensor, stack: PagedLoRA, meta: BatchMeta, width: int, what: str) -> None:
    if x_or_h.dim() != 2 or x_or_h.shape != (meta.num_tokens, width):
        raise ValueError(f"{what}: expected [{meta.num_tokens}, {width}], got {list(x_or_h.shape)}")
    if meta.num_slots != stack.num_slots:
        raise ValueError(f"{what}: meta was built for {meta.num_slots} slots, "
                         f"the stack has {stack.num_slots}")
    if x_or_h.device != stack.device or meta.slot_ids.device != stack.device:
        raise ValueError(f"{what}: tensors on {x_or_h.device}, meta on {meta.slot_ids.device}, "
                         f"adapter pages on {stack.device}")


def paged_shrink(x: torch.Tensor, stack: PagedLoRA, meta: BatchMeta,
                 config: LoRAConfig = LoRAConfig(), workspace: Workspace | None = None) -> torch.Tensor:
    """h[i] = x[order[i]] @ A[slot].T for every token with a slot: fp32 [T, L * R], rows in
    slot-sorted order (`meta.order`); rows of base-model tokens and rank tiles past a slot's
    real rank are left unset (a tile holding real ranks is zero past them). `workspace`
    holds the split-K scratch (an engine passes its frozen one; default: a growable one)."""
    _check(x, stack, meta, stack.in_features, "paged_shrink")
    if not runtime.use_triton(x.device):
        return paged_shrink_ref(x, stack, meta)
    if x.dtype != stack.dtype:
        raise ValueError(f"paged_shrink: x is {x.dtype}, adapter pages are {stack.dtype}")
    t, k, lr = meta.num_tokens, stack.in_features, stack.h_width
    h = torch.empty(t, lr, dtype=torch.float32, device=x.device)
    if t == 0:
        return h
    x = x.contiguous()
    plan = paged_shrink_launch(stack, t, x.device, config, meta.block_t)
    # without a split the kernel never touches the workspace: h stands in for it
    partials, tickets = (workspace or standalone(x.device)).take(plan.needs) or (h, h)
    runtime.launch(
        _paged_shrink_kernel, plan.grid,
        x, stack.pages, stack.table, h, stack.rank, stack.a_start, meta.order, meta.tile_slot, meta.tile_row,
        meta.seg_start, meta.seg_len, partials, tickets, t, k, lr, stack.max_rank,
        stack.rank.stride(0), stack.a_start.stride(0),
        PAGE_W=stack.page_width, BLOCK_M=meta.block_t, BLOCK_R=plan.block_r, BLOCK_K=plan.block_k,
        SPLIT_K=plan.split, DOT_FP32=_dot_fp32(stack), num_warps=config.num_warps,
    )
    return h


def paged_expand(h: torch.Tensor, stack: PagedLoRA, meta: BatchMeta, y: torch.Tensor,
                 config: LoRAConfig = LoRAConfig()) -> torch.Tensor:
    """y[token, slice l] += scaling[s, l] * h[:, slice l] @ B[s, slice l].T in place, for every
    token with a slot and every slice its adapter targets; returns y. `h` is what
    `paged_shrink` returned for the same stack and meta (finite, zero past each real rank
    inside the rank tiles that hold real ranks)."""
    _check(h, stack, meta, stack.h_width, "paged_expand")
    if y.shape != (meta.num_tokens, stack.out_features) or y.stride(-1) != 1 or y.device != stack.device:
        raise ValueError(f"paged_expand: y must be [{meta.num_tokens}, {stack.out_features}] with unit "
                         f"column stride on {stack.device}, got {list(y.shape)} strides {y.stride()} "
                         f"on {y.device}")
    if not runtime.use_triton(y.device):
        return paged_expand_ref(h, stack, meta, y)
    if h.dtype != torch.float32 or h.stride() != (stack.h_width, 1):
        raise ValueError(f"paged_expand: h must be contiguous fp32 (the shrink's output), got {h.dtype} "
                         f"strides {h.stride()}")
    if meta.num_tokens == 0:
        return y
    widest = max(stack.slices)
    block_n = _page_block(stack.page_width, config.expand_block_n)
    runtime.launch(
        _paged_expand_kernel, (meta.max_tiles, widest // block_n, stack.num_slices),
        h, stack.pages, stack.table, y, stack.scaling, stack.rank, stack.b_start, stack.slice_starts,
        meta.order, meta.tile_slot, meta.tile_row, meta.seg_start, meta.seg_len, stack.h_width,
        stack.max_rank,
        stack.scaling.stride(0), stack.rank.stride(0), stack.b_start.stride(0), y.stride(0),
        PAGE_W=stack.page_width, BLOCK_M=meta.block_t, BLOCK_N=block_n, BLOCK_R=_rank_tile(stack),
        DOT_FP32=_dot_fp32(stack), num_warps=config.num_warps,
    )
    return y


def apply_paged_lora(x: torch.Tensor, y: torch.Tensor, stack: PagedLoRA, meta: BatchMeta,
                     config: LoRAConfig = LoRAConfig(), workspace: Workspace | None = None) -> torch.Tensor:
    """y += every token's own LoRA delta (shrink then expand), weights read through the pages; returns y."""
    return paged_expand(paged_shrink(x, stack, meta, config, workspace), stack, meta, y, config)
