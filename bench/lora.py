"""Benchmark loraplex's batched multi-adapter LoRA against a per-adapter loop and gathered bmm.

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
3. ours     `apply_lora(x, y, stack, meta)`, with `meta = BatchMeta.build(...)` made
            outside the timed region (the engine builds it once per step for all layers);
            the time of `BatchMeta.build` itself is reported once per T.
4. floor    bytes that must move: the present adapters' A and B at their real rank over
            all slices (adapters * rank * (K * L + N) * 2), x read once (T * K * 2) and y
            read + written (2 * T * N * 2), over the copy bandwidth of a 1 GiB clone
            measured in the same run.

It prints per point the three times (us), ours' speed-up over the loop and over bmm, and
ours / floor. Side by side with NF4: for Llama-2-7B o_proj (N = K = 4096) at M = T = 64
with one rank-16 adapter, `nf4_matmul(x, w)` alone vs `nf4_matmul` + `apply_lora`, eager
and captured in a CUDA graph; the added fraction is reported. Targets (PASS/FAIL):

(a) T = 64, 64 distinct rank-16 adapters, uniform, each projection: ours >= 100x faster
    than the loop, and ours <= 1.5x the byte floor
(b) NF4 side by side: LoRA adds <= 10% to the NF4 product (eager and CUDA graph)
(c) ours never slower than gathered bmm at any point of the grid (violations listed)

Timing: as in bench/nf4_matmul.py (whose timers, copy bandwidth, graph capture and target
helpers this script imports). Every method rotates among enough copies of the stacked
weights (and, side by side, of the NF4 weight) that their total exceeds --l2-bytes, so
each call reads HBM. `loop` timer: CUDA events around back-to-back calls, median of
--samples samples (the per-adapter loop, whose calls take milliseconds, uses
--loop-samples). Before timing, each point is checked on a sample of up to 32 tokens: ours,
the loop and bmm against `lora_delta_ref` (relative error of the delta <= 2e-2); a mismatch
aborts the run.

Run:
    python bench/lora.py                      # on a CUDA GPU machine (full run)
    python bench/lora.py --ts 64 --distinct 64 --ranks 16 --assign uniform   # target (a) only
    python bench/lora.py --smoke              # anywhere (CPU): harness check only
    TRITON_INTERPRET=1 python bench/lora.py --smoke   # real Triton kernels, interpreted
`--smoke` uses tiny shapes (K = 128, slices (64, 32, 32) and (64,)), T in {1, 16}, 1 or 4
adapters, rank 16, S = 8, every 4th token on the base model, wall-clock timing, no tuning
and no CUDA graph; its numbers say nothing about performance.
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
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from loraplex.kernels import runtime  # noqa: E402
from loraplex.kernels.lora import BatchMeta, LoRAStack, apply_lora, lora_delta_ref  # noqa: E402
from loraplex.kernels.nf4 import quantize_nf4  # noqa: E402
from loraplex.kernels.nf4_matmul import nf4_matmul, tune  # noqa: E402
from loraplex.kernels.workspace import Workspace  # noqa: E402

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
FULL = dict(ts=(1, 16, 64, 256, 1024), distinct=(1, 8, 64), ranks=(16, 64), slots=64, side_m=64)
SMOKE = dict(ts=(1, 16), distinct=(1, 4), ranks=(16,), slots=8, side_m=16)
ASSIGNS = ("uniform", "zipf")
DTYPE = torch.bfloat16
REL_TOL = 2e-2   # ||delta - ref|| / ||ref|| on the sampled tokens
CHECK_TOKENS = 32
SIDE_MODEL = "llama2-7b"
SIDE_RANK = 16


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


def measure_point(model: str, proj: str, k: int, slices: tuple[int, ...], rank: int, stacks: list[LoRAStack],
                  t: int, distinct: int, how: str, device: torch.device, args, copy_bw: float) -> dict:
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

    y = torch.zeros(t, n, dtype=DTYPE, device=device)
    t_ours = timer([ours_fn(x, y, st, meta) for st in stacks])
    t_bmm = timer([bmm_fn(x, y, st, sid, live) for st in stacks]) if do_bmm else None
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
               block_t=meta.block_t, rel_err=errs)
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
# Report
# ----------------------------------------------------------------------------------------

HEAD = ["model", "proj", "K", "N", "T", "adapters", "present", "assign", "rank", "loop us", "bmm us",
        "ours us", "x loop", "x bmm", "floor us", "ours/floor"]
NUMERIC = {2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15}


def cells(r: dict) -> list[str]:
    return [r["model"], r["proj"], str(r["k"]), "+".join(map(str, r["slices"])), str(r["t"]),
            str(r["distinct"]), str(r["present"]), r["assign"], str(r["rank"]), f"{r['us_loop']:.1f}",
            fmt(r["us_bmm"], ".1f", "skip (memory)"), f"{r['us_ours']:.1f}", ratio(r["x_loop"]),
            ratio(r["x_bmm"]), ratio(r["us_floor"]), ratio(r["ours_over_floor"])]


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
            f"{ratio(r['ours_over_floor'])}x floor")


def targets(rows: list[dict], side: dict | None, args) -> tuple[list[Target], list[str]]:
    out = []
    t_a, d_a, r_a = args.target_point
    for model in args.models:
        for proj in args.models[model]:
            at = [r for r in rows if (r["model"], r["proj"], r["t"], r["distinct"], r["rank"], r["assign"])
                  == (model, proj, t_a, d_a, r_a, "uniform")]
            r = at[0] if at else None
            tag = f"(a) T={t_a}, {d_a} rank-{r_a} adapters uniform, {model}/{proj}"
            out.append(Target(f"{tag}: speed-up over loop", r and r["x_loop"], "x", ">=", 100))
            out.append(Target(f"{tag}: ours / byte floor", r and r["ours_over_floor"], "x", "<=", 1.5))
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
    return out, violations


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
    args = p.parse_args(argv)
    d = SMOKE if args.smoke else FULL
    args.ts = ints(args.ts) if args.ts else list(d["ts"])
    args.distinct = ints(args.distinct) if args.distinct else list(d["distinct"])
    args.ranks = ints(args.ranks) if args.ranks else list(d["ranks"])
    args.slots = args.slots or d["slots"]
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
    args.timer = "wall (perf_counter)" if args.smoke else "loop (CUDA events)"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
                for t in args.ts:
                    for distinct in args.distinct:
                        for how in args.assign:
                            if how == "zipf" and distinct == 1 and "uniform" in args.assign:
                                continue  # one adapter: the same batch as uniform
                            row = measure_point(model, proj, k, slices, rank, stacks, t, distinct, how,
                                                device, args, copy_bw)
                            rows.append(row)
                            print("  " + inline(row), flush=True)
                del stacks
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    side, side_model = None, None
    if not args.no_side:
        side_model = SIDE_MODEL if SIDE_MODEL in args.models else next(iter(args.models))
        k, (n,) = (SMOKE_MODELS if args.smoke else MODELS)[side_model]["o"]
        side = side_by_side(k, n, args.side_m, device, args)
        print("\n".join(side_lines(side, side_model)), flush=True)

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
                      targets=[dict(dataclasses.asdict(g), verdict=g.verdict()) for g in goals],
                      violations=violations, seconds=elapsed)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
