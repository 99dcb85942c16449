"""The adapter registry: every adapter's life, paged between disk, host memory and GPU slots.

    tiers    disk (the registered directory) -> host (pinned rows in the GPU slot layout,
             bounded, LRU) -> GPU (the model's slots; LRU among slots no running sequence
             uses; pinned adapters stay)
    states   loading -> ready -> draining -> gone   (a name points at its current entry)

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
from pathlib import Path
from typing import Callable

import torch

from ..engine.adapters import UnknownAdapterError
from ..engine.request import FinishReason
from ..kernels.lora_slots import SlotRow
from .merge import merge_adapters
from .peft_format import AdapterError, BaseModelSpec, LoRAAdapter, read_peft_adapter, write_peft_adapter

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

    def __post_init__(self):
        if self.gpu_slots < 1:
            raise ValueError(f"gpu_slots must be >= 1, got {self.gpu_slots}")
        if self.host_slots < 1:
            raise ValueError(f"host_slots must be >= 1, got {self.host_slots}")
        if not 1 <= self.max_rank <= 128:
            raise ValueError(f"max_rank must be in 1..128, got {self.max_rank}")


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: Path
    rank: int
    targets: list[str]
    nbytes: int                           # compact size of its A and B (as stored)
    owns_path: bool = False               # a merged adapter's directory, removed when gone
    state: str = "loading"                # loading | ready | draining | gone
    pinned: bool = False
    host: SlotRow | None = None           # host tier: packed, pinned row
    slot: int | None = None               # GPU slot (possibly still being copied into)
    copy: tuple | None = None             # (start event, end event, started at) while copying
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

    @property
    def tier(self) -> str:
        if self.slot is not None and self.copy is None:
            return "gpu"
        return "host" if self.host is not None else "disk"


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
        self._slots: list[AdapterEntry | None] = [None] * config.gpu_slots
        self._reserved: int | None = None              # a busy slot to evict next (no new admissions)
        self._host: OrderedDict[AdapterEntry, None] = OrderedDict()  # entries with a host row, LRU first
        self._free_rows: list[SlotRow] = []
        self._rows_allocated = 0
        self._wanted: list[AdapterEntry] = []          # waiting for a GPU slot, in request order
        self._ends: list[tuple[AdapterEntry, FinishReason, str]] = []  # requests to end at the next step
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
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- admin side (any thread) ----------------------------------------------------------

    def register(self, name: str, path: str | Path, *, replace: bool = False, pin: bool = False,
                 _owns_path: bool = False) -> AdapterInfo:
        """Read, validate and stage an adapter under `name`; raise AdapterError (the registry
        is then unchanged) or AdapterExistsError. With `replace`, new requests get the new
        weights at once while running ones finish on the old."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} is not valid: 1-128 characters from letters, digits "
                               f"and . _ : @ + / -, starting with a letter or digit")
        path = Path(path)
        with self._lock:
            self._check_name_free(name, replace)
            if pin:
                self._check_pin_room(extra=1)
            entry = AdapterEntry(name, path, 0, [], 0, owns_path=_owns_path)
            self._loading[name] = entry
        try:
            adapter, row, entry.read_seconds = self._read_to_row(path)
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
                pin = pin or old.pinned  # a replaced pinned adapter stays pinned
                self._drain(old)
            entry.state, entry.host, entry.from_disk = "ready", row, True  # its first GPU load counts the read
            self._host[entry] = None
            self._names[name] = entry
            if pin:
                entry.pinned = True
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
                adapters = [(self._read(entry.path), w) for entry, (_, w) in zip(held, sources)]
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
            return write_peft_adapter(self._read(entry.path), dest)

    def pin(self, name: str, pinned: bool = True) -> AdapterInfo:
        """Keep `name` in a GPU slot (loaded at the next step) or let it be evicted again."""
        with self._lock:
            entry = self._entry(name)
            if pinned and not entry.pinned:
                self._check_pin_room(extra=1)
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
                tiers[entry.tier] += 1
            return {
                "registered": len(self._names), "draining": len(self._draining),
                "gpu_slots_used": sum(e is not None for e in self._slots), "gpu_slots": self.num_slots,
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
            resident = sorted(e.name for e in self._names.values() if e.tier == "gpu")
            waiting = sorted(e.name for e in self._names.values() if e.refcount > e.active and e.tier != "gpu")
            return resident, waiting

    # -- engine side (engine thread) ------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._names

    def acquire(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entry(name)
            entry.refcount += 1
            entry.requests += 1
            if entry.slot is None:
                self._want(entry)  # start paging in now, not when the scheduler first asks
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.refcount -= 1
            if entry.refcount == 0 and entry.state == "draining":
                self._retire(entry)

    def activate(self, entry: AdapterEntry) -> int | None:
        with self._lock:
            if entry.slot is not None and entry.copy is None and entry.slot != self._reserved:
                entry.active += 1
                entry.last_used = time.monotonic()
                return entry.slot
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
            if self._reserved is not None:  # keep a reservation only while someone else waits
                owner = self._slots[self._reserved]
                if owner is None or all(e is owner for e in self._wanted):
                    self._reserved = None
            fresh: set[int] = set()  # slots filled this round: not evictable before their first use
            for entry in list(self._wanted):
                if not self._page_in(entry, fresh):
                    break  # no slot for the oldest want: nobody behind it gets one either
            ends, self._ends = self._ends, []
            return ends

    # -- internals (under the lock unless noted) ------------------------------------------

    def _read(self, path: Path) -> LoRAAdapter:
        """Read and validate (no lock held: this is the slow, file-bound part)."""
        return read_peft_adapter(path, self.spec, max_rank=self.config.max_rank,
                                 max_file_bytes=self.config.max_file_bytes, dtype=self.pool.dtype)

    def _read_to_row(self, path: Path) -> tuple[LoRAAdapter, SlotRow, float]:
        """File -> validated adapter -> packed host row, and the seconds it took (no lock held)."""
        started = time.monotonic()
        adapter = self._read(path)
        row = self._take_row()
        try:
            self.pool.pack(row, adapter.modules)
        except BaseException:
            self._give_row(row)
            raise
        return adapter, row, time.monotonic() - started

    def _info(self, e: AdapterEntry) -> AdapterInfo:
        ago = None if not e.last_used else time.monotonic() - e.last_used
        return AdapterInfo(e.name, e.state, e.tier, str(e.path), e.rank, list(e.targets), e.nbytes, e.pinned,
                           e.refcount, e.active, e.requests, e.registered_at, ago, e.read_seconds,
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

    def _check_pin_room(self, extra: int) -> None:
        pinned = sum(e.pinned for e in self._names.values())
        if pinned + extra > self.num_slots - 1:
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
        if entry in self._draining:
            self._draining.remove(entry)
        if entry in self._wanted:
            self._wanted.remove(entry)
        if entry.copy is None:
            self._free_resources(entry)
        if entry.owns_path:
            shutil.rmtree(entry.path, ignore_errors=True)

    def _free_resources(self, entry: AdapterEntry) -> None:
        if entry.slot is not None:
            self._slots[entry.slot] = None
            if self._reserved == entry.slot:
                self._reserved = None
            entry.slot = None
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
                victim = next((e for e in self._host if e.copy is None and e not in self._wanted),
                              next((e for e in self._host if e.copy is None), None))
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
        for slot, entry in enumerate(self._slots):
            if entry is None or entry.copy is None:
                continue
            start, end, began = entry.copy
            if end is not None and not end.query():
                continue
            copy_seconds = start.elapsed_time(end) / 1e3 if end is not None else time.monotonic() - began
            entry.copy = None
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
        if entry.slot is not None and entry.slot != self._reserved:
            self._wanted.remove(entry)  # resident (or its copy is in flight)
            return True
        if entry.host is None:
            if not entry.reading:
                entry.reading = True
                self._io.submit(self._read_to_host, entry)
            return True
        slot = self._free_slot(fresh)
        if slot is None:
            return False
        fresh.add(slot)
        self._wanted.remove(entry)
        old = self._slots[slot]
        if old is not None:
            old.slot = None
            self._emit("evict_gpu", old.name)
        if self._reserved == slot:
            self._reserved = None
        self._slots[slot], entry.slot = entry, slot
        if self._cuda:
            # after whatever the model has queued (the evicted adapter may still be read), on
            # the side stream, from the pinned row; the slot is used once the end event passes
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._stream):
                self._stream.wait_stream(torch.cuda.current_stream(self.pool.device))
                start.record()
                self.pool.load(slot, entry.host, non_blocking=True)
                end.record()
            entry.copy = (start, end, time.monotonic())
        else:
            entry.copy = (None, None, time.monotonic())
            self.pool.load(slot, entry.host)
            self._poll_copies()
        self._host.move_to_end(entry)
        return True

    def _free_slot(self, fresh: set[int]) -> int | None:
        """An empty slot, else one that no running sequence, pin or copy holds (first those
        with no queued requests, then least recently used); if every slot is busy, reserve the
        LRU unpinned one (no new admissions to it) so that it frees up for the waiting adapter
        instead of serving newer requests forever."""
        candidates = []
        for slot, entry in enumerate(self._slots):
            if entry is None:
                return slot
            if entry.active == 0 and not entry.pinned and entry.copy is None and slot not in fresh:
                candidates.append((entry.refcount > 0, entry.last_used, slot))
        if candidates:
            return min(candidates)[2]
        if self._reserved is None:
            busy = [(e.last_used, s) for s, e in enumerate(self._slots)
                    if not e.pinned and e.copy is None and s not in fresh]
            if busy:
                self._reserved = min(busy)[1]
        return None

    def _read_to_host(self, entry: AdapterEntry) -> None:
        """Loader thread: disk -> host row for an entry a request is waiting for."""
        try:
            _, row, read_seconds = self._read_to_row(entry.path)
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
