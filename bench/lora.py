"""Benchmark loraplex's multi-adapter LoRA, slot and paged kernels, against a per-adapter loop and bmm.

For the projections of Llama-2-7B (q/k/v fused into one stack of three slices, o, gate/up
fused into two slices, down), T tokens in {1, 16, 64, 256, 1024}, {1, 8, 64} distinct
adapters (token -> adapter uniform, or Zipf-skewed), rank 16 and 64, one stack of S = 64
slots, one run measures per point (time to add every token's delta into y):

1. loop     PEFT's mixed-batch path: for each adapter present, its token indices are built on
            the host from the per-token adapter list (as PEFT does from `adapter_names`, per
            call), then per slice `y[idx, slice] += (x[idx] @ A.T) @ B.T * scaling` in plain
            torch ops. (A little kinder than PEFT, which rebuilds the indices per module:
            here one index tensor per adapter serves all slices of a fused projection.)
2. bmm      torch gathered bmm: `A[slot_ids]` [T, L*R, K] and `B[slot_ids]` [T, N, R]
            gathered from the stack, `torch.bmm` shrink, then per slice a scaled bmm expand
            added into y; base-model tokens (slot -1) use slot 0 with zero scaling. Skipped
            ("skip (memory)") when the gathered tensors would exceed --bmm-limit-bytes.
3. ours     the slot kernels: `apply_lora(x, y, stack, meta)` on the stack (rank capacity
            R = padded_rank(rank)), with `meta = BatchMeta.build(...)` made outside the timed
            region (the engine builds it once per step for all layers); the time of
            `BatchMeta.build` itself is reported once per T.
4. paged    `apply_paged_lora(x, y, pool view, meta)` on a `LoRAPagePool` holding the same
            adapters (the same meta): each slot packed and put in through `LoRAPagePool.load`
            in shuffled slot order, then every page moved to a random place and the table
            rewritten (scattered pages: no rank-row's pages are neighbours). The pool's rank
            bound is 256 (the server's default), so the wider h and rank grid are paid for.
            `--paged all` (default) times it at every point, `--paged targets` only at the
            points of targets (d) and (e), `--paged none` nowhere.
5. floor    bytes that must move: the present adapters' A and B at their real rank over
            all slices (adapters * rank * (K * L + N) * 2), x read once (T * K * 2) and y
            read + written (2 * T * N * 2), over the copy bandwidth of a 1 GiB clone
            measured in the same run. The same floor serves both kernels.

It prints per point the times (us), ours' speed-up over the loop and over bmm, ours / floor,
paged / ours and paged / floor. Side by side with NF4: for Llama-2-7B o_proj (N = K = 4096)
at M = T = 64 with one rank-16 adapter, `nf4_matmul(x, w)` alone vs `nf4_matmul` +
`apply_lora`, eager and captured in a CUDA graph; the added fraction is reported.

Adapter memory (arithmetic, no GPU; `--memory` prints only this, and every run prints it):
for 8 GiB of bf16 adapter memory on Llama-2-7B and Llama-3-8B (32 layers, shapes of MODELS),
(i) slots: every slot is a full row on all linears at rank capacity 64 (what accepting ranks
up to 64 takes; 16 for reference), adapters = 8 GiB // row bytes; (ii) paged: ranks
{4, 8, 16, 32, 64} x targets {q/v, all-linear} in turn, each taking `LoRAPagePool.pages_for`
pages of the real page width, until the next does not fit. Per kind, its pages and MB
against the slot row; the page width, bytes per page and the page table beside the pages.

Page-in (`--page-in` prints only this, for --models; a run prints it for its first model,
unless --no-page-in): a rank-8 q/v-only adapter through `LoRAPagePool.load` from its
`PackedAdapter` (a pool sized for it; copies = its page runs + table, record and scaling)
against one slot row `Tensor.copy_` at capacity 16 and 64 on all linears, real shapes. CUDA:
pinned host -> GPU, non_blocking, the `loop` timer below; CPU: host -> host on one
thread, wall clock, median of 9. Each rotates among copies exceeding --l2-bytes.

Targets (PASS/FAIL):

(a) T = 64, 64 distinct rank-16 adapters, uniform, each projection: ours >= 100x faster
    than the loop, and ours <= 1.5x the byte floor
(b) NF4 side by side: LoRA adds <= 10% to the NF4 product (eager and CUDA graph)
(c) ours never slower than gathered bmm at any point of the grid (violations listed)
(d) at (a)'s point and at T = 64 on one rank-16 adapter, each projection: paged <= 1.1x
    the slot kernels' time
(e) same points: paged <= 1.65x the byte floor (1.1x (a)'s 1.5x)

Timing: as in bench/nf4_matmul.py (whose timers, copy bandwidth, graph capture and target
helpers this script imports). Every method rotates among enough copies of the stacked
weights (and, side by side, of the NF4 weight) that their total exceeds --l2-bytes, so
each call reads HBM. `loop` timer: CUDA events around back-to-back calls, median of
--samples samples (the per-adapter loop, whose calls take milliseconds, uses
--loop-samples). Before timing, each point is checked on a sample of up to 32 tokens: ours,
paged, the loop and bmm against `lora_delta_ref` of the slot stack (relative error of the
delta <= 2e-2); a mismatch aborts the run.

Run:
    python bench/lora.py                      # on a CUDA GPU machine (full run)
    python bench/lora.py --ts 64 --distinct 64 --ranks 16 --assign uniform   # target (a) only
    python bench/lora.py --memory             # anywhere: adapters per 8 GiB, slots vs pages
    python bench/lora.py --page-in --models llama2-7b,llama3-8b   # anywhere: page-in vs row copy
    python bench/lora.py --smoke              # anywhere (CPU): harness check only
    TRITON_INTERPRET=1 python bench/lora.py --smoke   # real Triton kernels, interpreted
`--smoke` uses tiny shapes (K = 128, slices (64, 32, 32) and (64,)), T in {1, 16}, 1 or 4
adapters, rank 16, S = 8, every 4th token on the base model, wall-clock timing, no tuning
and no CUDA graph, paged at targets (d)/(e)'s points (T = 16 on 4 adapters and on one), and
page-in on a 2-layer model of those shapes; its numbers say nothing about performance.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from loraplex.kernels import runtime  # noqa: E402
from loraplex.kernels.lora import BatchMeta, LoRAStack, apply_lora, lora_delta_ref, padded_rank  # noqa: E402
from loraplex.kernels.lora_paged import PagedLoRA, apply_paged_lora  # noqa: E402
from loraplex.kernels.lora_pool import LoRAPagePool, Projection, full_adapter_pages  # noqa: E402
from loraplex.kernels.nf4 import quantize_nf4  # noqa: E402
from loraplex.kernels.nf4_matmul import nf4_matmul, tune  # noqa: E402
from loraplex.kernels.workspace import Workspace  # noqa: E402
from loraplex.model.llama import FUSED_LINEARS  # noqa: E402

from bench.nf4_matmul import (Target, bench_device, capture, copies_for, copy_bandwidth, fmt,  # noqa: E402
                              loop_timer, markdown, plan_label, rel_error, wall_timer)

# model -> projection -> (K, output slices)
MODELS: dict[str, dict[str, tuple[int, tuple[int, ...]]]] = {
    "llama2-7b": {"qkv": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)),
                  "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))},
    "llama3-8b": {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)),
                  "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))},
}
SMOKE_MODELS = {"smoke": {"qkv": (128, (64, 32, 32)), "o": (128, (64,))}}
FULL = dict(ts=(1, 16, 64, 256, 1024), distinct=(1, 8, 64), ranks=(16, 64), slots=64, side_m=64, paged="all")
SMOKE = dict(ts=(1, 16), distinct=(1, 4), ranks=(16,), slots=8, side_m=16, paged="targets")
ASSIGNS = ("uniform", "zipf")
DTYPE = torch.bfloat16
REL_TOL = 2e-2   # ||delta - ref|| / ||ref|| on the sampled tokens
CHECK_TOKENS = 32
SIDE_MODEL = "llama2-7b"
SIDE_RANK = 16
LAYERS = {"llama2-7b": 32, "llama3-8b": 32, "smoke": 2}
# MODELS' projections by their names in the model (FUSED_LINEARS: the HF linears each holds)
PROJ_MODULE = {"qkv": "qkv_proj", "o": "o_proj", "gate_up": "gate_up_proj", "down": "down_proj"}
PAGED_MAX_RANK = 256      # the server's default rank bound: the paged kernels' h and rank grid span it
PAGED_WHERE = {"all": "every point", "targets": "the points of targets (d) and (e)", "none": "no point"}
SLOT_FLOOR_GOAL = 1.5     # target (a): slot kernels / byte floor
PAGED_GOAL = 1.1          # targets (d), (e): paged within 10% of the slot kernels and of their floor goal
MEMORY_BYTES = 8 << 30    # adapter memory of the memory figures
MEMORY_RANKS = (4, 8, 16, 32, 64)
MEMORY_TARGETS = ("q/v", "all-linear")
SLOT_CAPACITIES = (64, 16)  # 64: what accepting ranks up to 64 takes; 16: for reference
QV_KEYS = ("self_attn.q_proj", "self_attn.v_proj")
PAGE_IN_RANK = 8          # page-in: a rank-8 q/v-only adapter


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------


def ours_backend(device: torch.device) -> str:
    if runtime.use_triton(device):
        return "Triton" + (" (interpreted)" if device.type == "cpu" else "")
    return "torch reference (no Triton on this device)"


def environment(device: torch.device) -> dict[str, str]:
    triton = runtime.triton
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, no CUDA)",
        "torch": torch.__version__,
        "triton": triton.__version__ if triton is not None else "not installed",
        "triton_interpret": str(runtime.INTERPRET),
        "ours": ours_backend(device),
    }


def header_lines(env: dict[str, str], args) -> list[str]:
    mode = "SMOKE (harness check only, not performance)" if args.smoke else "full"
    return [
        f"# lora benchmark, {mode}",
        f"date {env['date']} | device {env['device']}",
        f"torch {env['torch']} | triton {env['triton']} | TRITON_INTERPRET={env['triton_interpret']}"
        f" | ours: {env['ours']}",
        f"timer {args.timer} | samples {args.samples} (loop method {args.loop_samples})"
        f" | l2-bytes {args.l2_bytes} | slots {args.slots} | bmm-limit-bytes {args.bmm_limit_bytes}"
        f" | base tokens every {args.base_every or '-'}",
        f"paged kernels timed at {PAGED_WHERE[args.paged]} (pool max rank {PAGED_MAX_RANK}, "
        f"pages scattered at random)",
    ]


# ----------------------------------------------------------------------------------------
# Stacks, token assignments
# ----------------------------------------------------------------------------------------


def make_stacks(k: int, slices: tuple[int, ...], rank: int, slots: int, device: torch.device,
                l2_bytes: int) -> list[LoRAStack]:
    """A stack with every slot holding a random rank-`rank` adapter on every slice, plus
    clones (own memory, same values) until all copies together exceed `l2_bytes`."""
    stack = LoRAStack.allocate(slots, k, slices, rank, DTYPE, device)
    for s in range(slots):
        stack.set_slot(s, [(torch.randn(rank, k, device=device, dtype=DTYPE) / math.sqrt(k),
                            torch.randn(n_l, rank, device=device, dtype=DTYPE) * 0.05,
                            2.0 * (1 + 0.25 * ((s + l) % 4)))  # alpha / r around 2
                           for l, n_l in enumerate(slices)])
    per_copy = (stack.a.numel() + stack.b.numel()) * stack.a.element_size()
    copies = [stack] + [dataclasses.replace(stack, a=stack.a.clone(), b=stack.b.clone())
                        for _ in range(copies_for(per_copy, l2_bytes) - 1)]
    return copies


def slot_modules(stack: LoRAStack, slot: int, keys: tuple[str, ...]) -> dict[str, SimpleNamespace]:
    """The adapter in one slot of a stack as `LoRAPagePool.pack` takes it (host tensors)."""
    r_max, starts = stack.max_rank, stack.slice_starts.tolist()
    ranks, scalings = stack.rank[slot].tolist(), stack.scaling[slot].tolist()
    return {key: SimpleNamespace(a=stack.a[slot, l * r_max: l * r_max + r].cpu(),
                                 b=stack.b[slot, starts[l]: starts[l + 1], :r].cpu(), scaling=scalings[l])
            for l, (key, r) in enumerate(zip(keys, ranks)) if r}


def scatter(pool: LoRAPagePool, g: torch.Generator) -> None:
    """Move every page to a random place and rewrite the table to match: no rank-row's pages
    are neighbours any more (the kernels' worst case). The pool's host mirror of the table
    goes stale, which only compaction reads: these pools are never compacted."""
    perm = torch.randperm(pool.num_pages, generator=g).to(pool.device)
    pool.pages[perm] = pool.pages.clone()
    pool.table.copy_(perm[pool.table.long()].to(torch.int32))


def make_paged(stack: LoRAStack, proj: str, k: int, slices: tuple[int, ...], device: torch.device,
               l2_bytes: int, seed: int) -> list[PagedLoRA]:
    """A page pool (rank bound PAGED_MAX_RANK) holding `stack`'s adapters: each slot packed and
    loaded through `LoRAPagePool.load` in shuffled slot order, then the pages scattered; plus
    clones of pages and table until all copies together exceed `l2_bytes`."""
    projection = Projection(tuple(f"{proj}.{l}" for l in range(len(slices))), k, slices)
    top = int(stack.rank.max())
    pool = LoRAPagePool([projection], stack.num_slots, PAGED_MAX_RANK,
                        stack.num_slots * full_adapter_pages([projection], top), DTYPE, device)
    g = torch.Generator().manual_seed(seed)
    for s in torch.randperm(stack.num_slots, generator=g).tolist():
        pool.load(s, pool.pack(slot_modules(stack, s, projection.keys), pin=False))
    scatter(pool, g)
    view = pool.stacks[0]
    per_copy = view.pages.numel() * view.pages.element_size() + view.table.numel() * 4
    return [view] + [dataclasses.replace(view, pages=view.pages.clone(), table=view.table.clone())
                     for _ in range(copies_for(per_copy, l2_bytes) - 1)]


def assign(t: int, distinct: int, how: str, zipf_s: float, base_every: int, seed: int) -> list[int]:
    """Slot of each token (host list; -1 = base model). uniform: every adapter gets T/d
    tokens (round-robin) in random order; zipf: P(adapter i) ~ 1 / (i + 1)^s, seeded."""
    g = torch.Generator().manual_seed(seed)
    if how == "uniform":
        ids = (torch.arange(t) % distinct)[torch.randperm(t, generator=g)]
    else:
        p = 1.0 / torch.arange(1, distinct + 1, dtype=torch.float64) ** zipf_s
        ids = torch.multinomial(p, t, replacement=True, generator=g)
    ids = ids.tolist()
    if base_every:
        ids = [-1 if i % base_every == base_every - 1 else s for i, s in enumerate(ids)]
    return ids


def point_seed(seed: int, t: int, distinct: int, how: str) -> int:
    return seed * 1_000_003 + t * 1009 + distinct * 31 + ASSIGNS.index(how)


# ----------------------------------------------------------------------------------------
# The three methods: factories of closures (one per stack copy) adding the deltas into y
# ----------------------------------------------------------------------------------------


def loop_fn(x: torch.Tensor, y: torch.Tensor, stack: LoRAStack, host_ids: list[int],
            scalings: list[list[float]]) -> Callable[[], None]:
    """PEFT's mixed-batch forward over a fused stack: per adapter present, per slice."""
    r_max = stack.max_rank
    starts = stack.slice_starts.tolist()
    ranks = stack.rank.tolist()
    n_slices, device = stack.num_slices, x.device

    def run():
        for s in sorted(set(host_ids) - {-1}):  # PEFT: unique adapter names, base skipped
            idx = torch.tensor([i for i, a in enumerate(host_ids) if a == s], device=device)
            xs = x[idx]
            for l in range(n_slices):
                r = ranks[s][l]
                if not r:
                    continue
                a = stack.a[s, l * r_max: l * r_max + r]
                b = stack.b[s, starts[l]: starts[l + 1], :r]
                y[idx, starts[l]: starts[l + 1]] += (xs @ a.T) @ b.T * scalings[s][l]

    return run


def bmm_bytes(t: int, stack: LoRAStack) -> int:
    """Bytes the gathered bmm materializes: A and B per token (plus h, negligible)."""
    per_token = stack.a.shape[1] * stack.a.shape[2] + stack.b.shape[1] * stack.b.shape[2]
    return t * per_token * stack.a.element_size()


def bmm_fn(x: torch.Tensor, y: torch.Tensor, stack: LoRAStack, sid: torch.Tensor,
           live: torch.Tensor) -> Callable[[], None]:
    """Gathered bmm. `sid` [T] int64 slot per token with base tokens on slot 0, `live` [T, 1]
    fp32 (0 for base tokens): both per step, made once outside the timed region."""
    r_max = stack.max_rank
    starts = stack.slice_starts.tolist()
    t = x.shape[0]

    def run():
        scale = (stack.scaling[sid] * live).to(x.dtype)       # [T, L], per layer
        h = torch.bmm(stack.a[sid], x.unsqueeze(2))           # [T, L*R, 1]
        b = stack.b[sid]                                      # [T, N, R]
        for l in range(stack.num_slices):
            hl = h[:, l * r_max: (l + 1) * r_max] * scale[:, l].view(t, 1, 1)
            y[:, starts[l]: starts[l + 1]] += torch.bmm(b[:, starts[l]: starts[l + 1]], hl).squeeze(2)

    return run


def ours_fn(x: torch.Tensor, y: torch.Tensor, stack: LoRAStack,
            meta: BatchMeta) -> Callable[[], torch.Tensor]:
    return lambda: apply_lora(x, y, stack, meta)


def paged_fn(x: torch.Tensor, y: torch.Tensor, stack: PagedLoRA,
             meta: BatchMeta) -> Callable[[], torch.Tensor]:
    return lambda: apply_paged_lora(x, y, stack, meta)


# ----------------------------------------------------------------------------------------
# One point
# ----------------------------------------------------------------------------------------


def check(name: str, what: str, run_on: Callable[[torch.Tensor], Callable[[], object]], x: torch.Tensor,
          n: int, sample: torch.Tensor, ref: torch.Tensor) -> float:
    """Run one method once into a zero y; abort the run if its delta on `sample` is off."""
    y0 = torch.zeros(x.shape[0], n, dtype=DTYPE, device=x.device)
    run_on(y0)()
    err = rel_error(y0[sample].float(), ref)
    if not err <= REL_TOL:  # `not <=` also catches NaN
        raise SystemExit(f"WRONG RESULT: {what} for {name}: relative error of the delta {err:.3g} > "
                         f"{REL_TOL} against lora_delta_ref on {sample.numel()} sampled tokens; "
                         "not timing a wrong method")
    return err


def floor_bytes(present: int, rank: int, k: int, slices: tuple[int, ...],
                lora_tokens: int) -> tuple[int, int]:
    n = sum(slices)
    weights = present * rank * (k * len(slices) + n) * 2
    acts = lora_tokens * k * 2 + 2 * lora_tokens * n * 2
    return weights, acts


def paged_here(t: int, distinct: int, how: str, rank: int, args) -> bool:
    """Whether this point times the paged kernels (--paged all, or targets: the (d)/(e) points)."""
    return args.paged == "all" or (args.paged == "targets" and how == "uniform"
                                   and (t, distinct, rank) in args.paged_points)


def measure_point(model: str, proj: str, k: int, slices: tuple[int, ...], rank: int, stacks: list[LoRAStack],
                  paged: list[PagedLoRA] | None, t: int, distinct: int, how: str, device: torch.device, args,
                  copy_bw: float) -> dict:
    timer, slow_timer = args.timer_fn, args.slow_timer_fn
    n = sum(slices)
    host_ids = assign(t, distinct, how, args.zipf_s, args.base_every, point_seed(args.seed, t, distinct, how))
    present = len(set(host_ids) - {-1})
    lora_tokens = sum(1 for s in host_ids if s >= 0)
    name = (f"{model}/{proj} K={k} N={'+'.join(map(str, slices))} T={t} "
            f"adapters={distinct} ({present} present) "
            f"{how} r={rank}")
    slot_ids = torch.tensor(host_ids, dtype=torch.int32, device=device)
    meta = BatchMeta.build(slot_ids, stacks[0].num_slots)                      # once per step
    sid = slot_ids.long().clamp(min=0)                                         # once per step (bmm)
    live = (slot_ids >= 0).to(torch.float32).unsqueeze(1)
    scalings = stacks[0].scaling.tolist()                                      # PEFT's float scalings
    x = torch.randn(t, k, device=device, dtype=DTYPE)

    g = torch.Generator().manual_seed(point_seed(args.seed, t, distinct, how) + 7)
    sample = torch.randperm(t, generator=g)[:CHECK_TOKENS].sort().values.to(device)
    ref = lora_delta_ref(x[sample], stacks[0], slot_ids[sample])
    do_bmm = bmm_bytes(t, stacks[0]) <= args.bmm_limit_bytes
    errs = dict(
        ours=check(name, "apply_lora", lambda y0: ours_fn(x, y0, stacks[0], meta), x, n, sample, ref),
        loop=check(name, "per-adapter loop", lambda y0: loop_fn(x, y0, stacks[0], host_ids, scalings),
                   x, n, sample, ref),
        bmm=check(name, "gathered bmm", lambda y0: bmm_fn(x, y0, stacks[0], sid, live), x, n, sample, ref)
        if do_bmm else None,
    )
    do_paged = paged is not None and paged_here(t, distinct, how, rank, args)
    if do_paged:  # the same adapters in pages: the slots' oracle holds for them too
        errs["paged"] = check(name, "apply_paged_lora", lambda y0: paged_fn(x, y0, paged[0], meta),
                              x, n, sample, ref)

    y = torch.zeros(t, n, dtype=DTYPE, device=device)
    t_ours = timer([ours_fn(x, y, st, meta) for st in stacks])
    t_bmm = timer([bmm_fn(x, y, st, sid, live) for st in stacks]) if do_bmm else None
    t_paged = timer([paged_fn(x, y, pv, meta) for pv in paged]) if do_paged else None
    t_loop = slow_timer([loop_fn(x, y, st, host_ids, scalings) for st in stacks])
    w_bytes, a_bytes = floor_bytes(present, rank, k, slices, lora_tokens)
    floor_us = (w_bytes + a_bytes) / copy_bw * 1e6
    row = dict(model=model, proj=proj, k=k, slices=list(slices), n=n, t=t, distinct=distinct, present=present,
               assign=how, rank=rank, lora_tokens=lora_tokens, us_loop=t_loop, us_bmm=t_bmm, us_ours=t_ours,
               bmm_skipped=None if do_bmm
               else f"gathered tensors {bmm_bytes(t, stacks[0])} B > bmm-limit-bytes",
               floor_weight_bytes=w_bytes, floor_act_bytes=a_bytes, us_floor=floor_us,
               x_loop=t_loop / t_ours, x_bmm=None if t_bmm is None else t_bmm / t_ours,
               ours_over_floor=t_ours / floor_us, copies=len(stacks), max_tiles=meta.max_tiles,
               us_paged=t_paged, paged_over_ours=None if t_paged is None else t_paged / t_ours,
               paged_over_floor=None if t_paged is None else t_paged / floor_us,
               paged_copies=len(paged) if do_paged else None, block_t=meta.block_t, rel_err=errs)
    return row


def meta_build_time(t: int, distinct: int, slots: int, device: torch.device, args) -> dict:
    """`BatchMeta.build` once per step: uniform assignment over the most adapters measured."""
    host_ids = assign(t, distinct, "uniform", args.zipf_s, args.base_every,
                      point_seed(args.seed, t, distinct, "uniform"))
    slot_ids = torch.tensor(host_ids, dtype=torch.int32, device=device)
    us = args.timer_fn([lambda: BatchMeta.build(slot_ids, slots)])
    return dict(t=t, distinct=distinct, slots=slots, us_build=us)


# ----------------------------------------------------------------------------------------
# Side by side with NF4
# ----------------------------------------------------------------------------------------


def side_by_side(k: int, n: int, m: int, device: torch.device, args) -> dict:
    """nf4_matmul alone vs nf4_matmul + apply_lora (one adapter, all M tokens on slot 0)."""
    if device.type == "cuda" and not args.no_tune:
        print(f"tuning nf4_matmul for {n}x{k}, M={m} (cached per GPU) ...", flush=True)
        tune([(n, k)], [m], DTYPE, device, l2_bytes=args.l2_bytes)
    w0 = quantize_nf4(torch.randn(n, k, device=device, dtype=DTYPE) * 0.02)
    stack0 = LoRAStack.allocate(args.slots, k, (n,), SIDE_RANK, DTYPE, device)
    stack0.set_slot(0, [(torch.randn(SIDE_RANK, k, device=device, dtype=DTYPE) / math.sqrt(k),
                         torch.randn(n, SIDE_RANK, device=device, dtype=DTYPE) * 0.05, 2.0)])
    adapter_bytes = SIDE_RANK * (k + n) * 2
    copies = copies_for(w0.resident_bytes() + adapter_bytes, args.l2_bytes)
    ws = [w0] + [quantize_nf4(torch.randn(n, k, device=device, dtype=DTYPE) * 0.02)
                 for _ in range(copies - 1)]
    stacks = [stack0] + [dataclasses.replace(stack0, a=stack0.a.clone(), b=stack0.b.clone())
                         for _ in range(copies - 1)]
    x = torch.randn(m, k, device=device, dtype=DTYPE)
    slot_ids = torch.zeros(m, dtype=torch.int32, device=device)
    meta = BatchMeta.build(slot_ids, args.slots)

    # correctness of the pair: base product + delta
    y = nf4_matmul(x, w0)
    base = y.float().clone()
    apply_lora(x, y, stack0, meta)
    err = rel_error(y.float() - base, lora_delta_ref(x, stack0, slot_ids))
    if not err <= REL_TOL:
        raise SystemExit(f"WRONG RESULT: nf4_matmul + apply_lora delta, relative error {err:.3g} > {REL_TOL}")

    def both(w, st):
        return lambda: apply_lora(x, nf4_matmul(x, w), st, meta)

    us_nf4 = args.timer_fn([functools.partial(nf4_matmul, x, w) for w in ws])
    us_both = args.timer_fn([both(w, st) for w, st in zip(ws, stacks)])
    out = dict(k=k, n=n, m=m, rank=SIDE_RANK, slots=args.slots, copies=copies, plan=plan_label(w0, m),
               rel_err=err, us_nf4=us_nf4, us_nf4_lora=us_both, added=us_both / us_nf4 - 1,
               graph=None, graph_error=None)

    if device.type == "cuda" and not args.no_graph:
        def nf4_step(workspace: Workspace):
            for w in ws:
                nf4_matmul(x, w, workspace=workspace)

        def both_step(workspace: Workspace):
            for w, st in zip(ws, stacks):
                apply_lora(x, nf4_matmul(x, w, workspace=workspace), st, meta, workspace=workspace)

        try:
            g_nf4, g_both = capture(nf4_step), capture(both_step)
            reps = dict(samples=args.samples, sample_ms=10.0)
            gu_nf4 = loop_timer([g_nf4.replay], **reps) / copies
            gu_both = loop_timer([g_both.replay], **reps) / copies
            out["graph"] = dict(us_nf4=gu_nf4, us_nf4_lora=gu_both, added=gu_both / gu_nf4 - 1)
            del g_nf4, g_both
        except Exception as e:  # keep the eager numbers; report why the graph failed
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            out["graph_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def side_lines(side: dict | None, model: str) -> list[str]:
    if side is None:
        return ["NF4 side by side: skipped"]
    what = (f"NF4 side by side ({model} o_proj {side['n']}x{side['k']}, M={side['m']}, "
            f"one rank-{side['rank']} "
            f"adapter, S={side['slots']}, {side['copies']} weight copies, plan {side['plan']})")
    lines = [what,
             f"  eager: nf4_matmul {side['us_nf4']:.1f} us, + apply_lora {side['us_nf4_lora']:.1f} us, "
             f"added {100 * side['added']:.1f}%"]
    if side["graph"] is not None:
        g = side["graph"]
        lines.append(f"  CUDA graph: nf4_matmul {g['us_nf4']:.1f} us, "
                     f"+ apply_lora {g['us_nf4_lora']:.1f} us, "
                     f"added {100 * g['added']:.1f}%")
    elif side["graph_error"] is not None:
        lines.append(f"  CUDA graph: not capturable ({side['graph_error']})")
    else:
        lines.append("  CUDA graph: skipped")
    return lines


# ----------------------------------------------------------------------------------------
# Adapter memory and page-in: slot rows against pages
# ----------------------------------------------------------------------------------------


def model_projections(model: str) -> list[Projection]:
    """Every fused linear of every layer, with the engine's module keys ("layers.0.self_attn.q_proj")."""
    shapes = {**MODELS, **SMOKE_MODELS}[model]
    return [Projection(tuple(f"layers.{i}.{n}" for n in FUSED_LINEARS[PROJ_MODULE[proj]]), k, slices)
            for i in range(LAYERS[model]) for proj, (k, slices) in shapes.items()]


def adapter_ranks(projections: list[Projection], rank: int, targets: str) -> dict[str, int]:
    """Module ranks of a rank-`rank` adapter on q/v only or on every linear."""
    return {key: rank for p in projections for key in p.keys
            if targets == "all-linear" or key.endswith(QV_KEYS)}


def slot_row_bytes(projections: list[Projection], capacity: int) -> int:
    """One slot row of the slot kernels (`LoRAStack.allocate`: A [L * R, K] and B [N, R] per
    projection at R = padded_rank(capacity)), on every linear: what any adapter takes there."""
    r = padded_rank(capacity)
    return sum(r * (len(p.slices) * p.in_features + sum(p.slices)) for p in projections) * DTYPE.itemsize


def sizing_pool(projections: list[Projection]) -> LoRAPagePool:
    """A one-page pool: the real page width and `pages_for`, nothing big allocated."""
    return LoRAPagePool(projections, 1, PAGED_MAX_RANK, 1, DTYPE, "cpu")


def fill_cycled(sizes: list[int], capacity: int) -> tuple[int, int]:
    """(adapters, units used) when the kinds of `sizes` arrive in turn until the next does not fit."""
    count = used = 0
    while used + sizes[count % len(sizes)] <= capacity:
        used += sizes[count % len(sizes)]
        count += 1
    return count, used


def memory_figures(model: str, budget: int = MEMORY_BYTES) -> dict:
    """How many adapters `budget` bytes of bf16 adapter memory hold: slot rows vs pages."""
    projections = model_projections(model)
    pool = sizing_pool(projections)
    kinds = [dict(rank=r, targets=t, pages=pool.pages_for(adapter_ranks(projections, r, t)))
             for r in MEMORY_RANKS for t in MEMORY_TARGETS]
    for kind in kinds:
        kind["bytes"] = kind["pages"] * pool.page_bytes
    pages = budget // pool.page_bytes
    fit, used = fill_cycled([kind["pages"] for kind in kinds], pages)
    slots = [dict(capacity=c, row_bytes=slot_row_bytes(projections, c),
                  fit=budget // slot_row_bytes(projections, c)) for c in SLOT_CAPACITIES]
    return dict(model=model, layers=LAYERS[model], budget_bytes=budget, page_width=pool.page_width,
                page_bytes=pool.page_bytes, pages=pages, table_bytes=pages * pool.table.element_size(),
                kinds=kinds, paged_fit=fit, paged_pages_used=used, slots=slots)


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f}"


def memory_lines(m: dict) -> list[str]:
    row64 = m["slots"][0]
    head = ["adapter kind", "pages", "paged MB", f"slot row MB (capacity {row64['capacity']})", "row / paged"]
    body = [[f"rank {k['rank']} {k['targets']}", str(k["pages"]), mb(k["bytes"]), mb(row64["row_bytes"]),
             ratio(row64["row_bytes"] / k["bytes"])] for k in m["kinds"]]
    slots = "; ".join(f"capacity {s['capacity']}: row {mb(s['row_bytes'])} MB -> {s['fit']} adapters"
                      for s in m["slots"])
    return [f"adapter memory, {m['budget_bytes'] / 2**30:g} GiB of bf16 on {m['model']} ({m['layers']} "
            f"layers): page width {m['page_width']} ({m['page_bytes']} B per page), {m['pages']} pages "
            f"(+ {m['table_bytes'] / 2**20:.0f} MiB of page table)",
            *("  " + line for line in markdown(head, body, {1, 2, 3, 4})),
            f"  slots, every row on all linears at the rank capacity: {slots}",
            f"  paged, the {len(m['kinds'])} kinds above in turn: {m['paged_fit']} adapters "
            f"({m['paged_pages_used']} pages used), {ratio(m['paged_fit'] / max(row64['fit'], 1))}x "
            f"the slots at capacity {row64['capacity']}"]


def random_modules(projections: list[Projection], ranks: dict[str, int],
                   seed: int) -> dict[str, SimpleNamespace]:
    """Random A [r, K], B [N_l, r] (host, bf16) for the modules in `ranks`."""
    g = torch.Generator().manual_seed(seed)
    shape = {key: (p.in_features, n) for p in projections for key, n in zip(p.keys, p.slices)}
    out = {}
    for key, r in ranks.items():
        k, n = shape[key]
        out[key] = SimpleNamespace(a=(torch.randn(r, k, generator=g) / math.sqrt(k)).to(DTYPE),
                                   b=(torch.randn(n, r, generator=g) * 0.05).to(DTYPE), scaling=2.0)
    return out


def time_copies(fns: list[Callable[[], object]], device: torch.device, args) -> float:
    """CUDA: events around back-to-back copies, as the kernels are timed. CPU: wall clock on
    one thread (on a shared 2-core machine waking a second one costs milliseconds, not the copy)."""
    if device.type == "cuda":
        return loop_timer(fns, samples=args.samples, sample_ms=5.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return wall_timer(fns, reps=max(9, len(fns)))
    finally:
        torch.set_num_threads(threads)


def page_in(model: str, device: torch.device, args) -> dict:
    """A rank-8 q/v-only adapter paged in (`LoRAPagePool.load` of its `PackedAdapter` into a
    pool sized for it) against one slot row copied (`Tensor.copy_`, capacity 16 and 64, all
    linears). CUDA: pinned host -> GPU, non_blocking; CPU: host -> host. Each rotates among
    enough sources and destinations that together they exceed --l2-bytes (no cached copy)."""
    cuda = device.type == "cuda"
    projections = model_projections(model)
    ranks = adapter_ranks(projections, PAGE_IN_RANK, "q/v")
    probe = sizing_pool(projections)
    pages = probe.pages_for(ranks)
    modules = random_modules(projections, ranks, args.seed)
    pools = [LoRAPagePool(projections, 1, PAGED_MAX_RANK, pages, DTYPE, device)
             for _ in range(copies_for(pages * probe.page_bytes, args.l2_bytes))]
    packs = [pool.pack(modules, pin=cuda) for pool in pools]
    runs = len(pools[0].load(0, packs[0], non_blocking=cuda).page_runs)
    pools[0].release(0)

    def load(pool: LoRAPagePool, packed) -> None:  # release is bookkeeping: the next load rewrites the pages
        pool.load(0, packed, non_blocking=cuda)
        pool.release(0)

    nbytes = packs[0].pages.numel() * packs[0].pages.element_size()
    us = time_copies([functools.partial(load, *pp) for pp in zip(pools, packs)], device, args)
    paths = [dict(path="paged (LoRAPagePool.load)", capacity=None, bytes=nbytes, copies=runs + 3,
                  page_runs=runs, rotated=len(pools), us=us)]
    del pools, packs
    for capacity in sorted(SLOT_CAPACITIES):
        nbytes = slot_row_bytes(projections, capacity)
        n = nbytes // DTYPE.itemsize
        # sources filled: real pages (a fresh empty one reads the kernel's zero page on CPU)
        rotated = copies_for(nbytes, args.l2_bytes)
        pairs = [(torch.empty(n, dtype=DTYPE, pin_memory=cuda).fill_(1.0),
                  torch.zeros(n, dtype=DTYPE, device=device)) for _ in range(rotated)]
        us = time_copies([functools.partial(dst.copy_, src, non_blocking=cuda) for src, dst in pairs],
                         device, args)
        paths.append(dict(path=f"slot row, capacity {capacity}, all linears (Tensor.copy_)",
                          capacity=capacity, bytes=nbytes, copies=1, page_runs=None, rotated=rotated, us=us))
        del pairs
    for x in paths:
        x["gb_s"] = x["bytes"] / x["us"] / 1e3
        x["over_paged"] = x["us"] / paths[0]["us"]
    how = ("pinned host -> GPU, non_blocking, CUDA events" if cuda
           else "host -> host, one thread, wall clock, median of 9")
    return dict(model=model, rank=PAGE_IN_RANK, targets="q/v", device=str(device), how=how,
                pages=pages, page_bytes=probe.page_bytes, paths=paths)


def copies_cell(x: dict) -> str:
    if x["page_runs"] is None:
        return str(x["copies"])
    return f"{x['copies']} ({x['page_runs']} page run{'s' * (x['page_runs'] != 1)} + table, record, scaling)"


def page_in_lines(p: dict) -> list[str]:
    head = ["path", "MB copied", "copies", "us", "GB/s", "x paged time", "rotated over"]
    body = [[x["path"], mb(x["bytes"]), copies_cell(x), f"{x['us']:.1f}", f"{x['gb_s']:.1f}",
             ratio(x["over_paged"]), str(x["rotated"])] for x in p["paths"]]
    return [f"page-in of a rank-{p['rank']} {p['targets']}-only adapter on {p['model']} ({p['how']}; "
            f"{p['pages']} pages of {p['page_bytes']} B):",
            *("  " + line for line in markdown(head, body, {1, 3, 4, 5, 6}))]


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

HEAD = ["model", "proj", "K", "N", "T", "adapters", "present", "assign", "rank", "loop us", "bmm us",
        "ours us", "x loop", "x bmm", "floor us", "ours/floor", "paged us", "paged/ours", "paged/floor"]
NUMERIC = {2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18}


def cells(r: dict) -> list[str]:
    return [r["model"], r["proj"], str(r["k"]), "+".join(map(str, r["slices"])), str(r["t"]),
            str(r["distinct"]), str(r["present"]), r["assign"], str(r["rank"]), f"{r['us_loop']:.1f}",
            fmt(r["us_bmm"], ".1f", "skip (memory)"), f"{r['us_ours']:.1f}", ratio(r["x_loop"]),
            ratio(r["x_bmm"]), ratio(r["us_floor"]), ratio(r["ours_over_floor"]), fmt(r["us_paged"], ".1f"),
            ratio(r["paged_over_ours"]), ratio(r["paged_over_floor"])]


def ratio(v: float | None) -> str:
    """A positive ratio in a few characters: 123.4, 1.23, 0.0012."""
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.01 else f"{v:.2g}"


def inline(r: dict) -> str:
    return (f"{r['model']}/{r['proj']:<7} T={r['t']:<5} adapters={r['distinct']:<3} "
            f"({r['present']:>3} present) "
            f"{r['assign']:<7} r={r['rank']:<3} loop {r['us_loop']:10.1f} us  bmm "
            f"{fmt(r['us_bmm'], '9.1f', 'skip (memory)')} us  ours {r['us_ours']:8.1f} us  "
            f"x{ratio(r['x_loop'])} vs loop  x{ratio(r['x_bmm'])} vs bmm  "
            f"{ratio(r['ours_over_floor'])}x floor"
            + ("" if r["us_paged"] is None else
               f"  paged {r['us_paged']:8.1f} us {ratio(r['paged_over_ours'])}x ours "
               f"{ratio(r['paged_over_floor'])}x floor"))


def row_at(rows: list[dict], model: str, proj: str, point: tuple[int, int, int]) -> dict | None:
    """The uniform row of (T, distinct adapters, rank) `point`, if measured."""
    at = [r for r in rows if (r["model"], r["proj"], r["t"], r["distinct"], r["rank"], r["assign"])
          == (model, proj, *point, "uniform")]
    return at[0] if at else None


def point_tag(point: tuple[int, int, int]) -> str:
    t, d, r = point
    return f"T={t}, {d} rank-{r} adapter{'s' if d > 1 else ''} uniform"


def targets(rows: list[dict], side: dict | None, args) -> tuple[list[Target], list[str]]:
    out = []
    for model in args.models:
        for proj in args.models[model]:
            r = row_at(rows, model, proj, args.target_point)
            tag = f"(a) {point_tag(args.target_point)}, {model}/{proj}"
            out.append(Target(f"{tag}: speed-up over loop", r and r["x_loop"], "x", ">=", 100))
            out.append(Target(f"{tag}: ours / byte floor", r and r["ours_over_floor"], "x", "<=",
                              SLOT_FLOOR_GOAL))
    out.append(Target("(b) NF4 side by side, LoRA added (eager)",
                      side and 100 * side["added"], "%", "<=", 10))
    graph = side and side["graph"]
    out.append(Target("(b) NF4 side by side, LoRA added (CUDA graph)",
                      graph and 100 * graph["added"], "%", "<=", 10))
    with_bmm = [r for r in rows if r["us_bmm"] is not None]
    worst = max((r["us_ours"] / r["us_bmm"] for r in with_bmm), default=None)
    out.append(Target(f"(c) max time ours / gathered bmm over {len(with_bmm)} points", worst, "", "<=", 1.0))
    violations = [f"{r['model']}/{r['proj']} T={r['t']} adapters={r['distinct']} {r['assign']} "
                  f"r={r['rank']}: ours {r['us_ours']:.1f} us > bmm {r['us_bmm']:.1f} us"
                  for r in with_bmm if r["us_ours"] > r["us_bmm"]]
    return out + paged_targets(rows, args), violations


def paged_targets(rows: list[dict], args) -> list[Target]:
    """(d) paged <= 1.1x the slot kernels and (e) paged / floor <= 1.1x (a)'s floor goal, at
    the slot kernels' target points (many adapters and one), per projection."""
    out = []
    for point in args.paged_points if args.paged != "none" else []:
        for model in args.models:
            for proj in args.models[model]:
                r = row_at(rows, model, proj, point)
                tag = f"{point_tag(point)}, {model}/{proj}"
                out.append(Target(f"(d) {tag}: paged / slot kernels", r and r["paged_over_ours"], "x", "<=",
                                  PAGED_GOAL))
                out.append(Target(f"(e) {tag}: paged / byte floor", r and r["paged_over_floor"], "x", "<=",
                                  round(PAGED_GOAL * SLOT_FLOOR_GOAL, 4)))
    return out


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama2-7b", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--projections", default=None, help="comma-separated subset of qkv,o,gate_up,down")
    p.add_argument("--ts", default=None, help="token counts (default 1,16,64,256,1024; smoke 1,16)")
    p.add_argument("--distinct", default=None, help="distinct adapters per batch (default 1,8,64; smoke 1,4)")
    p.add_argument("--ranks", default=None, help="LoRA ranks (default 16,64; smoke 16)")
    p.add_argument("--assign", default="uniform,zipf",
                   help="token -> adapter assignments: uniform (round-robin, shuffled) and/or zipf")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent: P(adapter i) ~ 1/(i+1)^s")
    p.add_argument("--slots", type=int, default=None, help="slots S of every stack (default 64; smoke 8)")
    p.add_argument("--base-every", type=int, default=None,
                   help="every Nth token on the base model (slot -1); 0 = none (default 0; smoke 4)")
    p.add_argument("--l2-bytes", type=int, default=None,
                   help="rotate weight copies until their total exceeds this (default 64 MiB; smoke 64 KiB)")
    p.add_argument("--bmm-limit-bytes", type=int, default=8 << 30,
                   help="skip gathered bmm where its gathered A and B would exceed this (default 8 GiB)")
    p.add_argument("--samples", type=int, default=30, help="timing samples for ours, bmm and the NF4 pair")
    p.add_argument("--loop-samples", type=int, default=5,
                   help="timing samples for the (slow) per-adapter loop")
    p.add_argument("--side-m", type=int, default=None,
                   help="tokens for the NF4 side by side (default 64; smoke 16)")
    p.add_argument("--no-side", action="store_true", help="skip the NF4 side by side")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA graph timing of the side by side")
    p.add_argument("--no-tune", action="store_true", help="NF4 side by side: use cached or heuristic plans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH",
                   help="write every point, the side by side and the targets as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on whatever device there is (CPU), wall-clock timing: "
                        "checks the harness only")
    p.add_argument("--paged", choices=list(PAGED_WHERE), default=None,
                   help="where to time apply_paged_lora: every point, only targets (d)/(e)'s, or none "
                        "(default all; smoke targets)")
    p.add_argument("--memory", action="store_true",
                   help="print how many adapters 8 GiB hold, slot rows vs pages (arithmetic), and exit")
    p.add_argument("--page-in", action="store_true",
                   help="time paging in a rank-8 q/v adapter vs copying a slot row on this device, and exit")
    p.add_argument("--no-page-in", action="store_true", help="skip the page-in figures of a full run")
    args = p.parse_args(argv)
    d = SMOKE if args.smoke else FULL
    args.ts = ints(args.ts) if args.ts else list(d["ts"])
    args.distinct = ints(args.distinct) if args.distinct else list(d["distinct"])
    args.ranks = ints(args.ranks) if args.ranks else list(d["ranks"])
    args.slots = args.slots or d["slots"]
    args.paged = args.paged or d["paged"]
    args.side_m = args.side_m or d["side_m"]
    if args.base_every is None:
        args.base_every = 4 if args.smoke else 0
    if args.l2_bytes is None:
        args.l2_bytes = (64 << 10) if args.smoke else (64 << 20)
    args.assign = [a.strip() for a in args.assign.split(",") if a.strip()]
    if not args.assign or any(a not in ASSIGNS for a in args.assign):
        p.error(f"--assign takes a comma-separated subset of {', '.join(ASSIGNS)}")
    if min(args.distinct) < 1 or max(args.distinct) > args.slots:
        p.error(f"distinct adapters must be between 1 and the slot count {args.slots}")
    if min(args.ts) < 1 or min(args.ranks) < 1 or max(args.ranks) > 128:
        p.error("token counts must be >= 1 and ranks between 1 and 128")
    models = SMOKE_MODELS if args.smoke else MODELS
    names = list(models) if args.smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in models]
    if unknown or not names:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    projs = [q.strip() for q in args.projections.split(",")] if args.projections else None
    known = {q for m in names for q in models[m]}
    if projs is not None and (not projs or any(q not in known for q in projs)):
        p.error(f"unknown projection(s) in {projs}; choose from {', '.join(sorted(known))}")
    args.models = {m: {q: v for q, v in models[m].items() if projs is None or q in projs} for m in names}
    # the point of target (a): T=64, 64 adapters, rank 16 (smoke: T=16, 4 adapters, rank 16)
    args.target_point = (16, 4, 16) if args.smoke else (64, 64, 16)
    # targets (d)/(e): (a)'s point and one adapter for the whole batch
    args.paged_points = [args.target_point, (args.target_point[0], 1, args.target_point[2])]
    args.timer = "wall (perf_counter)" if args.smoke else "loop (CUDA events)"
    return args


def write_json(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


def memory_only(args) -> int:
    """--memory: arithmetic on the real model shapes, no device."""
    memory = [memory_figures(m) for m in MODELS]
    print("\n\n".join("\n".join(memory_lines(m)) for m in memory))
    if args.json:
        write_json(args.json, dict(memory=memory))
    return 0


def page_in_only(args) -> int:
    """--page-in: on CUDA if there is one, else host to host."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"# lora page-in | date {env['date']} | device {env['device']} | torch {env['torch']}", flush=True)
    results = []
    for model in args.models:
        results.append(page_in(model, device, args))
        print("\n".join(page_in_lines(results[-1])), flush=True)
    if args.json:
        write_json(args.json, dict(env=env, page_in=results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory:
        return memory_only(args)
    if args.page_in:
        return page_in_only(args)
    device = bench_device(args.smoke, "lora")
    if device is None:
        return 2
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.smoke:
        args.timer_fn = args.slow_timer_fn = functools.partial(wall_timer, reps=3)
    else:
        args.timer_fn = functools.partial(loop_timer, samples=args.samples, sample_ms=5.0)
        args.slow_timer_fn = functools.partial(loop_timer, samples=args.loop_samples, sample_ms=1.0)

    env = environment(device)
    header = header_lines(env, args)
    print("\n".join(header), flush=True)
    copy_bytes = (64 << 20) if args.smoke else (1 << 30)
    copy_bw = copy_bandwidth(device, copy_bytes, args.timer_fn)
    copy_line = f"copy bandwidth ({copy_bytes >> 20} MiB clone, read + write): {copy_bw / 1e12:.3f} TB/s"
    print(copy_line, flush=True)

    metas = []
    for t in args.ts:
        metas.append(meta_build_time(t, max(args.distinct), args.slots, device, args))
        print(f"BatchMeta.build T={t} S={args.slots}: {metas[-1]['us_build']:.1f} us", flush=True)

    rows = []
    for model, projs in args.models.items():
        for proj, (k, slices) in projs.items():
            for rank in args.ranks:
                stacks = make_stacks(k, slices, rank, args.slots, device, args.l2_bytes)
                print(f"[{time.perf_counter() - started:.0f} s] {model}/{proj} K={k} slices {slices} "
                      f"rank {rank}: {len(stacks)} stack copies "
                      f"({(stacks[0].a.numel() + stacks[0].b.numel()) * 2 / 1e6:.1f} MB each)", flush=True)
                paged = None
                if any(paged_here(t, d, "uniform", rank, args) for t in args.ts for d in args.distinct):
                    paged = make_paged(stacks[0], proj, k, slices, device, args.l2_bytes, args.seed)
                    pool_mb = paged[0].pages.numel() * 2 / 1e6
                    print(f"  paged: {len(paged)} pool copies ({pool_mb:.1f} MB each, page width "
                          f"{paged[0].page_width}, max rank {paged[0].max_rank})", flush=True)
                for t in args.ts:
                    for distinct in args.distinct:
                        for how in args.assign:
                            if how == "zipf" and distinct == 1 and "uniform" in args.assign:
                                continue  # one adapter: the same batch as uniform
                            row = measure_point(model, proj, k, slices, rank, stacks, paged, t, distinct, how,
                                                device, args, copy_bw)
                            rows.append(row)
                            print("  " + inline(row), flush=True)
                del stacks, paged
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    side, side_model = None, None
    if not args.no_side:
        side_model = SIDE_MODEL if SIDE_MODEL in args.models else next(iter(args.models))
        k, (n,) = (SMOKE_MODELS if args.smoke else MODELS)[side_model]["o"]
        side = side_by_side(k, n, args.side_m, device, args)
        print("\n".join(side_lines(side, side_model)), flush=True)

    memory = [memory_figures(m) for m in MODELS]
    pages_in = [] if args.no_page_in else [page_in(next(iter(args.models)), device, args)]
    goals, violations = targets(rows, side, args)
    elapsed = time.perf_counter() - started

    print()
    print("\n".join(header))
    print(copy_line)
    print("BatchMeta.build (once per step): "
          + ", ".join(f"T={m['t']} {m['us_build']:.1f} us" for m in metas))
    print()
    print("\n".join(markdown(HEAD, [cells(r) for r in rows], NUMERIC)))
    print()
    print("\n".join(side_lines(side, side_model)))
    print()
    for lines in [memory_lines(m) for m in memory] + [page_in_lines(p) for p in pages_in]:
        print("\n".join(lines) + "\n")
    print("targets (smoke mode: tiny shapes on CPU, the verdicts mean nothing):"
          if args.smoke else "targets:")
    print("\n".join("  " + g.line() for g in goals))
    if violations:
        print(f"  (c) violations, ours slower than gathered bmm ({len(violations)}):")
        print("\n".join("    " + v for v in violations))
    print(f"\n{len(rows)} points in {elapsed:.1f} s")

    if args.json:
        skip = {"models", "timer_fn", "slow_timer_fn"}
        report = dict(env=env, args={k: v for k, v in vars(args).items() if k not in skip},
                      models={m: {q: dict(k=k, slices=list(s)) for q, (k, s) in p.items()}
                              for m, p in args.models.items()},
                      copy_bandwidth_bytes_per_s=copy_bw, meta_build=metas, rows=rows, side_by_side=side,
                      memory=memory, page_in=pages_in,
                      targets=[dict(dataclasses.asdict(g), verdict=g.verdict()) for g in goals],
                      violations=violations, seconds=elapsed)
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
