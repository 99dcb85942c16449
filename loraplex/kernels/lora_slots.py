"""GPU adapter slots as one arena: everything slot s holds, in every projection, is row s.

    weights  [S, W]  activation dtype; per projection, A [L * R, K] then B [N, R], row-major
    scaling  [S, C]  fp32, C = slices summed over projections
    rank     [S, C]  int32 (0: the slot's adapter does not target that slice)

Each projection's `LoRAStack` (what the kernels read) is a view into these three tensors,
with slot stride W or C. Writing an adapter into a slot is then three copies, one of them
the big one, instead of thousands of small ones; and a host copy kept in the same layout
(`SlotRow`, pinned memory) pages into a GPU slot with a single asynchronous DMA on a side
stream while steps keep running (a slot being written has no tokens in any step).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Mapping, Sequence

import torch

from .lora import LoRAStack, padded_rank


@dataclass(frozen=True)
class Projection:
    """One fused projection of the model: its slices' module keys, input width, output widths."""

    keys: tuple[str, ...]  # e.g. ("layers.0.self_attn.q_proj", ..k_proj, ..v_proj)
    in_features: int
    slices: tuple[int, ...]


@dataclass(eq=False)
class SlotRow:
    """One slot's worth of adapter data in the pool's layout, on the host."""

    weights: torch.Tensor  # [W]
    scaling: torch.Tensor  # [C] fp32
    rank: torch.Tensor     # [C] int32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weights, self.scaling, self.rank))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weights, self.scaling, self.rank


class LoRASlotPool:
    def __init__(self, projections: Sequence[Projection], slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str):
        if slots < 1:
            raise ValueError(f"need at least one adapter slot, got {slots}")
        self.projections = list(projections)
        self.num_slots, self.max_rank = slots, max_rank
        self.rank_capacity = r = padded_rank(max_rank)
        self.dtype, self.device = dtype, torch.device(device)
        # element offsets of each projection's A and B in a row, and of its first slice's column
        self._offsets: list[tuple[int, int, int]] = []
        w = c = 0
        for p in self.projections:
            a_size = len(p.slices) * r * p.in_features
            self._offsets.append((w, w + a_size, c))
            w += a_size + sum(p.slices) * r
            c += len(p.slices)
        self.row_width, self.row_columns = w, c
        self.weights = torch.zeros(slots, w, dtype=dtype, device=self.device)
        self.scaling = torch.zeros(slots, c, dtype=torch.float32, device=self.device)
        self.rank = torch.zeros(slots, c, dtype=torch.int32, device=self.device)
        self.stacks = self._views(self.weights, self.scaling, self.rank)
        self._where = {key: (i, l) for i, p in enumerate(self.projections) for l, key in enumerate(p.keys)}

    def _views(self, weights: torch.Tensor, scaling: torch.Tensor, rank: torch.Tensor) -> list[LoRAStack]:
        """A LoRAStack per projection viewing [S, ...] pool tensors (or one row, S = 1)."""
        s, r = weights.shape[0], self.rank_capacity
        stacks = []
        for p, (a_off, b_off, col) in zip(self.projections, self._offsets):
            lr, n = len(p.slices) * r, sum(p.slices)
            stacks.append(LoRAStack(
                a=weights[:, a_off: b_off].view(s, lr, p.in_features),
                b=weights[:, b_off: b_off + n * r].view(s, n, r),
                scaling=scaling[:, col: col + len(p.slices)],
                rank=rank[:, col: col + len(p.slices)],
                slices=p.slices,
                slice_starts=torch.tensor([0, *accumulate(p.slices)], dtype=torch.int32, device=weights.device),
            ))
        return stacks

    @property
    def row_bytes(self) -> int:
        return self.row_width * self.weights.element_size() + self.row_columns * 8

    def keys(self) -> set[str]:
        return set(self._where)

    # -- host rows ------------------------------------------------------------------------

    def new_row(self, pin: bool | None = None) -> SlotRow:
        """An empty host row; pinned (page-locked, for asynchronous copies) when the pool is on CUDA."""
        pin = self.device.type == "cuda" if pin is None else pin
        return SlotRow(torch.zeros(self.row_width, dtype=self.dtype, pin_memory=pin),
                       torch.zeros(self.row_columns, dtype=torch.float32, pin_memory=pin),
                       torch.zeros(self.row_columns, dtype=torch.int32, pin_memory=pin))

    def pack(self, row: SlotRow, modules: Mapping[str, Any]) -> None:
        """Write one adapter into `row`. `modules` maps module keys (see `Projection.keys`) to
        objects with `.a` [r, in], `.b` [out, r] and `.scaling`; keys missing are not targeted."""
        unknown = set(modules) - self._where.keys()
        if unknown:
            raise ValueError(f"adapter modules not in the model: {sorted(unknown)[:5]}")
        too_big = {key: m.a.shape[0] for key, m in modules.items() if m.a.shape[0] > self.max_rank}
        if too_big:
            key = min(too_big)
            raise ValueError(f"module {key}: rank {too_big[key]} is over the slots' maximum rank {self.max_rank}")
        stacks = self._views(row.weights[None], row.scaling[None], row.rank[None])
        for p, stack in zip(self.projections, stacks):
            entries = [modules.get(key) for key in p.keys]
            stack.set_slot(0, [None if e is None else (e.a, e.b, float(e.scaling)) for e in entries])

    # -- GPU slots ------------------------------------------------------------------------

    def load(self, slot: int, row: SlotRow, non_blocking: bool = False) -> None:
        """Copy `row` into `slot` (on the current stream; asynchronous from pinned memory
        with `non_blocking`: the caller keeps `row` alive and unchanged until it completes)."""
        self._check_slot(slot)
        for dst, src in zip((self.weights, self.scaling, self.rank), row.tensors()):
            dst[slot].copy_(src, non_blocking=non_blocking)

    def write(self, slot: int, modules: Mapping[str, Any]) -> None:
        """Put one adapter into `slot` now (synchronously)."""
        self._check_slot(slot)
        row = self.new_row(pin=False)
        self.pack(row, modules)
        self.load(slot, row)

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for t in (self.weights, self.scaling, self.rank):
            t[slot].zero_()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"adapter slot {slot} outside 0..{self.num_slots - 1}")
