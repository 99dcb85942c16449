"""Paged adapter memory: one GPU pool of fixed-size pages for every adapter's LoRA weights.

    pages    [P, W]     activation dtype; a page holds W elements of one rank-row
    table    [P] int32  page ids; each resident slot owns one contiguous run of entries
    info     [S, 3, C]  int32 per slot and slice column: rank, table index of A's first
                        page, table index of B's first page (C: slices of all projections)
    scaling  [S, C]     fp32

An adapter takes pages for its real ranks on the slices it targets, nothing else: a rank-r
slice of a projection with input K and output N_l is r * (K + N_l) / W pages. W divides
every K and N_l of the model (their greatest common divisor, capped at 1024), so no page is
partly empty. Pages need not be contiguous (the page table maps them), so the page pool
cannot fragment: an adapter that fits in the free pages can always be placed. Only the
table's runs can fragment; `compact_table` packs them again (a small device copy).

A slot is only the record above, so slots are cheap: residency is bounded by bytes.

The host tier keeps each adapter as a `PackedAdapter`: its pages in page-table order in one
(pinned, on CUDA) tensor, so a page-in is one copy per run of free GPU pages the allocator
hands out (best fit first, then the largest runs: usually one or a few), plus two small
copies for its table entries and slot record.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Mapping, Sequence

import torch

from .lora_paged import PagedLoRA

MAX_PAGE_WIDTH = 1024
MAX_RANK_BOUND = 1024


@dataclass(frozen=True)
class Projection:
    """One fused projection of the model: its slices' module keys, input width, output widths."""

    keys: tuple[str, ...]  # e.g. ("layers.0.self_attn.q_proj", ..k_proj, ..v_proj)
    in_features: int
    slices: tuple[int, ...]


def rank_bound(max_rank: int) -> int:
    """Per-slice rank capacity of the kernels' scratch: a power of two >= 16 (whole rank tiles)."""
    if not 1 <= max_rank <= MAX_RANK_BOUND:
        raise ValueError(f"max rank must be between 1 and {MAX_RANK_BOUND}, got {max_rank}")
    return max(16, 1 << (max_rank - 1).bit_length())


def page_width_for(projections: Sequence[Projection]) -> int:
    """The widest page that divides every row of A (K) and every column of B (N_l)."""
    widths = {p.in_features for p in projections} | {n for p in projections for n in p.slices}
    w = math.gcd(*widths)
    while w > MAX_PAGE_WIDTH and w % 2 == 0:
        w //= 2
    if w % 16:
        raise ValueError(f"paged adapter memory needs layer widths that are multiples of 16, got {sorted(widths)}")
    return w


def full_adapter_pages(projections: Sequence[Projection], rank: int) -> int:
    """Pages of a rank-`rank` adapter on every slice of every projection."""
    w = page_width_for(projections)
    return sum(rank * (len(p.slices) * p.in_features + sum(p.slices)) // w for p in projections)


class PageRuns:
    """Free indices 0..n-1 as sorted, merged runs (start, length)."""

    def __init__(self, n: int):
        self.capacity = n
        self._starts: list[int] = [0] if n else []
        self._lengths: list[int] = [n] if n else []
        self.free = n

    def runs(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._lengths))

    def largest(self) -> int:
        return max(self._lengths, default=0)

    def take(self, n: int) -> list[tuple[int, int]] | None:
        """n indices as few runs as the free space allows (best fit, else largest first)."""
        if n > self.free:
            return None
        if n == 0:
            return []
        one = self.take_contiguous(n)
        if one is not None:
            return [(one, n)]
        taken, need = [], n
        for i in sorted(range(len(self._starts)), key=lambda i: -self._lengths[i]):
            start, length = self._starts[i], self._lengths[i]
            used = min(length, need)
            taken.append((start, used))
            need -= used
            if not need:
                break
        for start, used in taken:
            self._cut(start, used)
        return sorted(taken)

    def take_contiguous(self, n: int) -> int | None:
        """The start of n contiguous indices (the smallest run that holds them), or None."""
        best = None
        for i, length in enumerate(self._lengths):
            if length >= n and (best is None or length < self._lengths[best]):
                best = i
        if best is None:
            return None
        start = self._starts[best]
        self._cut(start, n)
        return start

    def give(self, runs: Sequence[tuple[int, int]]) -> None:
        for start, length in runs:
            if length:
                self._insert(start, length)

    def _cut(self, start: int, used: int) -> None:
        i = bisect.bisect_right(self._starts, start) - 1
        if self._starts[i] != start or self._lengths[i] < used:
            raise RuntimeError(f"indices {start}..{start + used - 1} are not a free run's head")
        if self._lengths[i] == used:
            del self._starts[i], self._lengths[i]
        else:
            self._starts[i] += used
            self._lengths[i] -= used
        self.free -= used

    def _insert(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        end = start + length
        if (i > 0 and self._starts[i - 1] + self._lengths[i - 1] > start) or \
                (i < len(self._starts) and self._starts[i] < end) or end > self.capacity:
            raise RuntimeError(f"indices {start}..{end - 1} are already free or out of range")
        self.free += length
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:  # merge with the run before
            i -= 1
            self._lengths[i] += length
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, length)
        if i + 1 < len(self._starts) and self._starts[i] + self._lengths[i] == self._starts[i + 1]:
            self._lengths[i] += self._lengths[i + 1]
            del self._starts[i + 1], self._lengths[i + 1]


@dataclass(eq=False)
class PackedAdapter:
    """One adapter in the pool's page format, on the host (pinned on CUDA)."""

    pages: torch.Tensor     # [n, W]: its pages in page-table order
    rank: torch.Tensor      # [C] int32 (0: slice not targeted)
    scaling: torch.Tensor   # [C] fp32
    a_offset: torch.Tensor  # [C] int32: index among its pages of each slice's first A page
    b_offset: torch.Tensor  # [C] int32: and of its first B page

    @property
    def num_pages(self) -> int:
        return self.pages.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.pages, self.rank, self.scaling, self.a_offset, self.b_offset))


@dataclass(eq=False)
class Placement:
    """Where a resident slot's adapter lives in the pool."""

    page_runs: list[tuple[int, int]]
    table_start: int
    num_pages: int
    packed: PackedAdapter                 # offsets and ranks, for compaction; its pages may be copying
    staging: tuple = field(default=())    # host tensors the asynchronous copies still read


class LoRAPagePool:
    """The GPU pool, its page table and slot records; `stacks` are the kernels' views."""

    def __init__(self, projections: Sequence[Projection], slots: int, max_rank: int, num_pages: int,
                 dtype: torch.dtype, device: torch.device | str):
        if slots < 1:
            raise ValueError(f"need at least one adapter slot, got {slots}")
        if num_pages < 1:
            raise ValueError(f"need at least one adapter page, got {num_pages}")
        self.projections = list(projections)
        self.num_slots, self.max_rank, self.num_pages = slots, max_rank, num_pages
        self.rank_capacity = rank_bound(max_rank)
        self.page_width = w = page_width_for(self.projections)
        self.dtype, self.device = dtype, torch.device(device)
        self._cols: list[int] = list(accumulate((len(p.slices) for p in self.projections), initial=0))
        self.num_columns = c = self._cols[-1]
        self._where = {key: (i, l) for i, p in enumerate(self.projections) for l, key in enumerate(p.keys)}
        self.pages = torch.zeros(num_pages, w, dtype=dtype, device=self.device)
        self.table = torch.zeros(num_pages, dtype=torch.int32, device=self.device)
        self.info = torch.zeros(slots, 3, c, dtype=torch.int32, device=self.device)
        self.scaling = torch.zeros(slots, c, dtype=torch.float32, device=self.device)
        self._table_host = torch.zeros(num_pages, dtype=torch.int32)  # mirror, for compaction
        self._free_pages = PageRuns(num_pages)
        self._free_table = PageRuns(num_pages)  # live entries = pages in use: the table never runs out
        self.placed: dict[int, Placement] = {}
        self.stacks = [self._view(i) for i in range(len(self.projections))]

    def _view(self, i: int) -> PagedLoRA:
        p, lo, hi = self.projections[i], self._cols[i], self._cols[i + 1]
        return PagedLoRA(
            pages=self.pages, table=self.table, rank=self.info[:, 0, lo:hi], scaling=self.scaling[:, lo:hi],
            a_start=self.info[:, 1, lo:hi], b_start=self.info[:, 2, lo:hi], slices=p.slices,
            slice_starts=torch.tensor([0, *accumulate(p.slices)], dtype=torch.int32, device=self.device),
            in_features=p.in_features, max_rank=self.rank_capacity)

    # -- sizes ----------------------------------------------------------------------------

    @property
    def page_bytes(self) -> int:
        return self.page_width * self.pages.element_size()

    @property
    def record_bytes(self) -> int:
        """Host bytes of a packed adapter besides its pages (rank, scaling, two offsets per column)."""
        return 16 * self.num_columns

    @property
    def pages_used(self) -> int:
        return self.num_pages - self._free_pages.free

    @property
    def pages_free(self) -> int:
        return self._free_pages.free

    def pages_for(self, ranks: Mapping[str, int]) -> int:
        """Pages an adapter with these module ranks takes (keys as in `Projection.keys`)."""
        total = 0
        for key, r in ranks.items():
            i, l = self._where[key]
            p = self.projections[i]
            total += r * (p.in_features + p.slices[l]) // self.page_width
        return total

    def keys(self) -> set[str]:
        return set(self._where)

    # -- host format ----------------------------------------------------------------------

    def pack(self, modules: Mapping[str, Any], pin: bool | None = None) -> PackedAdapter:
        """One adapter in page format. `modules` maps module keys (see `Projection.keys`) to
        objects with `.a` [r, in], `.b` [out, r] and `.scaling`; keys missing are not targeted."""
        unknown = set(modules) - self._where.keys()
        if unknown:
            raise ValueError(f"adapter modules not in the model: {sorted(unknown)[:5]}")
        c, w = self.num_columns, self.page_width
        rank, scaling = torch.zeros(c, dtype=torch.int32), torch.zeros(c, dtype=torch.float32)
        a_offset, b_offset = torch.zeros(c, dtype=torch.int32), torch.zeros(c, dtype=torch.int32)
        parts, n = [], 0
        for i, p in enumerate(self.projections):  # page-table order: projection, slice, A then B
            for l, key in enumerate(p.keys):
                m = modules.get(key)
                if m is None:
                    continue
                r = m.a.shape[0]
                if m.a.shape != (r, p.in_features) or m.b.shape != (p.slices[l], r):
                    raise ValueError(f"module {key}: expected A [r, {p.in_features}] and B [{p.slices[l]}, r], "
                                     f"got A {list(m.a.shape)} and B {list(m.b.shape)}")
                if not 1 <= r <= self.max_rank:
                    raise ValueError(f"module {key}: rank {r} is outside 1..{self.max_rank}")
                col = self._cols[i] + l
                rank[col], scaling[col] = r, float(m.scaling)
                a_offset[col] = n
                parts.append(m.a.reshape(-1, w))
                n += r * p.in_features // w
                b_offset[col] = n
                parts.append(m.b.t().reshape(-1, w))  # column r of B is rank-row r
                n += r * p.slices[l] // w
        pin = self.device.type == "cuda" if pin is None else pin
        pages = torch.empty(n, w, dtype=self.dtype, pin_memory=pin)
        if parts:
            torch.cat([t.to(self.dtype) for t in parts], out=pages)
        return PackedAdapter(pages, rank, scaling, a_offset, b_offset)

    # -- slots ----------------------------------------------------------------------------

    def fits(self, num_pages: int) -> bool:
        return num_pages <= self._free_pages.free

    def table_fits(self, num_pages: int) -> bool:
        """Whether its table entries fit without `compact_table` (given the pages fit)."""
        return num_pages == 0 or self._free_table.largest() >= num_pages

    def load(self, slot: int, packed: PackedAdapter, non_blocking: bool = False) -> Placement:
        """Give `slot` to `packed`: take pages and a table run, and copy the pages, the table
        entries and the slot record in (on the current stream; from pinned memory with
        `non_blocking` the copies are asynchronous, and the caller must not use the slot
        before they end). Raises if the pages do not fit or the table needs compacting."""
        self._check_slot(slot)
        if slot in self.placed:
            raise RuntimeError(f"adapter slot {slot} is already held")
        n = packed.num_pages
        if not self.fits(n):
            raise RuntimeError(f"{n} adapter pages do not fit in the {self.pages_free} free")
        table_start = self._free_table.take_contiguous(n) if n else 0
        if table_start is None:
            raise RuntimeError(f"the page table has no run of {n} entries: compact it first")
        runs = self._free_pages.take(n)
        ids = torch.cat([torch.arange(s, s + length, dtype=torch.int32) for s, length in runs]) if runs \
            else torch.zeros(0, dtype=torch.int32)
        self._table_host[table_start: table_start + n] = ids
        record, scaling = self._record(packed, table_start), packed.scaling
        pin = non_blocking and self.device.type == "cuda"
        if pin:  # the small copies come from pinned memory too, or they would not be asynchronous
            ids, record, scaling = ids.pin_memory(), record.pin_memory(), scaling.pin_memory()
        offset = 0
        for start, length in runs:
            self.pages[start: start + length].copy_(packed.pages[offset: offset + length], non_blocking=non_blocking)
            offset += length
        if n:
            self.table[table_start: table_start + n].copy_(ids, non_blocking=non_blocking)
        self.info[slot].copy_(record, non_blocking=non_blocking)
        self.scaling[slot].copy_(scaling, non_blocking=non_blocking)
        placement = Placement(runs, table_start, n, packed, (ids, record, scaling) if pin else ())
        self.placed[slot] = placement
        return placement

    def release(self, slot: int) -> None:
        """Give back what `slot` holds (bookkeeping only: a slot is never read once no step
        uses it, and the next load rewrites its record)."""
        placement = self.placed.pop(slot)
        self._free_pages.give(placement.page_runs)
        if placement.num_pages:
            self._free_table.give([(placement.table_start, placement.num_pages)])

    def write(self, slot: int, modules: Mapping[str, Any]) -> None:
        """Put one adapter into `slot` now (synchronously), replacing what it held."""
        if slot in self.placed:
            self.release(slot)
        packed = self.pack(modules, pin=False)
        if not self.table_fits(packed.num_pages):
            self.compact_table()
        self.load(slot, packed)

    def compact_table(self) -> None:
        """Pack every slot's table run from entry 0 up. Runs on the current stream, after
        whatever reads the table now; no copy into a slot may be in flight."""
        order = sorted(self.placed.items(), key=lambda item: item[1].table_start)
        table = torch.zeros(self.num_pages, dtype=torch.int32)
        records = self.info.cpu()
        start = 0
        for slot, placement in order:
            n = placement.num_pages
            table[start: start + n] = self._table_host[placement.table_start: placement.table_start + n]
            placement.table_start = start
            records[slot] = self._record(placement.packed, start)
            start += n
        self._table_host = table
        self._free_table = PageRuns(self.num_pages)
        if start:
            self._free_table.take_contiguous(start)
        self.table.copy_(table)
        self.info.copy_(records)

    def _record(self, packed: PackedAdapter, table_start: int) -> torch.Tensor:
        """The slot record [3, C]: rank, and table indices of each slice's first A and B page."""
        targeted = packed.rank > 0
        base = torch.where(targeted, table_start, 0).to(torch.int32)
        return torch.stack([packed.rank, base + torch.where(targeted, packed.a_offset, 0),
                            base + torch.where(targeted, packed.b_offset, 0)])

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"adapter slot {slot} outside 0..{self.num_slots - 1}")
