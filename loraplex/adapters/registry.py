"""The adapter registry: every adapter's life, paged between disk, host memory and GPU slots.

    tiers    disk (the registered directory) -> host (pinned rows in the GPU slot layout,
             bounded, LRU) -> GPU (the model's slots; LRU among slots no running sequence
             uses; pinned adapters stay)
    states   loading -> ready -> draining -> gone   (a name points at its current entry)
    slots    free -> loading -> ready <-> reserved  (`GpuSlots`: the one record of who owns a slot)

Two kinds of callers. Admin calls (`register`, `unload`, `merge`, `export`, `pin`, `info`)
come from any thread and do their file work there, outside the lock, so nothing waits on a
disk behind them. The engine thread calls the `AdapterProvider` side (`acquire` ... `between_steps`)
and never touches a file: a request for an adapter that is only on disk queues a read on the
loader thread, and host -> GPU copies are issued between steps, asynchronously on a side
stream on CUDA (one DMA per adapter, see `LoRASlotPool`), so decoding never waits on either.

The engine's handle for an adapter is its `AdapterEntry`. A request holds its entry from
admission to its last token (`acquire` / `release`), so replacing a name swaps it for new
requests only, and an unloaded adapter drains: it is gone once its last request finishes,
or at the next step when forced (its requests then end with finish reason "abort").
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

import torch

from ..engine.adapters import UnknownAdapterError
from ..engine.request import FinishReason
from ..kernels.lora_slots import SlotRow
from .merge import check_merge_size, merge_adapters
from .peft_format import (AdapterError, BaseModelSpec, ConfigCheck, LoRAAdapter, read_peft_adapter,
                          write_peft_adapter)

log = logging.getLogger("loraplex.adapters")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")


class AdapterExistsError(AdapterError):
    """A name that is already registered (HTTP 409)."""


class RegistryBusyError(AdapterError):
    """A limit of the registry is reached, e.g. every GPU slot is pinned (HTTP 409/503)."""


@dataclass
class RegistryConfig:
    gpu_slots: int = 8                # adapters resident on the GPU at once (pre-allocated)
    host_slots: int = 32              # adapters kept in pinned host memory (LRU); the rest on disk
    max_rank: int = 16                # the largest LoRA rank accepted (slot capacity)
    max_file_bytes: int = 2 << 30     # adapter_model.safetensors larger than this is refused
    work_dir: str | None = None       # where merged adapters are written; None = a temp dir
    # while every GPU slot holds a pinned adapter no slot can free up (the pin limit should
    # prevent it): requests for other adapters then end with an error after this long
    slot_wait_timeout_s: float = 30.0

    def __post_init__(self):
        if self.gpu_slots < 1:
            raise ValueError(f"gpu_slots must be >= 1, got {self.gpu_slots}")
        if self.host_slots < 1:
            raise ValueError(f"host_slots must be >= 1, got {self.host_slots}")
        if not 1 <= self.max_rank <= 128:
            raise ValueError(f"max_rank must be in 1..128, got {self.max_rank}")
        if not self.slot_wait_timeout_s > 0:
            raise ValueError(f"slot_wait_timeout_s must be > 0, got {self.slot_wait_timeout_s}")


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: Path
    rank: int
    targets: list[str]
    nbytes: int                           # compact size of its A and B (as stored)
    version: int = 0                      # new for every registration (the prefix cache's key)
    owns_path: bool = False               # a merged adapter's directory, removed when gone
    roots: tuple[Path, ...] | None = None # a client named the path: every read stays inside these
    checked: ConfigCheck = field(default_factory=ConfigCheck)  # its config, checked once for all reads
    state: str = "loading"                # loading | ready | draining | gone
    pinned: bool = False
    host: SlotRow | None = None           # host tier: packed, pinned row (its GPU slot: `GpuSlots.of`)
    reading: bool = False                 # a page-in from disk is queued or running
    from_disk: bool = False               # the copy in flight follows a disk read (for load_seconds)
    refcount: int = 0                     # requests holding it
    active: int = 0                       # running sequences using its GPU slot
    error: str | None = None              # last page-in failure
    registered_at: float = field(default_factory=time.time)
    last_used: float = 0.0                # time.monotonic() of the last activation
    requests: int = 0                     # requests served so far
    read_seconds: float | None = None     # file -> host row (read, validate, pack)
    load_seconds: float | None = None     # last file -> GPU slot (or host -> GPU) time


class SlotState(Enum):
    FREE = "free"            # no owner
    LOADING = "loading"      # the owner's host row is being copied in: not to be read before the copy ends
    READY = "ready"          # the owner's weights are in: new sequences may use it
    RESERVED = "reserved"    # the owner's weights are in, no new sequences: it goes to a waiting
                             # adapter once the owner's running sequences end


# the moves a slot may make (a copy always ends, LOADING -> READY, before its slot is freed)
_MOVES = {
    SlotState.FREE: {SlotState.LOADING},
    SlotState.LOADING: {SlotState.READY},
    SlotState.READY: {SlotState.RESERVED, SlotState.LOADING, SlotState.FREE},
    SlotState.RESERVED: {SlotState.READY, SlotState.LOADING, SlotState.FREE},
}


@dataclass(eq=False)
class GpuSlot:
    index: int                               # row of the model's slot arena
    state: SlotState = SlotState.FREE
    owner: AdapterEntry | None = None        # None exactly when FREE
    copy: tuple | None = None                # (start event, end event, started at) while LOADING


class GpuSlots:
    """The GPU slots' state machine, the one record of which adapter owns which slot:

        FREE -load-> LOADING -loaded-> READY -reserve-> RESERVED -unreserve-> READY
        READY | RESERVED -load (evicts the owner)-> LOADING,  READY | RESERVED -free-> FREE

    An adapter owns at most one slot (`load` refuses a second). Moves happen under the
    registry lock: `between_steps` (engine thread) loads, reserves and unreserves; whoever
    polls a copy's end event marks it loaded; retiring an adapter (any thread) frees its slot."""

    def __init__(self, count: int):
        self.all = [GpuSlot(i) for i in range(count)]
        self._by_owner: dict[AdapterEntry, GpuSlot] = {}  # an index over `all`, kept by the moves only

    def of(self, entry: AdapterEntry) -> GpuSlot | None:
        return self._by_owner.get(entry)

    def used(self) -> int:
        return len(self._by_owner)

    def reserved(self) -> GpuSlot | None:
        return next((s for s in self.all if s.state is SlotState.RESERVED), None)

    def load(self, slot: GpuSlot, entry: AdapterEntry, copy: tuple) -> AdapterEntry | None:
        """Give `slot` to `entry`, whose row `copy` is copying in; returns the evicted owner."""
        if entry in self._by_owner:
            raise RuntimeError(f"adapter {entry.name!r} already owns GPU slot {self._by_owner[entry].index}")
        evicted = slot.owner
        self._move(slot, SlotState.LOADING)
        if evicted is not None:
            del self._by_owner[evicted]
        slot.owner, slot.copy = entry, copy
        self._by_owner[entry] = slot
        return evicted

    def loaded(self, slot: GpuSlot) -> None:
        self._move(slot, SlotState.READY)
        slot.copy = None

    def reserve(self, slot: GpuSlot) -> None:
        self._move(slot, SlotState.RESERVED)

    def unreserve(self, slot: GpuSlot) -> None:
        self._move(slot, SlotState.READY)

    def free(self, slot: GpuSlot) -> None:
        self._move(slot, SlotState.FREE)
        del self._by_owner[slot.owner]
        slot.owner = None

    @staticmethod
    def _move(slot: GpuSlot, to: SlotState) -> None:
        if to not in _MOVES[slot.state]:  # a registry bug: fail loudly rather than serve wrong weights
            raise RuntimeError(f"GPU slot {slot.index} cannot go from {slot.state.value} to {to.value}")
        slot.state = to


@dataclass(frozen=True)
class AdapterInfo:
    """What `info` / `list` show for one adapter (a snapshot)."""

    name: str
    state: str
    tier: str
    path: str
    rank: int
    targets: list[str]
    size_bytes: int
    pinned: bool
    refcount: int
    running: int
    requests: int
    registered_at: float
    last_used_seconds_ago: float | None
    read_seconds: float | None
    load_seconds: float | None
    error: str | None


class AdapterRegistry:
    """Owns the model's adapter slots; implements the engine's `AdapterProvider`."""

    def __init__(self, model, spec: BaseModelSpec, config: RegistryConfig | None = None,
                 on_event: Callable[[str, str, float | None], None] | None = None):
        """`on_event(kind, adapter, seconds)` is told of "load_host" / "load_gpu" (with the
        time it took), "evict_gpu", "evict_host", "load_failed"; for metrics: it runs under the
        registry's lock, on whichever thread caused the event, and must return at once."""
        self.config = config = config or RegistryConfig()
        self.spec = spec
        self.pool = model.allocate_lora(config.gpu_slots, config.max_rank)
        self.num_slots = config.gpu_slots
        self.on_event = on_event
        self._lock = threading.RLock()
        self._row_freed = threading.Condition(self._lock)
        self._names: dict[str, AdapterEntry] = {}
        self._loading: dict[str, AdapterEntry] = {}    # names being registered
        self._draining: list[AdapterEntry] = []
        self._slots = GpuSlots(config.gpu_slots)
        self._host: OrderedDict[AdapterEntry, None] = OrderedDict()  # entries with a host row, LRU first
        self._free_rows: list[SlotRow] = []
        self._rows_allocated = 0
        self._wanted: list[AdapterEntry] = []          # to page in (demand, in request order)
        self._all_pinned_since: float | None = None    # since when every slot holds a pinned adapter
        self._ends: list[tuple[AdapterEntry, FinishReason, str]] = []  # requests to end at the next step
        self._versions = itertools.count(1)            # 0 is the base model's
        self._retired: list[int] = []                  # versions gone since retired_versions() was called
        self._dirs_to_remove: set[Path] = set()        # merged adapters' directories queued on the io thread
        self._cuda = self.pool.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.pool.device) if self._cuda else None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="loraplex-adapter-io")
        if config.work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="loraplex-merged-")
            self.work_dir = Path(self._tmp.name)
        else:
            self._tmp, self.work_dir = None, Path(config.work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        with self._lock:  # drop the pinned rows now rather than whenever the registry is collected
            self._free_rows.clear()
            for entry in self._host:
                entry.host = None
            self._host.clear()
            leftover, self._dirs_to_remove = self._dirs_to_remove, set()
        for path in leftover:  # removals the shutdown cancelled
            shutil.rmtree(path, ignore_errors=True)
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- admin side (any thread) ----------------------------------------------------------

    def register(self, name: str, path: str | Path, *, replace: bool = False, pin: bool = False,
                 roots: list[str | Path] | None = None, _owns_path: bool = False) -> AdapterInfo:
        """Read, validate and stage an adapter under `name`; raise AdapterError (the registry
        is then unchanged) or AdapterExistsError. With `replace`, new requests get the new
        weights at once while running ones finish on the old. With `roots` (a client named
        the path), this read and every later one (page-ins, merges, exports) open only files
        that resolve inside them, so a file swapped for a link afterwards is refused too."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} is not valid: 1-128 characters from letters, digits "
                               f"and . _ : @ + / -, starting with a letter or digit")
        path = Path(path)
        with self._lock:
            self._check_name_free(name, replace)
            entry = AdapterEntry(name, path, 0, [], 0, version=next(self._versions), owns_path=_owns_path,
                                 roots=None if roots is None else tuple(Path(r) for r in roots))
            if pin:  # claimed in the same hold of the lock as the check, so racing pins cannot all pass it
                self._check_pin_room(replacing=self._names.get(name))
                entry.pinned = True
            self._loading[name] = entry
        try:
            adapter, row, entry.read_seconds = self._read_to_row(entry)
            entry.rank, entry.targets = adapter.max_rank, sorted(adapter.targets)
            entry.nbytes = adapter.nbytes()
        except BaseException:
            with self._lock:
                del self._loading[name]
            if _owns_path:
                shutil.rmtree(path, ignore_errors=True)
            raise
        with self._lock:
            del self._loading[name]
            old = self._names.get(name)
            if old is not None:
                if not replace:  # raced with another register of the same name
                    self._give_row(row)
                    raise AdapterExistsError(f"adapter {name!r} is already registered")
                entry.pinned = entry.pinned or old.pinned  # a replaced pinned adapter stays pinned
                self._drain(old)
            entry.state, entry.host, entry.from_disk = "ready", row, True  # its first GPU load counts the read
            self._host[entry] = None
            self._names[name] = entry
            if entry.pinned:
                self._want(entry)
            self._emit("load_host", name, entry.read_seconds)
            log.info("adapter %s registered (rank %d, %d modules, %.1f ms)%s", name, entry.rank,
                     len(adapter.modules), 1e3 * entry.read_seconds, " replacing the old one" if old else "")
            return self._info(entry)

    def unload(self, name: str, *, force: bool = False) -> AdapterInfo:
        """Stop new requests for `name` at once; it is gone when its running requests finish,
        or, with `force`, at the next step, ending them with finish reason "abort"."""
        with self._lock:
            entry = self._entry(name)
            self._drain(entry)
            if force and entry.refcount > 0:
                self._ends.append((entry, FinishReason.ABORT, f"adapter {name!r} was unloaded"))
            return self._info(entry)

    def merge(self, name: str, method: str, sources: list[tuple[str, float]], *, replace: bool = False,
              pin: bool = False, **options) -> AdapterInfo:
        """Register a new adapter merged from registered ones (see `merge_adapters` for
        methods and options); it is written as a PEFT directory under `work_dir`."""
        if not sources:
            raise AdapterError("merge needs at least one source adapter")
        with self._lock:
            self._check_name_free(name, replace)
        out = self.work_dir / f"{_safe_dirname(name)}-{uuid.uuid4().hex[:8]}"
        with self._held([source for source, _ in sources]) as held:
            try:
                # bounded before anything is read: the same source named 64 times is read 64 times
                check_merge_size(len(held), sum(e.nbytes for e in held) * 4 // self.pool.dtype.itemsize)
                adapters = [(self._read(entry), w) for entry, (_, w) in zip(held, sources)]
                merged = merge_adapters(adapters, method, max_rank=self.config.max_rank, **options)
                write_peft_adapter(merged, out)
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)
                raise
        return self.register(name, out, replace=replace, pin=pin, _owns_path=True)

    def export(self, name: str, dest: str | Path) -> Path:
        """Write `name` as a PEFT directory at `dest` (which must not exist or be empty)."""
        with self._held([name]) as (entry,):
            dest = Path(dest)
            if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
                raise AdapterError(f"export destination {str(dest)!r} exists and is not an empty directory")
            return write_peft_adapter(self._read(entry), dest)

    def pin(self, name: str, pinned: bool = True) -> AdapterInfo:
        """Keep `name` in a GPU slot (loaded at the next step) or let it be evicted again."""
        with self._lock:
            entry = self._entry(name)
            if pinned and not entry.pinned:
                self._check_pin_room()
                self._want(entry)
            entry.pinned = pinned
            return self._info(entry)

    def info(self, name: str) -> AdapterInfo:
        """The adapter registered as `name` (or being registered, or else still draining)."""
        with self._lock:
            draining = [e for e in self._draining if e.name == name]
            entry = self._names.get(name) or self._loading.get(name) or (draining[-1] if draining else None)
            if entry is None:
                raise UnknownAdapterError(name)
            return self._info(entry)

    def list(self) -> list[AdapterInfo]:
        """Registered adapters (and those being registered), then draining ones."""
        with self._lock:
            entries = sorted([*self._names.values(), *self._loading.values()], key=lambda e: e.name)
            return [self._info(e) for e in entries + self._draining]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def usage(self) -> dict[str, int]:
        """Counts for gauges and leak checks."""
        with self._lock:
            tiers = {"gpu": 0, "host": 0, "disk": 0}
            for entry in self._names.values():
                tiers[self._tier(entry)] += 1
            return {
                "registered": len(self._names), "draining": len(self._draining),
                "gpu_slots_used": self._slots.used(), "gpu_slots": self.num_slots,
                "host_rows_used": len(self._host), "host_rows_free": len(self._free_rows),
                "host_rows_allocated": self._rows_allocated,
                "host_slots": self.config.host_slots, "waiting_for_slot": len(self._wanted),
                **{f"tier_{k}": v for k, v in tiers.items()},
            }

    def resident_and_waiting(self) -> tuple[list[str], list[str]]:
        """Names in GPU slots (ready to serve at once), and names with requests waiting for a
        slot: what an adapter-affinity router wants to know (the Gateway API Inference
        Extension's running / waiting LoRA adapters)."""
        with self._lock:
            resident = sorted(e.name for e in self._names.values() if self._tier(e) == "gpu")
            waiting = sorted(e.name for e in self._names.values()
                             if e.refcount > e.active and self._tier(e) != "gpu")
            return resident, waiting

    # -- engine side (engine thread) ------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._names

    def acquire(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entry(name)
            entry.refcount += 1
            entry.requests += 1
            if self._slots.of(entry) is None:
                self._want(entry)  # start paging in now, not when the scheduler first asks
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.refcount -= 1
            if entry.refcount == 0 and entry.state == "draining":
                self._retire(entry)

    def activate(self, entry: AdapterEntry) -> int | None:
        with self._lock:
            slot = self._slots.of(entry)
            if slot is not None and slot.state is SlotState.READY:
                entry.active += 1
                entry.last_used = time.monotonic()
                return slot.index
            if entry.state != "gone":
                self._want(entry)
            return None

    def deactivate(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.active -= 1
            entry.last_used = time.monotonic()

    def between_steps(self) -> list[tuple[AdapterEntry, FinishReason, str]]:
        """Move pages (finished copies, new copies, disk reads); return the requests to end."""
        with self._lock:
            self._poll_copies()
            fresh: set[int] = set()  # slots filled this round: not evictable before their first use
            for entry in list(self._wanted):
                if not self._page_in(entry, fresh):
                    break  # no slot for the oldest want: nobody behind it gets one either
            self._end_needless_reservation()
            self._end_waits_no_slot_can_serve()
            ends, self._ends = self._ends, []
            return ends

    def version(self, entry: AdapterEntry) -> int:
        return entry.version

    def retired_versions(self) -> list[int]:
        with self._lock:
            gone, self._retired = self._retired, []
            return gone

    # -- internals (under the lock unless noted) ------------------------------------------

    def _read(self, entry: AdapterEntry) -> LoRAAdapter:
        """Read and validate `entry`'s files (no lock held: this is the slow, file-bound part)."""
        return read_peft_adapter(entry.path, self.spec, max_rank=self.config.max_rank,
                                 max_file_bytes=self.config.max_file_bytes, dtype=self.pool.dtype,
                                 roots=entry.roots, checked=entry.checked)

    def _read_to_row(self, entry: AdapterEntry) -> tuple[LoRAAdapter, SlotRow, float]:
        """File -> validated adapter -> packed host row, and the seconds it took (no lock held)."""
        started = time.monotonic()
        adapter = self._read(entry)
        row = self._take_row()
        try:
            self.pool.pack(row, adapter.modules)
        except BaseException:
            self._give_row(row)
            raise
        return adapter, row, time.monotonic() - started

    def _tier(self, entry: AdapterEntry) -> str:
        slot = self._slots.of(entry)
        if slot is not None and slot.state in (SlotState.READY, SlotState.RESERVED):
            return "gpu"
        return "host" if entry.host is not None else "disk"

    def _copying(self, entry: AdapterEntry) -> bool:
        """Its host row is being copied into a GPU slot (the row must stay)."""
        slot = self._slots.of(entry)
        return slot is not None and slot.state is SlotState.LOADING

    def _info(self, e: AdapterEntry) -> AdapterInfo:
        ago = None if not e.last_used else time.monotonic() - e.last_used
        return AdapterInfo(e.name, e.state, self._tier(e), str(e.path), e.rank, list(e.targets), e.nbytes,
                           e.pinned, e.refcount, e.active, e.requests, e.registered_at, ago, e.read_seconds,
                           e.load_seconds, e.error)

    def _emit(self, kind: str, name: str, seconds: float | None = None) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, name, seconds)
            except Exception:
                log.exception("adapter event hook failed")

    def _entry(self, name: str) -> AdapterEntry:
        entry = self._names.get(name)
        if entry is None:
            raise UnknownAdapterError(name)
        return entry

    def _check_name_free(self, name: str, replace: bool) -> None:
        if name in self._loading or (name in self._names and not replace):
            raise AdapterExistsError(f"adapter {name!r} is already registered (ask for replace to swap it)")

    @contextmanager
    def _held(self, names: list[str]):
        """The entries of `names`, kept from being retired while files are read (any thread)."""
        with self._lock:
            held = [self._entry(name) for name in names]
            for entry in held:
                entry.refcount += 1
        try:
            yield held
        finally:
            with self._lock:
                for entry in held:
                    self.release(entry)

    def _check_pin_room(self, replacing: AdapterEntry | None = None) -> None:
        """Room for one more pin: at most slots - 1, so one slot always serves unpinned adapters.
        Pins claimed by registrations still reading count; that of an adapter being replaced
        does not (its replacement takes it over)."""
        pinned = sum(e.pinned for e in (*self._names.values(), *self._loading.values()) if e is not replacing)
        if pinned + 1 > self.num_slots - 1:
            raise RegistryBusyError(f"cannot pin more than {self.num_slots - 1} adapters with {self.num_slots} "
                                    f"GPU slots (one stays free for the others)")

    def _want(self, entry: AdapterEntry) -> None:
        if entry not in self._wanted:
            self._wanted.append(entry)

    def _drain(self, entry: AdapterEntry) -> None:
        # queued requests still hold it and may still need it paged in: it stays wanted
        del self._names[entry.name]
        entry.state, entry.pinned = "draining", False
        if entry.refcount == 0:
            self._retire(entry)
        else:
            self._draining.append(entry)

    def _retire(self, entry: AdapterEntry) -> None:
        """Free what a drained entry holds (a slot or row still being copied: once the copy ends)."""
        entry.state = "gone"
        self._retired.append(entry.version)
        if entry in self._draining:
            self._draining.remove(entry)
        if entry in self._wanted:
            self._wanted.remove(entry)
        if not self._copying(entry):
            self._free_resources(entry)
        if entry.owns_path:
            self._remove_later(entry.path)

    def _remove_later(self, path: Path) -> None:
        """Delete a merged adapter's directory on the io thread: a large tree must stall neither
        the engine thread (whose `release` may retire an adapter) nor anyone waiting on the lock."""
        self._dirs_to_remove.add(path)
        self._io.submit(self._remove_dir, path)

    def _remove_dir(self, path: Path) -> None:
        """io thread, without the lock while removing."""
        shutil.rmtree(path, ignore_errors=True)
        with self._lock:
            self._dirs_to_remove.discard(path)

    def _free_resources(self, entry: AdapterEntry) -> None:
        slot = self._slots.of(entry)
        if slot is not None:
            self._slots.free(slot)
        if entry.host is not None:
            self._host.pop(entry, None)
            self._give_row(entry.host)
            entry.host = None

    def _take_row(self) -> SlotRow:
        """A host row to fill: a free one, a new one under the limit, or the least recently used
        entry's (never one being copied to the GPU: wait for that copy)."""
        with self._lock:
            while True:
                if self._free_rows:
                    return self._free_rows.pop()
                if self._rows_allocated < self.config.host_slots:
                    self._rows_allocated += 1
                    break
                # least recently used first, sparing rows a GPU copy or a waiting request needs
                victim = next((e for e in self._host if not self._copying(e) and e not in self._wanted),
                              next((e for e in self._host if not self._copying(e)), None))
                if victim is not None:
                    self._host.pop(victim)
                    row, victim.host = victim.host, None
                    self._emit("evict_host", victim.name)
                    return row
                self._poll_copies()
                self._row_freed.wait(0.002)
        try:
            return self.pool.new_row()  # pinned allocation: outside the lock
        except BaseException:
            with self._lock:
                self._rows_allocated -= 1
            raise

    def _give_row(self, row: SlotRow) -> None:
        with self._lock:
            self._free_rows.append(row)
            self._row_freed.notify()

    def _poll_copies(self) -> None:
        for slot in self._slots.all:
            if slot.state is not SlotState.LOADING:
                continue
            start, end, began = slot.copy
            if end is not None and not end.query():
                continue
            copy_seconds = start.elapsed_time(end) / 1e3 if end is not None else time.monotonic() - began
            entry = slot.owner
            self._slots.loaded(slot)
            entry.load_seconds = copy_seconds + (entry.read_seconds if entry.from_disk else 0.0)
            entry.from_disk = False
            self._emit("load_gpu", entry.name, entry.load_seconds)
            if entry.state == "gone":
                self._free_resources(entry)
        self._row_freed.notify_all()

    def _page_in(self, entry: AdapterEntry, fresh: set[int]) -> bool:
        """Move one wanted entry a tier closer to the GPU; False if no slot can be had now."""
        if entry.state == "gone":
            self._wanted.remove(entry)
            return True
        own = self._slots.of(entry)
        if own is not None:
            if own.state is not SlotState.RESERVED:
                self._wanted.remove(entry)  # resident, or its copy is in flight
            return True  # reserved: it serves again once nobody else waits (never a second slot)
        if entry.host is None:
            if not entry.reading:
                entry.reading = True
                self._io.submit(self._read_to_host, entry)
            return True
        slot = self._free_slot(fresh)
        if slot is None:
            return False
        fresh.add(slot.index)
        self._wanted.remove(entry)
        evicted = self._slots.load(slot, entry, self._start_copy(slot.index, entry.host))
        if evicted is not None:
            self._emit("evict_gpu", evicted.name)
        if not self._cuda:
            self._poll_copies()  # the copy is done already
        self._host.move_to_end(entry)
        return True

    def _start_copy(self, index: int, row: SlotRow) -> tuple:
        """Copy a host row into GPU slot `index`: (start event, end event, started at)."""
        began = time.monotonic()
        if not self._cuda:
            self.pool.load(index, row)
            return None, None, began
        # after whatever the model has queued (the evicted adapter may still be read), on the
        # side stream, from the pinned row; the slot is used once the end event passes
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(torch.cuda.current_stream(self.pool.device))
            start.record()
            self.pool.load(index, row, non_blocking=True)
            end.record()
        return start, end, began

    def _free_slot(self, fresh: set[int]) -> GpuSlot | None:
        """An empty slot, else one that no running sequence, pin or copy holds (first those
        with no queued requests, then least recently used); if every slot is busy, reserve the
        LRU unpinned one (no new admissions to it) so that it frees up for the waiting adapter
        instead of serving newer requests forever."""
        candidates = []
        for slot in self._slots.all:
            if slot.state is SlotState.FREE:
                return slot
            owner = slot.owner
            if slot.state is not SlotState.LOADING and owner.active == 0 and not owner.pinned \
                    and slot.index not in fresh:
                candidates.append((owner.refcount > 0, owner.last_used, slot.index))
        if candidates:
            return self._slots.all[min(candidates)[2]]
        if self._slots.reserved() is None:
            busy = [(s.owner.last_used, s.index) for s in self._slots.all
                    if s.state is SlotState.READY and not s.owner.pinned and s.index not in fresh]
            if busy:
                self._slots.reserve(self._slots.all[min(busy)[1]])
        return None

    def _end_needless_reservation(self) -> None:
        """A reservation stands only while an adapter without a slot waits for one."""
        slot = self._slots.reserved()
        if slot is not None and all(self._slots.of(e) is not None for e in self._wanted):
            self._slots.unreserve(slot)

    def _end_waits_no_slot_can_serve(self) -> None:
        """While every slot holds a pinned adapter no slot frees up (the pin limit should
        prevent it; this is the backstop): once that has lasted `slot_wait_timeout_s`, the
        requests waiting for other adapters end with an error instead of waiting forever."""
        stuck = [e for e in self._wanted if e.refcount > 0 and self._slots.of(e) is None]
        if not stuck or not all(s.owner is not None and s.owner.pinned for s in self._slots.all):
            self._all_pinned_since = None
            return
        now = time.monotonic()
        if self._all_pinned_since is None:
            self._all_pinned_since = now
        if now - self._all_pinned_since < self.config.slot_wait_timeout_s:
            return
        self._all_pinned_since = None
        log.warning("every GPU slot has held a pinned adapter for %.0f s: ending the requests for %s",
                    self.config.slot_wait_timeout_s, ", ".join(e.name for e in stuck))
        for entry in stuck:
            self._wanted.remove(entry)
            message = (f"adapter {entry.name!r} cannot get a GPU slot: all {self.num_slots} hold pinned "
                       f"adapters (unpin one)")
            self._ends.append((entry, FinishReason.ERROR, message))

    def _read_to_host(self, entry: AdapterEntry) -> None:
        """Loader thread: disk -> host row for an entry a request is waiting for."""
        try:
            _, row, read_seconds = self._read_to_row(entry)
        except Exception as exc:
            log.error("adapter %s: page-in from %s failed: %s", entry.name, entry.path, exc)
            with self._lock:
                entry.reading, entry.error = False, str(exc)
                if entry in self._wanted:
                    self._wanted.remove(entry)
                # the requests' error reaches API clients: no exception text (it names server paths);
                # admins see it in info(name).error
                self._ends.append((entry, FinishReason.ERROR,
                                   f"adapter {entry.name!r} could not be loaded; see the server log"))
                self._emit("load_failed", entry.name)
            return
        with self._lock:
            entry.reading = False
            if entry.state == "gone" or entry.host is not None:
                self._give_row(row)
                return
            entry.host, entry.read_seconds, entry.error, entry.from_disk = row, read_seconds, None, True
            self._host[entry] = None
            self._emit("load_host", entry.name, read_seconds)


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64]
