"""The adapter registry: every adapter's life, paged between disk, host memory and GPU slots.

    tiers    disk (the registered directory) -> host (packed in the GPU pool's page format,
             pinned; bounded in bytes and count, LRU) -> GPU (pages of the model's paged
             adapter memory, bounded in bytes and slot records; LRU among adapters no running
             sequence uses; pinned adapters stay)
    states   loading -> ready -> draining -> gone   (a name points at its current entry)
    slots    free -> loading -> ready <-> reserved  (`GpuSlots`: the one record of who owns a slot)

An adapter costs what it weighs: its pages (real ranks on the linears it targets) on the GPU
and the same bytes on the host. A slot is only a small record (rank, scaling, where its pages
are), so slots are many and the bytes bind: an adapter that does not fit in the free pages
evicts least recently used idle adapters until it does, or waits while running sequences
hold them (reserving as many as it needs, so that newer requests cannot starve it).

Two kinds of callers. Admin calls (`register`, `unload`, `merge`, `export`, `pin`, `info`)
come from any thread and do their file work there, outside the lock, so nothing waits on a
disk behind them. The engine thread calls the `AdapterProvider` side (`acquire` ... `between_steps`)
and never touches a file: a request for an adapter that is only on disk queues a read on the
loader thread, and host -> GPU copies are issued between steps, asynchronously on a side
stream on CUDA (one copy per run of free pages, see `LoRAPagePool`), so decoding never waits
on either.

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
from ..kernels.lora_pool import MAX_RANK_BOUND, PackedAdapter, full_adapter_pages, page_width_for
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
    gpu_slots: int = 8                # most adapters resident on the GPU at once (slot records)
    host_slots: int = 32              # most adapters kept in host memory (LRU); the rest on disk
    max_rank: int = 16                # the largest LoRA rank accepted (the kernels' scratch width)
    gpu_bytes: int | None = None      # GPU adapter memory (pages); None = gpu_slots adapters of
                                      # rank max_rank on every linear
    host_bytes: int | None = None     # host adapter memory; None = host_slots such adapters
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
        if not 1 <= self.max_rank <= MAX_RANK_BOUND:
            raise ValueError(f"max_rank must be in 1..{MAX_RANK_BOUND}, got {self.max_rank}")
        for name in ("gpu_bytes", "host_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 byte, got {getattr(self, name)}")
        if not self.slot_wait_timeout_s > 0:
            raise ValueError(f"slot_wait_timeout_s must be > 0, got {self.slot_wait_timeout_s}")


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: Path
    rank: int
    targets: list[str]
    nbytes: int                           # compact size of its A and B (as stored)
    pages: int = 0                        # GPU pages it takes (its real ranks and targets)
    packed_bytes: int = 0                 # its size in page format (host tier; GPU pages + record)
    version: int = 0                      # new for every registration (the prefix cache's key)
    owns_path: bool = False               # a merged adapter's directory, removed when gone
    roots: tuple[Path, ...] | None = None # a client named the path: every read stays inside these
    checked: ConfigCheck = field(default_factory=ConfigCheck)  # its config, checked once for all reads
    state: str = "loading"                # loading | ready | draining | gone
    pinned: bool = False
    host: PackedAdapter | None = None     # host tier: its pages, pinned (its GPU slot: `GpuSlots.of`)
    reading: bool = False                 # a page-in from disk is queued or running
    from_disk: bool = False               # the copy in flight follows a disk read (for load_seconds)
    refcount: int = 0                     # requests holding it
    active: int = 0                       # running sequences using its GPU slot
    error: str | None = None              # last page-in failure
    registered_at: float = field(default_factory=time.time)
    last_used: float = 0.0                # time.monotonic() of the last activation
    requests: int = 0                     # requests served so far
    read_seconds: float | None = None     # file -> host copy (read, validate, pack)
    load_seconds: float | None = None     # last file -> GPU slot (or host -> GPU) time
    copies: int = 0                       # copies of its last page-in (one per run of free pages)


class SlotState(Enum):
    FREE = "free"            # no owner
    LOADING = "loading"      # the owner's pages are being copied in: not to be read before the copy ends
    READY = "ready"          # the owner's weights are in: new sequences may use it
    RESERVED = "reserved"    # the owner's weights are in, no new sequences: it goes to a waiting
                             # adapter once the owner's running sequences end


# the moves a slot may make (a copy always ends, LOADING -> READY, before its slot is freed)
_MOVES = {
    SlotState.FREE: {SlotState.LOADING},
    SlotState.LOADING: {SlotState.READY},
    SlotState.READY: {SlotState.RESERVED, SlotState.FREE},
    SlotState.RESERVED: {SlotState.READY, SlotState.FREE},
}


@dataclass(eq=False)
class GpuSlot:
    index: int                               # the slot record's index in the model's page pool
    state: SlotState = SlotState.FREE
    owner: AdapterEntry | None = None        # None exactly when FREE
    copy: tuple | None = None                # (start event, end event, started at) while LOADING


class GpuSlots:
    """The GPU slots' state machine, the one record of which adapter owns which slot (and
    so which pages: the pool's placement of that slot):

        FREE -load-> LOADING -loaded-> READY -reserve-> RESERVED -unreserve-> READY
        READY | RESERVED -free (evicted or retired: its pages go back)-> FREE

    An adapter owns at most one slot (`load` refuses a second). Moves happen under the
    registry lock: `between_steps` (engine thread) evicts, loads, reserves and unreserves;
    whoever polls a copy's end event marks it loaded; retiring an adapter (any thread) frees
    its slot."""

    def __init__(self, count: int):
        self.all = [GpuSlot(i) for i in range(count)]
        self._by_owner: dict[AdapterEntry, GpuSlot] = {}  # an index over `all`, kept by the moves only

    def of(self, entry: AdapterEntry) -> GpuSlot | None:
        return self._by_owner.get(entry)

    def used(self) -> int:
        return len(self._by_owner)

    def load(self, slot: GpuSlot, entry: AdapterEntry, copy: tuple) -> None:
        """Give free `slot` to `entry`, whose pages `copy` is copying in."""
        if entry in self._by_owner:
            raise RuntimeError(f"adapter {entry.name!r} already owns GPU slot {self._by_owner[entry].index}")
        self._move(slot, SlotState.LOADING)
        slot.owner, slot.copy = entry, copy
        self._by_owner[entry] = slot

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
    pages: int = 0            # GPU pages it takes when resident
    gpu_bytes: int = 0        # bytes it holds on the GPU now (its pages)
    host_bytes: int = 0       # bytes it holds in host memory now (its packed copy)


class AdapterRegistry:
    """Owns the model's adapter slots; implements the engine's `AdapterProvider`."""

    def __init__(self, model, spec: BaseModelSpec, config: RegistryConfig | None = None,
                 on_event: Callable[[str, str, float | None], None] | None = None):
        """`on_event(kind, adapter, seconds)` is told of "load_host" / "load_gpu" (with the
        time it took), "evict_gpu", "evict_host", "load_failed"; for metrics: it runs under the
        registry's lock, on whichever thread caused the event, and must return at once."""
        self.config = config = config or RegistryConfig()
        self.spec = spec
        projections = [p for _, p in model.lora_projections()]
        full = full_adapter_pages(projections, config.max_rank)  # pages of an all-linear max-rank adapter
        page_bytes = page_width_for(projections) * model.dtype.itemsize
        num_pages = max(1, config.gpu_bytes // page_bytes) if config.gpu_bytes else config.gpu_slots * full
        self.pool = model.allocate_lora(config.gpu_slots, config.max_rank, num_pages)
        self.num_slots = config.gpu_slots
        self.host_limit = config.host_bytes or config.host_slots * (full * page_bytes + self.pool.record_bytes)
        self.on_event = on_event
        self._lock = threading.RLock()
        self._host_freed = threading.Condition(self._lock)
        self._names: dict[str, AdapterEntry] = {}
        self._loading: dict[str, AdapterEntry] = {}    # names being registered
        self._draining: list[AdapterEntry] = []
        self._slots = GpuSlots(config.gpu_slots)
        self._host: OrderedDict[AdapterEntry, None] = OrderedDict()  # entries with a host copy, LRU first
        self._host_bytes = 0                           # held by host copies, and claimed by packs under way
        self._host_claims = 0                          # packs under way (they count against host_slots)
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
        with self._lock:  # drop the pinned copies now rather than whenever the registry is collected
            for entry in self._host:
                entry.host = None
            self._host.clear()
            self._host_bytes = 0
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
                self._check_pin_room(entry, replacing=self._names.get(name))
                entry.pinned = True
            self._loading[name] = entry
        try:
            adapter, packed, entry.read_seconds = self._read_to_host_copy(entry, registering=True)
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
                    self._settle_claim(None, entry)
                    raise AdapterExistsError(f"adapter {name!r} is already registered")
                entry.pinned = entry.pinned or old.pinned  # a replaced pinned adapter stays pinned
                self._drain(old)
            entry.state, entry.from_disk = "ready", True  # its first GPU load counts the read
            self._settle_claim(packed, entry)
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
                self._check_pin_room(entry)
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
        """Counts and bytes for gauges and leak checks."""
        with self._lock:
            tiers = {"gpu": 0, "host": 0, "disk": 0}
            for entry in self._names.values():
                tiers[self._tier(entry)] += 1
            pool = self.pool
            return {
                "registered": len(self._names), "draining": len(self._draining),
                "gpu_slots_used": self._slots.used(), "gpu_slots": self.num_slots,
                "gpu_pages_used": pool.pages_used, "gpu_pages": pool.num_pages, "page_bytes": pool.page_bytes,
                "gpu_bytes_used": pool.pages_used * pool.page_bytes, "gpu_bytes": pool.num_pages * pool.page_bytes,
                "host_adapters": len(self._host), "host_slots": self.config.host_slots,
                "host_bytes_used": self._host_bytes, "host_bytes": self.host_limit,
                "host_claims": self._host_claims, "waiting_for_slot": len(self._wanted),
                "capacity": self._capacity(),
                **{f"tier_{k}": v for k, v in tiers.items()},
            }

    def _capacity(self) -> int:
        """How many adapters the GPU holds at once: the slots, or as many adapters of the mean
        size of those registered as the pages hold, whichever is fewer (slots when none is)."""
        sizes = [e.pages for e in self._names.values()]
        if not sizes or not sum(sizes):
            return self.num_slots
        return max(1, min(self.num_slots, self.pool.num_pages * len(sizes) // sum(sizes)))

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

    def _read_to_host_copy(self, entry: AdapterEntry, registering: bool = False
                           ) -> tuple[LoRAAdapter, PackedAdapter, float]:
        """File -> validated adapter -> packed host copy, and the seconds it took (no lock held).
        Its bytes are claimed against the host bound before packing; the caller owns them."""
        started = time.monotonic()
        adapter = self._read(entry)
        ranks = {key: m.a.shape[0] for key, m in adapter.modules.items()}
        pages = self.pool.pages_for(ranks)
        nbytes = pages * self.pool.page_bytes + self.pool.record_bytes
        if registering:
            with self._lock:
                self._check_fits(entry, pages, nbytes)
                entry.packed_bytes = nbytes
        elif pages != entry.pages:  # its files changed after registration: it was sized and checked as it was
            raise AdapterError(f"adapter {entry.name!r} changed on disk since it was registered "
                               f"({entry.pages} pages then, {pages} now); register it again")
        self._claim_host_bytes(nbytes)
        try:
            packed = self.pool.pack(adapter.modules)  # pinned allocation and packing: outside the lock
        except BaseException:
            self._settle_claim(None, entry)  # its bytes are entry.packed_bytes (checked above)
            raise
        return adapter, packed, time.monotonic() - started

    def _tier(self, entry: AdapterEntry) -> str:
        slot = self._slots.of(entry)
        if slot is not None and slot.state in (SlotState.READY, SlotState.RESERVED):
            return "gpu"
        return "host" if entry.host is not None else "disk"

    def _copying(self, entry: AdapterEntry) -> bool:
        """Its host copy is being copied into GPU pages (the host copy must stay)."""
        slot = self._slots.of(entry)
        return slot is not None and slot.state is SlotState.LOADING

    def _info(self, e: AdapterEntry) -> AdapterInfo:
        ago = None if not e.last_used else time.monotonic() - e.last_used
        gpu = e.pages * self.pool.page_bytes if self._slots.of(e) is not None else 0
        host = e.packed_bytes if e.host is not None else 0
        return AdapterInfo(e.name, e.state, self._tier(e), str(e.path), e.rank, list(e.targets), e.nbytes,
                           e.pinned, e.refcount, e.active, e.requests, e.registered_at, ago, e.read_seconds,
                           e.load_seconds, e.error, e.pages, gpu, host)

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

    def _pinned_pages(self, *excluding: AdapterEntry | None) -> tuple[int, int]:
        """(count, pages) of the pinned adapters, with registrations still reading, without
        `excluding` (the adapter asking; one being replaced, whose pin its replacement takes)."""
        pinned = [e for e in (*self._names.values(), *self._loading.values()) if e.pinned and e not in excluding]
        return len(pinned), sum(e.pages for e in pinned)

    def _check_pin_room(self, entry: AdapterEntry, replacing: AdapterEntry | None = None) -> None:
        """Room to pin `entry`: at most slots - 1 pins, so a slot always serves unpinned adapters,
        and every registered unpinned adapter must still fit in the pages the pins leave."""
        count, pages = self._pinned_pages(entry, replacing)
        if count + 1 > self.num_slots - 1:
            raise RegistryBusyError(f"cannot pin more than {self.num_slots - 1} adapters with {self.num_slots} "
                                    f"GPU slots (one stays free for the others)")
        largest = max((e.pages for e in self._names.values() if not e.pinned and e not in (entry, replacing)),
                      default=0)
        if pages + entry.pages + largest > self.pool.num_pages:
            page_bytes = self.pool.page_bytes
            raise RegistryBusyError(
                f"cannot pin {entry.name!r}: pinned adapters would take {_mb((pages + entry.pages) * page_bytes)} of "
                f"the {_mb(self.pool.num_pages * page_bytes)} of GPU adapter memory, too little left for the largest "
                f"unpinned adapter ({_mb(largest * page_bytes)})")

    def _check_fits(self, entry: AdapterEntry, pages: int, nbytes: int) -> None:
        """A new registration must fit the host bound, and the GPU pool beside the pins."""
        page_bytes, total = self.pool.page_bytes, self.pool.num_pages
        if nbytes > self.host_limit:
            raise AdapterError(f"adapter {entry.name!r} takes {_mb(nbytes)}, more than the host adapter memory "
                               f"({_mb(self.host_limit)})")
        if pages > total:
            raise AdapterError(f"adapter {entry.name!r} takes {_mb(pages * page_bytes)} of GPU adapter memory, more "
                               f"than there is ({_mb(total * page_bytes)})")
        replacing = self._names.get(entry.name)
        entry.pages = pages
        if entry.pinned:
            self._check_pin_room(entry, replacing)
            return
        _, pinned = self._pinned_pages(entry, replacing)
        if pages + pinned > total:
            raise RegistryBusyError(f"adapter {entry.name!r} takes {_mb(pages * page_bytes)} of GPU adapter memory; "
                                    f"pinned adapters leave {_mb((total - pinned) * page_bytes)}")

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
        """Free what a drained entry holds (pages or a host copy still being copied: once the copy ends)."""
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
            self._free_gpu(slot)
        if entry.host is not None:
            self._drop_host(entry)

    def _free_gpu(self, slot: GpuSlot) -> None:
        """Give a slot's record and pages back (not while its copy is in flight)."""
        self.pool.release(slot.index)
        self._slots.free(slot)

    def _drop_host(self, entry: AdapterEntry) -> None:
        self._host.pop(entry, None)
        entry.host = None
        self._host_bytes -= entry.packed_bytes
        self._host_freed.notify_all()

    def _claim_host_bytes(self, nbytes: int) -> None:
        """Claim room for a host copy of `nbytes` (any thread, without the lock held), evicting
        least recently used host copies until it is under both bounds; never one being copied
        to the GPU (wait for that copy), and those a waiting request needs last."""
        with self._lock:
            while (len(self._host) + self._host_claims >= self.config.host_slots
                   or self._host_bytes + nbytes > self.host_limit):
                victim = next((e for e in self._host if not self._copying(e) and e not in self._wanted),
                              next((e for e in self._host if not self._copying(e)), None))
                if victim is not None:
                    self._drop_host(victim)
                    self._emit("evict_host", victim.name)
                    continue
                self._poll_copies()
                self._host_freed.wait(0.002)
            self._host_claims += 1
            self._host_bytes += nbytes

    def _settle_claim(self, packed: PackedAdapter | None, entry: AdapterEntry) -> None:
        """A claim ends: `packed` becomes `entry`'s host copy, or (None) its bytes are given back."""
        with self._lock:
            self._host_claims -= 1
            if packed is None:
                self._host_bytes -= entry.packed_bytes
            else:
                entry.host = packed
                self._host[entry] = None
            self._host_freed.notify_all()

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
        self._host_freed.notify_all()

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
        slot = self._make_room(entry, fresh)
        if slot is None:
            return False
        if not self.pool.table_fits(entry.pages):
            if any(s.state is SlotState.LOADING for s in self._slots.all):
                return False  # compacting moves table runs: not under a copy still writing its own
            self.pool.compact_table()
        fresh.add(slot.index)
        self._wanted.remove(entry)
        self._slots.load(slot, entry, self._start_copy(slot.index, entry))
        if not self._cuda:
            self._poll_copies()  # the copy is done already
        self._host.move_to_end(entry)
        return True

    def _start_copy(self, index: int, entry: AdapterEntry) -> tuple:
        """Copy a host copy into GPU pages for slot `index`: (start event, end event, started at)."""
        began = time.monotonic()
        if not self._cuda:
            entry.copies = len(self.pool.load(index, entry.host).page_runs)
            return None, None, began
        # after whatever the model has queued (pages just freed may still be read for rows that
        # are dropped), on the side stream, from the pinned copy; the slot is used once the end
        # event passes
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(torch.cuda.current_stream(self.pool.device))
            start.record()
            entry.copies = len(self.pool.load(index, entry.host, non_blocking=True).page_runs)
            end.record()
        return start, end, began

    def _make_room(self, entry: AdapterEntry, fresh: set[int]) -> GpuSlot | None:
        """A free slot with `entry`'s pages free beside it, evicting idle adapters for them
        (no running sequence, pin or copy holds them; first those with no queued requests, then
        least recently used) only if that makes enough room. Otherwise reserve busy unpinned
        adapters, least recently used first, until their pages with the free and idle ones
        would do: they take no new sequences, so they free up for the waiting adapter instead
        of serving newer requests forever."""
        free = next((s for s in self._slots.all if s.state is SlotState.FREE), None)
        idle = sorted((s for s in self._slots.all
                       if s.state in (SlotState.READY, SlotState.RESERVED) and s.owner.active == 0
                       and not s.owner.pinned and s.index not in fresh),
                      key=lambda s: (s.owner.refcount > 0, s.owner.last_used, s.index))
        room, evict = self.pool.pages_free, []
        for slot in idle:
            if free is not None and room >= entry.pages:
                break
            evict.append(slot)
            room += slot.owner.pages
            free = free or slot
        if free is not None and room >= entry.pages:
            for slot in evict:
                self._emit("evict_gpu", slot.owner.name)
                self._free_gpu(slot)
            return free
        reserved = [s for s in self._slots.all if s.state is SlotState.RESERVED and s not in idle]
        room += sum(s.owner.pages for s in reserved)
        busy = sorted((s for s in self._slots.all if s.state is SlotState.READY and not s.owner.pinned
                       and s.owner.active > 0 and s.index not in fresh),
                      key=lambda s: (s.owner.last_used, s.index))
        for slot in busy:
            if (free is not None or reserved) and room >= entry.pages:
                break
            self._slots.reserve(slot)
            reserved.append(slot)
            room += slot.owner.pages
        return None

    def _end_needless_reservation(self) -> None:
        """Reservations stand only while an adapter without a slot waits for room."""
        if all(self._slots.of(e) is not None for e in self._wanted):
            for slot in self._slots.all:
                if slot.state is SlotState.RESERVED:
                    self._slots.unreserve(slot)

    def _end_waits_no_slot_can_serve(self) -> None:
        """While pinned adapters hold every slot, or so many pages that a waiting adapter cannot
        fit beside them, nothing frees up (the pin limits should prevent it; this is the
        backstop): once that has lasted `slot_wait_timeout_s`, the requests waiting for such
        adapters end with an error instead of waiting forever."""
        pinned = [s.owner for s in self._slots.all if s.owner is not None and s.owner.pinned]
        room = self.pool.num_pages - sum(e.pages for e in pinned)
        stuck = [e for e in self._wanted if e.refcount > 0 and self._slots.of(e) is None
                 and (len(pinned) == self.num_slots or e.pages > room)]
        if not stuck:
            self._all_pinned_since = None
            return
        now = time.monotonic()
        if self._all_pinned_since is None:
            self._all_pinned_since = now
        if now - self._all_pinned_since < self.config.slot_wait_timeout_s:
            return
        self._all_pinned_since = None
        log.warning("pinned adapters have held the GPU for %.0f s: ending the requests for %s",
                    self.config.slot_wait_timeout_s, ", ".join(e.name for e in stuck))
        for entry in stuck:
            self._wanted.remove(entry)
            message = (f"adapter {entry.name!r} cannot get a GPU slot: pinned adapters hold {len(pinned)} of "
                       f"{self.num_slots} slots and {_mb((self.pool.num_pages - room) * self.pool.page_bytes)} of "
                       f"{_mb(self.pool.num_pages * self.pool.page_bytes)} of GPU adapter memory (unpin one)")
            self._ends.append((entry, FinishReason.ERROR, message))

    def _read_to_host(self, entry: AdapterEntry) -> None:
        """Loader thread: disk -> host copy for an entry a request is waiting for."""
        try:
            _, packed, read_seconds = self._read_to_host_copy(entry)
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
                self._settle_claim(None, entry)
                return
            entry.read_seconds, entry.error, entry.from_disk = read_seconds, None, True
            self._settle_claim(packed, entry)
            self._emit("load_host", entry.name, read_seconds)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64]
