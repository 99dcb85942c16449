"""Hot-swap benchmark: what registering, paging in and unloading LoRA adapters while serving
costs the streams that keep decoding, and how long one adapter takes from file to GPU slot.

Workload: Llama-2-7B's shapes with random weights (bf16 activations, NF4 base; the model of
bench/e2e.py), an `AdapterRegistry` with --gpu-slots GPU slots (default --resident + 4) and 64
streams of 128-token random prompts decoding continuously (greedy, ignore_eos, long
generations), spread round robin over --resident (default 8) adapters registered pinned.
Every adapter is rank 16 (--rank) on all seven linears (--targets qv: q and v only), written
with `write_peft_adapter` to a temporary directory before anything is timed and read once
so that the files sit in the OS page cache (loads are "from a warm page cache").

1. ITL          inter-token latency: wall time of `engine.step()` on this thread for the steps
                that decode every stream (sampling copies the tokens to the host, so a step
                has finished on the device when it returns). Steady blocks and churn blocks
                alternate A B B A A B B A ..., --blocks of each, --steps steps per phase in all,
                so both phases see the same spread of context lengths (a decode step slows as
                the KV cache grows). p50 / p99 per phase and p99 churn / p99 steady.
2. churn        during churn blocks a second thread registers adapters one after another
                (`register()`: file read, validation, packing into a pinned host row, on
                that thread), submits a short request on each (16-token prompt, 2 tokens) so
                the engine pages it into a GPU slot (one asynchronous DMA on a side stream,
                issued between steps), waits for the registry's "load_gpu" event, and unloads
                the oldest churn adapter beyond gpu_slots - resident live ones, so each page-in
                evicts an idle churn adapter from its slot. Reported: adapters loaded per second
                of churn, and ITL p99 also over the churn steps without a churn prefill (such a
                step runs eagerly, not as a CUDA graph: the cost of a new request, not of the
                swap). `--page-in pin` pages adapters in by pinning instead (no requests).
3. load time    per churned adapter: `info.load_seconds` (file -> GPU slot work: read,
                validate, pack, DMA), its parts, and the wall time from calling `register()`
                to the "load_gpu" event (also waits for step boundaries); p50 / p99. Baseline
                in the same run: `safetensors.torch.load_file(path, device=...)` of the same
                files (raw tensors onto the GPU, no validation); ours / baseline at p50.

Targets on an H100 (PASS/FAIL, printed on CUDA only): ITL p99 with churn / ITL p99 steady <=
1.2; rank-16 Llama-7B adapter load from a warm page cache (p99) <= 50 ms, file -> GPU slot work
and register() -> in a GPU slot wall time.

Run:
    python bench/hotswap.py                     # on a CUDA GPU (full run)
    python bench/hotswap.py --targets qv        # q/v-only adapters
    python bench/hotswap.py --smoke             # anywhere (CPU): harness check only
`--smoke`: tiny model (hidden 128, 2 layers, vocab 512) on the PyTorch reference kernels, 4
streams over 2 resident adapters, 16 steps per phase in 2 blocks, 6 adapter files churned. Its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import queue
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from loraplex.adapters.peft_format import (WEIGHTS_NAME, BaseModelSpec, LoRAAdapter, write_peft_adapter)
from loraplex.adapters.registry import AdapterRegistry, RegistryConfig  # noqa: E402
from loraplex.engine.engine import Engine, EngineConfig  # noqa: E402
from loraplex.engine.kv_cache import kv_bytes_per_token  # noqa: E402
from loraplex.kernels.lora_pool import full_adapter_pages  # noqa: E402
from loraplex.engine.request import FinishReason, Request  # noqa: E402
from loraplex.engine.sampling import SamplingParams  # noqa: E402
from loraplex.kernels import runtime  # noqa: E402
from loraplex.model.config import ModelConfig  # noqa: E402
from loraplex.model.llama import build_model  # noqa: E402

from bench.e2e import (DTYPE, MODELS, SEED, TARGETS, SyntheticReader, hf_config, percentile,  # noqa: E402
                       prompts_for, random_lora, synthetic_tokenizer)
from bench.nf4_matmul import Target, bench_device, environment, fmt, markdown  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "hotswap.json"
FULL = dict(model="llama2-7b", streams=64, steps=200, blocks=4, resident=8, prompt_len=128, files=16,
            warmup_steps=16, timeout=60.0)
SMOKE = dict(model="tiny", streams=4, steps=16, blocks=2, resident=2, prompt_len=16, files=6,
             warmup_steps=2, timeout=60.0)
CHURN_PROMPT_LEN, CHURN_TOKENS = 16, 2  # the short request that pages a churned adapter in
ALPHA_OVER_RANK = 2.0                    # scaling of the random adapters (alpha = 2 r)
BLOCK_SIZE = 16                          # the engine's default KV block


# ----------------------------------------------------------------------------------------
# Adapter files
# ----------------------------------------------------------------------------------------


def random_adapter(spec: BaseModelSpec, seed: int, rank: int, targets: tuple[str, ...],
                   device: torch.device) -> LoRAAdapter:
    """Random rank-`rank` bf16 LoRA on `targets` of every layer (drawn on the device, seeded)."""
    return LoRAAdapter(modules=random_lora(spec.num_layers, spec.shapes, targets, rank, ALPHA_OVER_RANK, seed, device))


def write_files(root: Path, prefix: str, count: int, spec: BaseModelSpec, args, device: torch.device,
                seed: int) -> list[Path]:
    paths = []
    for i in range(count):
        adapter = random_adapter(spec, seed + i, args.rank, TARGETS[args.targets], device)
        paths.append(write_peft_adapter(adapter, root / f"{prefix}{i}"))
        del adapter
    return paths


def warm_page_cache(paths: list[Path]) -> int:
    """Read every file of the adapter directories once (into the OS page cache); bytes read."""
    total, buf = 0, bytearray(16 << 20)
    for path in paths:
        for f in sorted(path.iterdir()):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return total


def baseline_loads(paths: list[Path], device: torch.device, sync) -> dict:
    """`safetensors.torch.load_file` of each adapter file onto `device` (then synchronized),
    and onto the host: ms per file. One untimed load first (CUDA context, allocator)."""
    from safetensors.torch import load_file

    files = [p / WEIGHTS_NAME for p in paths]
    load_file(files[0], device=str(device))
    sync()
    to_device, to_host = [], []
    for f in files:
        t0 = time.perf_counter()
        tensors = load_file(f, device=str(device))
        sync()
        to_device.append(1e3 * (time.perf_counter() - t0))
        del tensors
        t0 = time.perf_counter()
        tensors = load_file(f)
        to_host.append(1e3 * (time.perf_counter() - t0))
        del tensors
    return dict(device=str(device), files=len(files), device_ms=to_device, host_ms=to_host,
                device_p50_ms=percentile(to_device, 50), device_p99_ms=percentile(to_device, 99),
                host_p50_ms=percentile(to_host, 50), host_p99_ms=percentile(to_host, 99))


# ----------------------------------------------------------------------------------------
# The churn thread (admin calls only: it never touches the engine)
# ----------------------------------------------------------------------------------------


class Churn:
    """Registers, pages in and unloads adapters on its own thread, one at a time.

    Page-in happens on the engine thread (this bench's main thread): in "request" mode the
    thread hands each new name to `requests`, which the main loop turns into a short request;
    in "pin" mode it registers pinned and unpins once loaded. It waits for the registry's
    "load_gpu" event (set by `on_event`, no polling) and unloads the oldest churned adapters
    beyond `window` live ones. `stop` lets it finish the adapter in hand and exit; `abort`
    exits at once (within 0.1 s), for failures and shutdown."""

    def __init__(self, registry: AdapterRegistry, files: list[Path], mode: str, window: int, timeout: float):
        self.registry, self.files, self.mode, self.window, self.timeout = registry, files, mode, window, timeout
        self.requests: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.loads: list[dict] = []      # recorded page-ins
        self.errors: list[str] = []
        self.events: Counter[str] = Counter()
        self.churn_gpu_events = 0        # "load_gpu" of churned adapters
        self.live: deque[str] = deque()  # churned names still registered, oldest first
        self.count = 0                   # adapters registered so far
        self.abort = threading.Event()
        self._pending: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_event(self, kind: str, name: str, seconds: float | None) -> None:
        """The registry's hook: called under its lock, on the engine thread ("load_gpu") or the
        caller of register ("load_host"). Records and signals; never calls back into it."""
        self.events[kind] += 1
        rec = self._pending.get(name)
        if rec is not None and kind in ("load_gpu", "load_failed") and rec["kind"] is None:
            rec["t"], rec["seconds"], rec["kind"] = time.perf_counter(), seconds, kind
            self.churn_gpu_events += kind == "load_gpu"
            rec["event"].set()

    # -- control (main thread) --------------------------------------------------------------

    def start(self, record: bool, block: int | None = None, max_loads: int | None = None) -> None:
        assert self._thread is None, "churn thread already running"
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(record, block, max_loads),
                                        name="hotswap-churn", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the churn thread did not stop within {timeout:.0f} s")
        self._thread = None

    def check(self) -> None:
        if self.errors:
            raise RuntimeError(f"churn thread failed: {self.errors[0]}")

    # -- the thread -------------------------------------------------------------------------

    def _run(self, record: bool, block: int | None, max_loads: int | None) -> None:
        try:
            done = 0
            while not self._stop.is_set() and not self.abort.is_set() and (max_loads is None or done < max_loads):
                self._one(record, block)
                done += 1
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")

    def _one(self, record: bool, block: int | None) -> None:
        i = self.count
        self.count += 1
        name, path = f"churn{i}", self.files[i % len(self.files)]
        rec = self._pending[name] = dict(event=threading.Event(), t=None, seconds=None, kind=None)
        try:
            t0 = time.perf_counter()
            info = self.registry.register(name, path, pin=self.mode == "pin")
            t_reg = time.perf_counter()
            self.live.append(name)
            if self.mode == "request":
                self.requests.put(name)
            deadline = t0 + self.timeout
            while not rec["event"].wait(0.1):  # wakes to notice an abort; not a busy wait
                if self.abort.is_set():
                    return
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{name} not in a GPU slot {self.timeout:.0f} s after register() "
                                       f"(usage {self.registry.usage()})")
        finally:
            self._pending.pop(name, None)
        if rec["kind"] != "load_gpu":
            raise RuntimeError(f"{name}: page-in failed: {self.registry.info(name).error}")
        if self.mode == "pin":
            self.registry.pin(name, False)  # hot now; evictable like any idle adapter
        if record:
            load_ms, read_ms = 1e3 * rec["seconds"], 1e3 * info.read_seconds
            self.loads.append(dict(name=name, file=path.name, block=block, size_bytes=info.size_bytes,
                                   read_ms=read_ms, load_ms=load_ms, dma_ms=load_ms - read_ms,
                                   register_ms=1e3 * (t_reg - t0), wall_ms=1e3 * (rec["t"] - t0),
                                   t_start=t0, t_done=rec["t"]))
        while len(self.live) > self.window:
            self.registry.unload(self.live.popleft())  # drains: gone when its request ends


# ----------------------------------------------------------------------------------------
# The engine loop (main thread)
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepRecord:
    ms: float
    phase: str            # "steady" | "churn"
    block: int
    churn_prefill: bool   # a churn request's prompt was in this step (an eager step)
    churn_decodes: int    # churn requests decoded beside the streams
    load_done: bool       # a churned adapter's page-in completed at this step's start


class Driver:
    """Adds the churn thread's requests, steps the engine and times each step."""

    def __init__(self, engine: Engine, churn: Churn, vocab: int):
        self.engine, self.churn = engine, churn
        self.main_ids: set[str] = set()
        self.main_finished = 0
        self.churn_live: set[str] = set()
        self.churn_bad: list[str] = []
        self.churn_prompt = prompts_for(1, CHURN_PROMPT_LEN, vocab)[0]
        self.steps = 0

    def add_streams(self, prompts: list[list[int]], adapters: list[str], budget: int) -> None:
        for i, (prompt, name) in enumerate(zip(prompts, adapters)):
            rid = f"s{i}"
            self.main_ids.add(rid)
            self.engine.add_request(Request(rid, prompt, SamplingParams(max_tokens=budget, temperature=0.0,
                                                                        ignore_eos=True), name,
                                            on_output=self._on_main))

    def _on_main(self, out) -> None:
        if out.finished:
            self.main_finished += 1

    def _on_churn(self, out) -> None:
        if out.finished:
            self.churn_live.discard(out.request_id)
            if out.finish_reason is not FinishReason.LENGTH:
                self.churn_bad.append(f"{out.request_id}: {out.finish_reason} {out.error or ''}")

    def step(self):
        """One engine step (queued churn requests added first): seconds, schedule, whether a
        churned adapter's page-in completed in it."""
        while True:
            try:
                name = self.churn.requests.get_nowait()
            except queue.Empty:
                break
            rid = f"req-{name}"
            self.engine.add_request(Request(rid, list(self.churn_prompt),
                                            SamplingParams(max_tokens=CHURN_TOKENS, temperature=0.0,
                                                           ignore_eos=True), name, on_output=self._on_churn))
            self.churn_live.add(rid)
        loads = self.churn.churn_gpu_events
        t0 = time.perf_counter()
        self.engine.step()
        seconds = time.perf_counter() - t0
        self.steps += 1
        if self.main_finished:
            raise RuntimeError("a stream finished before the measurement did: its token budget was too small")
        if self.churn_bad:
            raise RuntimeError(f"churn request ended badly: {self.churn_bad[0]}")
        return seconds, self.engine.last_step, self.churn.churn_gpu_events != loads

    def settle(self, deadline_s: float, stop: bool = True) -> int:
        """Stop the churn thread (or, with `stop=False`, let it reach its own end) and step
        (untimed) until it has exited and its requests are done; the streams keep decoding
        meanwhile. Returns the steps taken."""
        if stop:
            self.churn.stop()
        n, deadline = 0, time.perf_counter() + deadline_s
        while self.churn.running() or not self.churn.requests.empty() or self.churn_live:
            self.churn.check()
            if time.perf_counter() > deadline:
                raise RuntimeError(f"churn did not settle within {deadline_s:.0f} s "
                                   f"(thread alive {self.churn.running()}, requests {sorted(self.churn_live)})")
            self.step()
            n += 1
        self.churn.join(5.0)
        self.churn.check()
        return n


def run_block(drv: Driver, phase: str, block: int, nsteps: int, streams: int, records: list[StepRecord],
              timeout: float) -> dict:
    """`nsteps` steps that decode every stream (a churn block also runs until one page-in has
    completed in it); then, for churn, settle."""
    churn = drv.churn
    if phase == "churn":
        churn.start(record=True, block=block)
    loads0, taken, other = len(churn.loads), 0, 0
    t_begin = time.perf_counter()
    while taken < nsteps or (phase == "churn" and len(churn.loads) == loads0):
        churn.check()
        if time.perf_counter() - t_begin > timeout + nsteps:  # a generous bound: fail, never hang
            raise RuntimeError(f"{phase} block {block}: no end after {time.perf_counter() - t_begin:.0f} s")
        seconds, sched, load_done = drv.step()
        if sum(r.request_id in drv.main_ids for r in sched.decodes) != streams:
            other += 1
            continue
        churn_prefill = any(not r.request_id.startswith("s") for r, _ in sched.prefills)
        records.append(StepRecord(1e3 * seconds, phase, block, churn_prefill, len(sched.decodes) - streams,
                                  load_done))
        taken += 1
    t_end = time.perf_counter()
    settle = drv.settle(timeout + 30) if phase == "churn" else 0
    return dict(phase=phase, block=block, steps=taken, other_steps=other, settle_steps=settle,
                seconds=t_end - t_begin, t_begin=t_begin, t_end=t_end, loads=len(churn.loads) - loads0)


def cleanup(drv: Driver | None, engine: Engine | None, registry: AdapterRegistry, churn: Churn, sync) -> dict:
    """Stop the thread, end every request, unload every adapter, and return `usage()`."""
    churn.abort.set()
    churn.stop()
    try:
        churn.join(10.0)
    except RuntimeError as e:
        churn.errors.append(str(e))
    if engine is not None:
        engine.abort_all()
    with contextlib.suppress(queue.Empty):
        while True:
            churn.requests.get_nowait()
    for name in registry.names():
        registry.unload(name, force=True)
    for _ in range(100):  # retire what was draining or still being copied
        if engine is not None:
            engine.step()
        else:
            registry.between_steps()
        sync()
        usage = registry.usage()
        if usage["gpu_slots_used"] == 0 and usage["draining"] == 0 and usage["waiting_for_slot"] == 0:
            break
        time.sleep(0.01)
    return registry.usage()


def usage_clean(usage: dict) -> bool:
    return all(usage[k] == 0 for k in ("registered", "draining", "gpu_slots_used", "gpu_pages_used", "host_adapters",
                                       "waiting_for_slot"))


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


def gen_budget(args, window: int) -> int:
    """Tokens each stream may generate: every planned step, with room for block ends."""
    planned = (args.warmup_steps + 2 * args.steps + 8 * (window + 2) + 16 * 2 * args.blocks
               + -(-args.streams * args.prompt_len // 2048))
    return int(1.25 * planned) + 64


def run(args, cfg, device: torch.device, sync, started: float) -> dict:
    mc = ModelConfig.from_hf(cfg)
    spec = BaseModelSpec.from_hf_config(cfg)
    window = args.gpu_slots - args.resident
    budget = min(gen_budget(args, window), mc.max_model_len - args.prompt_len)
    kv_tokens = (args.streams * (args.prompt_len + budget + BLOCK_SIZE)
                 + (window + 4) * (CHURN_PROMPT_LEN + CHURN_TOKENS + BLOCK_SIZE))
    kv_tokens = int(kv_tokens * 1.03) + BLOCK_SIZE  # the scheduler's admission watermark (1%)

    tmp = tempfile.TemporaryDirectory(prefix="loraplex-hotswap-")
    model = registry = engine = drv = None
    churn: Churn | None = None
    try:
        root = Path(tmp.name)
        resident = write_files(root, "resident", args.resident, spec, args, device, SEED + 20_000)
        files = write_files(root, "churn", args.files, spec, args, device, SEED + 30_000)
        sync()
        file_bytes = (files[0] / WEIGHTS_NAME).stat().st_size
        cached = warm_page_cache(resident + files)
        print(f"[{time.perf_counter() - started:.0f} s] wrote {args.resident} resident + {args.files} churn "
              f"adapter files ({file_bytes / 1e6:.1f} MB of safetensors each) to {root}; read "
              f"{cached / 1e6:.0f} MB once (warm page cache)", flush=True)
        base = baseline_loads(files, device, sync)
        print(f"  baseline safetensors load_file: to {device.type} p50 {base['device_p50_ms']:.2f} ms, "
              f"to host p50 {base['host_p50_ms']:.2f} ms", flush=True)

        model = build_model(SyntheticReader(cfg, device), DTYPE, device)
        print(f"[{time.perf_counter() - started:.0f} s] built {args.model}: {model.resident_bytes() / 1e9:.2f} "
              "GB (NF4 linears, bf16 embedding and lm_head)", flush=True)
        churn = Churn(None, files, args.page_in, window, args.timeout)
        registry = AdapterRegistry(model, spec, RegistryConfig(gpu_slots=args.gpu_slots,
                                                               host_slots=args.resident + window + 2,
                                                               max_rank=args.rank),
                                   on_event=churn.on_event)
        churn.registry = registry
        engine = Engine(model, synthetic_tokenizer(mc.vocab_size), registry,
                        EngineConfig(max_num_seqs=args.streams + window + 4, kv_cache_tokens=kv_tokens,
                                     cuda_graph_max_batch=0 if args.no_cuda_graphs else 256))
        pool = registry.pool
        adapter_bytes = full_adapter_pages(pool.projections, args.rank) * pool.page_bytes  # all linears, real rank
        info = dict(gpu_slots=args.gpu_slots, host_slots=registry.config.host_slots, window=window,
                    slot_row_bytes=adapter_bytes, file_bytes=file_bytes,
                    slots_bytes=pool.num_pages * pool.page_bytes,
                    kv_cache_tokens=engine.allocator.capacity_tokens,
                    kv_bytes=engine.allocator.capacity_tokens * kv_bytes_per_token(mc, DTYPE),
                    token_budget=budget, cuda_graphs=engine.runner.graphs is not None,
                    max_num_seqs=engine.config.max_num_seqs)
        info["memory"] = (f"memory: weights {model.resident_bytes() / 1e9:.2f} GB | adapter pages for "
                          f"{args.gpu_slots} adapters x {adapter_bytes / 1e6:.1f} MB = {info['slots_bytes'] / 1e9:.2f} GB | "
                          f"{info['host_slots']} host copies (pinned on CUDA) up to "
                          f"{registry.host_limit / 1e9:.2f} GB | KV cache "
                          f"{info['kv_cache_tokens']} tokens = {info['kv_bytes'] / 1e9:.2f} GB")
        if device.type == "cuda":
            info["memory"] += f" | free now {torch.cuda.mem_get_info(device)[0] / 1e9:.1f} GB"
        print(info["memory"], flush=True)

        # resident adapters: registered pinned, in their slots before the streams start
        res_names = [f"resident{i}" for i in range(args.resident)]
        for name, path in zip(res_names, resident):
            registry.register(name, path, pin=True)
        for _ in range(1000):
            engine.step()
            sync()
            if all(registry.info(n).tier == "gpu" for n in res_names):
                break
        else:
            raise RuntimeError(f"resident adapters not in GPU slots: {registry.usage()}")

        drv = Driver(engine, churn, mc.vocab_size)
        prompts = prompts_for(args.streams, args.prompt_len, mc.vocab_size)
        drv.add_streams(prompts, [res_names[i % args.resident] for i in range(args.streams)], budget)
        full = 0  # warm-up: prefill, then decode steps of every stream
        while full < args.warmup_steps:
            _, sched, _ = drv.step()
            full += len(sched.decodes) == args.streams and not sched.prefills
        churn.start(record=False, max_loads=window + 2)  # allocates the host rows; warms the paths
        warm_settle = drv.settle(args.timeout * (window + 2) + 30, stop=False)
        print(f"[{time.perf_counter() - started:.0f} s] {args.streams} streams decoding on {args.resident} "
              f"resident adapters; {churn.count} adapters churned as warm-up ({warm_settle} steps)", flush=True)

        records: list[StepRecord] = []
        blocks = []
        per_block = max(1, args.steps // args.blocks)
        order = [p for b in range(args.blocks) for p in (("steady", "churn") if b % 2 == 0 else ("churn", "steady"))]
        for i, phase in enumerate(order):
            blocks.append(run_block(drv, phase, i // 2, per_block, args.streams, records, args.timeout))
            b = blocks[-1]
            print(f"  {phase:<6} block {b['block']}: {b['steps']} steps in {b['seconds']:.2f} s"
                  + (f", {b['loads']} adapters loaded, settled in {b['settle_steps']} steps"
                     if phase == "churn" else ""), flush=True)
        preempted = sum(r.num_preemptions for r in engine.requests.values() if r.request_id in drv.main_ids)
        context_end = args.prompt_len + max(len(r.output_ids) for r in engine.requests.values())
        loads = list(churn.loads)
        events = dict(churn.events)
    finally:  # also after a failure: no thread, request or adapter is left behind
        try:
            usage = cleanup(drv, engine, registry, churn, sync) if registry is not None else None
        finally:
            if registry is not None:
                registry.close()
            tmp.cleanup()
    return dict(info=info, baseline=base, records=[dataclasses.asdict(r) for r in records], blocks=blocks,
                loads=loads, events=events, usage_end=usage, churn_errors=list(churn.errors),
                usage_clean=usage_clean(usage) and not churn.errors, preemptions=preempted,
                context_end=context_end, churned_total=churn.count)


def summarize(r: dict) -> dict:
    recs = r["records"]
    steady = [x["ms"] for x in recs if x["phase"] == "steady"]
    churn = [x["ms"] for x in recs if x["phase"] == "churn"]
    clean = [x["ms"] for x in recs if x["phase"] == "churn" and not x["churn_prefill"]]

    def p(values, q):
        return percentile(values, q) if values else None

    s = dict(steady_steps=len(steady), churn_steps=len(churn), churn_prefill_steps=len(churn) - len(clean),
             churn_load_done_steps=sum(x["load_done"] for x in recs if x["phase"] == "churn"),
             itl_steady_p50_ms=p(steady, 50), itl_steady_p99_ms=p(steady, 99),
             itl_churn_p50_ms=p(churn, 50), itl_churn_p99_ms=p(churn, 99),
             itl_churn_noprefill_p50_ms=p(clean, 50), itl_churn_noprefill_p99_ms=p(clean, 99))
    s["itl_p99_ratio"] = s["itl_churn_p99_ms"] / s["itl_steady_p99_ms"] if steady and churn else None
    s["itl_p99_ratio_noprefill"] = (s["itl_churn_noprefill_p99_ms"] / s["itl_steady_p99_ms"]
                                    if steady and clean else None)
    loads = r["loads"]
    for key in ("load_ms", "read_ms", "dma_ms", "wall_ms", "register_ms"):
        vals = [x[key] for x in loads]
        s[f"{key[:-3]}_p50_ms"], s[f"{key[:-3]}_p99_ms"] = p(vals, 50), p(vals, 99)
    churn_blocks = [b for b in r["blocks"] if b["phase"] == "churn"]
    churn_s = sum(b["seconds"] for b in churn_blocks)
    done_in = sum(any(b["t_begin"] <= x["t_done"] <= b["t_end"] for b in churn_blocks) for x in loads)
    s["loads"], s["churn_seconds"] = len(loads), churn_s
    s["loads_per_s"] = done_in / churn_s if churn_s > 0 else None
    dma = s["dma_p50_ms"]
    s["dma_gb_s_p50"] = r["info"]["slot_row_bytes"] / (dma * 1e-3) / 1e9 if dma else None
    base = r["baseline"]["device_p50_ms"]
    s["load_over_baseline_p50"] = s["load_p50_ms"] / base if loads and base else None
    return s


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def header_lines(env: dict[str, str], args, cfg) -> list[str]:
    mode = "SMOKE (harness check only, not performance)" if args.smoke else "full"
    targets = "all seven linears" if args.targets == "all" else "q/v only"
    return [f"# hot-swap benchmark, {mode}",
            f"date {env['date']} | device {env['device']}",
            f"torch {env['torch']} | triton {env['triton']} | ours: {env['ours']}",
            (f"model {args.model} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab "
             f"{cfg.vocab_size}, random NF4) | {args.streams} streams x {args.prompt_len} prompt, decoding "
             f"(greedy, ignore_eos) over {args.resident} pinned adapters | rank-{args.rank} adapters on {targets} | "
             f"{args.gpu_slots} GPU slots | page-in by {args.page_in}")]


def itl_table(s: dict) -> list[str]:
    def row(label, n, p50, p99, ratio):
        return [label, str(n), fmt(p50, ".3f"), fmt(p99, ".3f"), fmt(ratio, ".3f")]

    return markdown(["phase", "steps", "ITL p50 ms", "ITL p99 ms", "p99 / steady p99"], [
        row("steady", s["steady_steps"], s["itl_steady_p50_ms"], s["itl_steady_p99_ms"], 1.0 if s["steady_steps"] else None),
        row("churn (all steps)", s["churn_steps"], s["itl_churn_p50_ms"], s["itl_churn_p99_ms"], s["itl_p99_ratio"]),
        row("churn, steps without a churn prefill", s["churn_steps"] - s["churn_prefill_steps"],
            s["itl_churn_noprefill_p50_ms"], s["itl_churn_noprefill_p99_ms"], s["itl_p99_ratio_noprefill"]),
    ], numeric={1, 2, 3, 4})


def load_table(s: dict, base: dict, device: torch.device) -> list[str]:
    return markdown([f"adapter load ({s['loads']} loads)", "p50 ms", "p99 ms"], [
        ["work: file -> GPU slot (info.load_seconds)", fmt(s["load_p50_ms"], ".2f"), fmt(s["load_p99_ms"], ".2f")],
        ["  read + validate + pack (info.read_seconds)", fmt(s["read_p50_ms"], ".2f"), fmt(s["read_p99_ms"], ".2f")],
        ["  host row -> GPU slot DMA", fmt(s["dma_p50_ms"], ".3f"), fmt(s["dma_p99_ms"], ".3f")],
        ["wall: register() call -> in a GPU slot", fmt(s["wall_p50_ms"], ".2f"), fmt(s["wall_p99_ms"], ".2f")],
        ["  register() call alone", fmt(s["register_p50_ms"], ".2f"), fmt(s["register_p99_ms"], ".2f")],
        [f"baseline: safetensors load_file(device=\"{device.type}\")", f"{base['device_p50_ms']:.2f}",
         f"{base['device_p99_ms']:.2f}"],
        ["baseline: safetensors load_file to host", f"{base['host_p50_ms']:.2f}", f"{base['host_p99_ms']:.2f}"],
    ], numeric={1, 2})


def targets(s: dict, args) -> list[Target]:
    tag = f"rank-{args.rank} {args.model} adapter ({args.targets}) from a warm page cache"
    return [Target(f"ITL p99 with churn / steady ({args.streams} streams)", s["itl_p99_ratio"], "x", "<=", 1.2),
            Target(f"{tag}: load p99, file -> GPU slot work", s["load_p99_ms"], " ms", "<=", 50),
            Target(f"{tag}: load p99, register() -> in a GPU slot wall", s["wall_p99_ms"], " ms", "<=", 50)]


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default=None, help="llama2-7b (default) or tiny (smoke)")
    p.add_argument("--streams", type=int, default=None, help="decoding streams (default 64; smoke 4)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per phase, steady and churn each (default 200; smoke 16)")
    p.add_argument("--blocks", type=int, default=None,
                   help="blocks per phase, alternating A B B A ... (default 4; smoke 2)")
    p.add_argument("--resident", type=int, default=None, help="pinned adapters the streams use (default 8; smoke 2)")
    p.add_argument("--gpu-slots", type=int, default=None, help="GPU adapter slots (default resident + 4)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter (default 16)")
    p.add_argument("--targets", choices=list(TARGETS), default="all",
                   help="linears the adapters adapt: all seven (default) or q/v only")
    p.add_argument("--page-in", choices=("request", "pin"), default="request",
                   help="how a churned adapter gets to a GPU slot: a short request on it (default) or pin")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per stream (default 128; smoke 16)")
    p.add_argument("--files", type=int, default=None, help="distinct churn adapter files (default 16; smoke 6)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed decode steps first (default 16; smoke 2)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one page-in may take before failing (60)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the engine without decode CUDA graphs")
    p.add_argument("--device", default=None, help="torch device (default cuda; cpu for --smoke without CUDA)")
    p.add_argument("--out", "--json", dest="out", default=str(DEFAULT_OUT),
                   help="where to write every result as JSON (default bench/out/hotswap.json)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model and step counts on whatever device there is (CPU): checks the harness only")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu_slots is None:
        args.gpu_slots = args.resident + 4
    if min(args.streams, args.steps, args.blocks, args.resident, args.prompt_len, args.files) < 1:
        p.error("--streams, --steps, --blocks, --resident, --prompt-len and --files must be >= 1")
    if not 1 <= args.rank <= 128:
        p.error("--rank must be in 1..128")
    # pins leave one slot free (the registry's rule); pin mode pins one churned adapter beside them
    need = args.resident + (2 if args.page_in == "pin" else 1)
    if args.gpu_slots < need:
        p.error(f"--gpu-slots must be at least {need} with {args.resident} resident adapters "
                f"(page-in by {args.page_in})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else bench_device(args.smoke, "hotswap")
    if device is None:
        return 2
    started = time.perf_counter()
    cuda = device.type == "cuda"
    if not cuda:
        # two threads doing tensor work (the engine's and the churn thread) each start an
        # OpenMP team of torch.get_num_threads() threads; on a small CPU their spin-waits
        # oversubscribe it (steps of a few ms took 250 ms on 2 cores)
        torch.set_num_threads(1)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    cfg = hf_config(args.model)
    env = environment(device, None)
    env.pop("bitsandbytes", None)
    env["ours"] = "Triton kernels" if cuda and runtime.use_triton(device) else "PyTorch reference kernels"
    header = header_lines(env, args, cfg)
    print("\n".join(header), flush=True)

    # On CPU the Triton interpreter would take minutes for whole engine runs: references stand in.
    with runtime.reference_kernels() if not cuda else contextlib.nullcontext():
        result = run(args, cfg, device, sync, started)
    s = summarize(result)
    goals = targets(s, args) if cuda else []
    elapsed = time.perf_counter() - started
    info, base = result["info"], result["baseline"]

    print("", *header, info["memory"],
          (f"engine: decode CUDA graphs {'on' if info['cuda_graphs'] else 'off'}, max_num_seqs "
           f"{info['max_num_seqs']}, KV cache {info['kv_cache_tokens']} tokens; context at the end "
           f"{result['context_end']} tokens; stream preemptions {result['preemptions']}"),
          (f"adapter: {info['file_bytes'] / 1e6:.2f} MB safetensors file; GPU pages (DMA size, all "
           f"linears at its rank) {info['slot_row_bytes'] / 1e6:.2f} MB"),
          "", *itl_table(s), "", *load_table(s, base, device), "", sep="\n")
    print(f"churn: {s['loads']} adapters loaded in {s['churn_seconds']:.2f} s of churn blocks = "
          f"{fmt(s['loads_per_s'], '.1f')} loads/s ({result['churned_total']} registered in all, warm-up "
          f"included); {s['churn_prefill_steps']} of {s['churn_steps']} churn steps held a churn prefill; "
          f"events {result['events']}")
    print(f"DMA p50 {fmt(s['dma_p50_ms'], '.3f')} ms for {info['slot_row_bytes'] / 1e6:.1f} MB = "
          f"{fmt(s['dma_gb_s_p50'], '.1f')} GB/s; our load work p50 / baseline load_file p50 = "
          f"{fmt(s['load_over_baseline_p50'], '.2f')}x")
    print(f"usage at the end: {result['usage_end']} ({'clean' if result['usage_clean'] else 'NOT CLEAN'})"
          + "".join(f"\nchurn thread: {e}" for e in result["churn_errors"]))
    if goals:
        print("targets:")
        print("\n".join("  " + g.line() for g in goals))
    else:
        print(f"targets: judged on CUDA only (this run: {device.type}"
              + (", smoke mode: the numbers mean nothing)" if args.smoke else ")"))
    print(f"\n{elapsed:.1f} s")

    report = dict(env=env, args=vars(args), config=cfg.to_dict(), summary=s, **result, seconds=elapsed,
                  targets=[dict(dataclasses.asdict(g), verdict=g.verdict()) for g in goals])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return 0 if result["usage_clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
