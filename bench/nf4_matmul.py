"""Benchmark loraplex's fused NF4 dequant-matmul against bf16 cuBLAS and bitsandbytes.

For the linear layers of Llama-2-7B and Llama-3-8B (N x K; q/k/v and gate/up fused) and
M in {1, 4, 16, 64, 256, 2048} tokens, one run measures:

1. bf16 cuBLAS      `F.linear(x, W_bf16)`
2. bitsandbytes     `bnb.matmul_4bit(x, W.t(), quant_state=...)` on a `bnb.nn.Linear4bit`
                    (nf4, double quant) holding the very same NF4 tensors as ours
                    (column skipped with a note when bitsandbytes is not importable)
3. copy bandwidth   a 1 GiB `clone` on the device, bytes read + written over time
4. ours             `loraplex.kernels.nf4_matmul.nf4_matmul(x, w)`, after `tune(...)`
                    (unless --no-tune); the chosen plan is printed per row

and prints per (model, layer, M) the time of each in microseconds, our speed-up over
cuBLAS and over bitsandbytes (their time / our time), and our achieved bandwidth
(`w.resident_bytes()` + activation bytes, over our time) as a share of the copy bandwidth.
Summary lines check the targets (PASS/FAIL):

- M = 1, summed over the four Llama-2-7B layers: >= 70% of copy bandwidth, >= 2.5x over bnb
- M = 16 and 64 (all measured layers): min speed-up over bnb >= 4x, max time ours/cuBLAS <= 0.6
- M = 2048 (all measured layers): max time ours/cuBLAS <= 1.15

and, at M = 1, the four Llama-2-7B products captured in one CUDA graph (ours, and
bitsandbytes if it captures): time per replay and the implied bandwidth share.

Timing. Every method rotates among enough copies of each weight that their total size
exceeds --l2-bytes (default 64 MiB; an H100 has 50 MB of L2), so each call reads its
weight from HBM. Eager times (default `--timer loop`) are CUDA events around many
back-to-back calls, median over samples, so per-call launch overhead is included, as an
engine running without graphs would pay it; `--timer do_bench` uses
`triton.testing.do_bench` (median; it flushes L2 and times one call at a time, which hides
launch overhead behind the flush). Before timing, each (layer, M) is checked once: ours
against `nf4_matmul_ref` (and bitsandbytes against it too) within bf16 tolerance; a
mismatch aborts the run.

Run:
    python bench/nf4_matmul.py                      # on a CUDA GPU machine (full run)
    python bench/nf4_matmul.py --smoke              # anywhere (CPU): harness check only
    TRITON_INTERPRET=1 python bench/nf4_matmul.py --smoke   # real Triton kernels, interpreted
Flags: --models llama2-7b,llama3-8b  --ms 1,4,16,64,256,2048  --no-tune  --tune-ms 1,16  --no-graph
       --l2-bytes N  --timer loop|do_bench  --json PATH  --smoke
`--smoke` uses tiny shapes (256x256, 128x512), M in {1, 4}, wall-clock timing, no tuning
and no CUDA graph; its numbers say nothing about performance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from loraplex.kernels import runtime  # noqa: E402
from loraplex.kernels.nf4 import NF4Weight, quantize_nf4  # noqa: E402
from loraplex.kernels.nf4_matmul import Plan, nf4_matmul, nf4_matmul_ref, plan_for, tune  # noqa: E402
from loraplex.kernels.workspace import Workspace  # noqa: E402

MODELS: dict[str, dict[str, tuple[int, int]]] = {  # layer -> (N, K)
    "llama2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
SMOKE_MODELS = {"smoke": {"a": (256, 256), "b": (128, 512)}}
FULL_MS = (1, 4, 16, 64, 256, 2048)
SMOKE_MS = (1, 4)
DTYPE = torch.bfloat16
REL_TOL = 1e-2  # ||y - ref|| / ||ref|| for bf16 outputs with fp32 accumulation
GRAPH_MODEL = "llama2-7b"


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------


def load_bnb():
    """bitsandbytes, or (None, reason) when it cannot be imported."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # missing, or a broken native library
        return None, f"{type(e).__name__}: {e}".splitlines()[0]
    return bnb, None


def environment(device: torch.device, bnb) -> dict[str, str]:
    triton = runtime.triton
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, no CUDA)",
        "torch": torch.__version__,
        "triton": triton.__version__ if triton is not None else "not installed",
        "bitsandbytes": bnb.__version__ if bnb is not None else "not installed",
        "triton_interpret": str(runtime.INTERPRET),
    }


def header_lines(env: dict[str, str], args) -> list[str]:
    mode = "SMOKE (harness check only, not performance)" if args.smoke else "full"
    return [
        f"# nf4_matmul benchmark, {mode}",
        f"date {env['date']} | device {env['device']}",
        f"torch {env['torch']} | triton {env['triton']} | bitsandbytes {env['bitsandbytes']}"
        f" | TRITON_INTERPRET={env['triton_interpret']} | timer {args.timer} | l2-bytes {args.l2_bytes}",
    ]


# ----------------------------------------------------------------------------------------
# Timers: each takes a list of closures (one per weight copy) and returns us per call
# ----------------------------------------------------------------------------------------


def wall_timer(fns: list[Callable[[], object]], reps: int = 5) -> float:
    """Smoke mode: time.perf_counter around single calls, median (CPU, synchronous)."""
    for f in fns:  # warm-up (first-call compilation, allocator)
        f()
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def loop_timer(fns: list[Callable[[], object]], samples: int = 30, sample_ms: float = 5.0) -> float:
    """CUDA events around back-to-back calls rotating over `fns`; median over samples."""
    n = len(fns)
    for _ in range(3):
        for f in fns:
            f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for f in fns:
        f()
    end.record()
    end.synchronize()
    per_call_ms = start.elapsed_time(end) / n
    inner = n * max(1, math.ceil(sample_ms / max(per_call_ms, 1e-4) / n))
    per_call = []
    for _ in range(samples):
        start.record()
        for i in range(inner):
            fns[i % n]()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / inner)
    return statistics.median(per_call) * 1e3


def do_bench_timer(fns: list[Callable[[], object]]) -> float:
    """`triton.testing.do_bench`, median, rotating over `fns` call by call."""
    from triton.testing import do_bench

    turn = iter(range(1 << 62))
    return do_bench(lambda: fns[next(turn) % len(fns)](), warmup=25, rep=100, return_mode="median") * 1e3


def pick_timer(args) -> Callable[[list[Callable[[], object]]], float]:
    if args.smoke:
        return wall_timer
    return do_bench_timer if args.timer == "do_bench" else loop_timer


# ----------------------------------------------------------------------------------------
# Weights for one layer: NF4 copies (ours, shared with bitsandbytes) and bf16 copies
# ----------------------------------------------------------------------------------------


def copies_for(bytes_per_copy: int, l2_bytes: int) -> int:
    return max(1, math.ceil(l2_bytes / bytes_per_copy))


def make_bnb_linear(bnb, w: NF4Weight):
    """A `bnb.nn.Linear4bit` whose weight is `w`'s own tensors (no copy, no requantization)."""
    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, quant_type="nf4",
                            compress_statistics=True, device="meta")
    state = w.to_bnb("weight")
    stats = {key.removeprefix("weight."): t for key, t in state.items() if key != "weight"}
    lin.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, requires_grad=False,
                                                     device=w.device, module=lin)
    return lin


@dataclass
class LayerWeights:
    nf4: list[NF4Weight]
    dense: list[torch.Tensor]
    bnb: list = field(default_factory=list)  # Linear4bit modules sharing `nf4`'s tensors


def make_weights(n: int, k: int, device: torch.device, l2_bytes: int, bnb) -> LayerWeights:
    base = torch.randn(n, k, device=device, dtype=DTYPE) * 0.02
    nf4 = [quantize_nf4(base)]
    n_nf4 = copies_for(nf4[0].resident_bytes(), l2_bytes)
    nf4 += [quantize_nf4(torch.randn(n, k, device=device, dtype=DTYPE) * 0.02) for _ in range(n_nf4 - 1)]
    dense = [base] + [torch.randn(n, k, device=device, dtype=DTYPE) * 0.02
                      for _ in range(copies_for(n * k * base.element_size(), l2_bytes) - 1)]
    bnb_lins = [make_bnb_linear(bnb, w) for w in nf4] if bnb is not None else []
    return LayerWeights(nf4, dense, bnb_lins)


# ----------------------------------------------------------------------------------------
# The products
# ----------------------------------------------------------------------------------------


def ours_fn(x: torch.Tensor, w: NF4Weight) -> Callable[[], torch.Tensor]:
    return lambda: nf4_matmul(x, w)


def cublas_fn(x: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: F.linear(x, w)


def bnb_fn(bnb, x: torch.Tensor, lin) -> Callable[[], torch.Tensor]:
    weight = lin.weight
    return lambda: bnb.matmul_4bit(x, weight.t(), bias=None, quant_state=weight.quant_state)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def check(name: str, y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Abort the whole run if `y` is not `ref` within bf16 tolerance."""
    err = rel_error(y, ref)
    if y.shape != ref.shape or not err <= REL_TOL:  # `not <=` also catches NaN
        raise SystemExit(f"WRONG RESULT: {what} for {name}: shape {tuple(y.shape)} vs {tuple(ref.shape)}, "
                         f"relative error {err:.3g} > {REL_TOL} against nf4_matmul_ref; not timing a wrong kernel")


def plan_label(w: NF4Weight, m: int) -> str:
    """The plan `nf4_matmul` will run for this weight and M, in a few characters."""
    if not runtime.use_triton(w.device):
        return "ref (torch, no Triton on CPU)"
    return format_plan(plan_for(w, m, DTYPE)) + ("" if w.device.type == "cuda" else " (interp)")


def format_plan(p: Plan) -> str:
    if p.kind == "cublas":
        return "cublas (dequant+mm)"
    tile = f"n{p.block_n} k{p.block_k}" if p.kind == "gemv" else f"m{p.block_m} n{p.block_n} k{p.block_k}"
    stages = "" if p.kind == "gemv" else f" st{p.num_stages}"
    return f"{p.kind} {tile} s{p.split_k} w{p.num_warps}{stages}"


def measure_layer(model: str, layer: str, n: int, k: int, ms: list[int], device: torch.device,
                  args, timer, bnb) -> list[dict]:
    """All rows (one per M) of one layer: check, then time cuBLAS, bnb and ours."""
    weights = make_weights(n, k, device, args.l2_bytes, bnb)
    rows = []
    for m in ms:
        name = f"{model}/{layer} {n}x{k} M={m}"
        x = torch.randn(m, k, device=device, dtype=DTYPE)
        ref = nf4_matmul_ref(x, weights.nf4[0])
        check(name, nf4_matmul(x, weights.nf4[0]), ref, "nf4_matmul")
        if bnb is not None:
            check(name, bnb_fn(bnb, x, weights.bnb[0])(), ref, "bitsandbytes matmul_4bit")

        t_cublas = timer([cublas_fn(x, w) for w in weights.dense])
        t_bnb = timer([bnb_fn(bnb, x, lin) for lin in weights.bnb]) if bnb is not None else None
        t_ours = timer([ours_fn(x, w) for w in weights.nf4])
        row = dict(
            model=model, layer=layer, n=n, k=k, m=m, plan=plan_label(weights.nf4[0], m),
            us_cublas=t_cublas, us_bnb=t_bnb, us_ours=t_ours,
            weight_bytes=weights.nf4[0].resident_bytes(), act_bytes=x.numel() * x.element_size(),
            copies_nf4=len(weights.nf4), copies_bf16=len(weights.dense),
        )
        rows.append(row)
        print("  " + format_row_inline(row), flush=True)
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------
# Copy bandwidth and CUDA graphs
# ----------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int, timer) -> float:
    """Bytes per second of a large clone (each byte read once and written once)."""
    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32)
    us = timer([lambda: src.clone()])
    return 2 * nbytes / (us * 1e-6)


def capture(run: Callable[[Workspace], object]) -> torch.cuda.CUDAGraph:
    """Warm `run(workspace)` up on a side stream (which sizes a workspace of its own), freeze
    that workspace, then capture `run(workspace)` into a CUDA graph (PyTorch's recipe). A graph
    bakes in its kernels' scratch buffers, so they must be fixed before capture, as an
    engine's are."""
    workspace = Workspace(torch.device("cuda", torch.cuda.current_device()))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run(workspace)
    torch.cuda.current_stream().wait_stream(side)
    workspace.freeze()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(workspace)
    graph.workspace = workspace  # the graph writes these buffers: they live as long as it does
    return graph


def graph_timings(device: torch.device, args, bnb, copy_bw: float) -> list[dict]:
    """M = 1: the four Llama-2-7B products in one graph, ours and bitsandbytes."""
    shapes = list(MODELS[GRAPH_MODEL].values())
    x_by_k = {k: torch.randn(1, k, device=device, dtype=DTYPE) for k in {k for _, k in shapes}}
    layer_sets = [[quantize_nf4(torch.randn(n, k, device=device, dtype=DTYPE) * 0.02) for n, k in shapes]]
    set_bytes = sum(w.resident_bytes() for w in layer_sets[0])
    for _ in range(copies_for(set_bytes, args.l2_bytes) - 1):  # one set of four is already ~104 MB
        layer_sets.append([quantize_nf4(torch.randn(n, k, device=device, dtype=DTYPE) * 0.02) for n, k in shapes])
    act_bytes = sum(x_by_k[k].numel() * x_by_k[k].element_size() for _, k in shapes)
    bytes_per_step = set_bytes + act_bytes  # one decode step: four products, weights + activations

    methods: list[tuple[str, Callable[[Workspace], object]]] = []

    def ours_step(workspace: Workspace):
        for ws in layer_sets:
            for w in ws:
                nf4_matmul(x_by_k[w.shape[1]], w, workspace=workspace)

    methods.append(("ours", ours_step))
    if bnb is not None:
        lins = [[make_bnb_linear(bnb, w) for w in ws] for ws in layer_sets]

        def bnb_step(_: Workspace):
            for ls in lins:
                for lin in ls:
                    w = lin.weight
                    bnb.matmul_4bit(x_by_k[lin.in_features], w.t(), bias=None, quant_state=w.quant_state)

        methods.append(("bitsandbytes", bnb_step))

    results = []
    for name, step in methods:
        try:
            graph = capture(step)
        except Exception as e:  # e.g. a host sync or allocation the capture forbids
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            results.append(dict(method=name, capturable=False, error=f"{type(e).__name__}: {e}".splitlines()[0]))
            continue
        us = loop_timer([graph.replay], samples=30, sample_ms=10.0) / len(layer_sets)
        results.append(dict(method=name, capturable=True, us_per_step=us, bytes_per_step=bytes_per_step,
                            bw_share=bytes_per_step / (us * 1e-6) / copy_bw, sets=len(layer_sets)))
        del graph
    return results


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def speedups(row: dict) -> tuple[float, float | None]:
    ours = row["us_ours"]
    return row["us_cublas"] / ours, (row["us_bnb"] / ours if row["us_bnb"] is not None else None)


def bw_share(row: dict, copy_bw: float) -> float:
    return (row["weight_bytes"] + row["act_bytes"]) / (row["us_ours"] * 1e-6) / copy_bw


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_row_inline(row: dict) -> str:
    vs_cublas, vs_bnb = speedups(row)
    return (f"{row['model']:<10} {row['layer']:<8} {row['n']}x{row['k']:<6} M={row['m']:<5} "
            f"cuBLAS {row['us_cublas']:9.1f} us  bnb {fmt(row['us_bnb'], '9.1f', '        -')} us  "
            f"ours {row['us_ours']:9.1f} us  x{vs_cublas:.2f} vs cuBLAS  x{fmt(vs_bnb, '.2f')} vs bnb  "
            f"[{row['plan']}]")


def table(rows: list[dict], copy_bw: float) -> list[str]:
    head = ["model", "layer", "N x K", "M", "cuBLAS us", "bnb us", "ours us",
            "x cuBLAS", "x bnb", "BW % copy", "plan"]
    body = []
    for r in rows:
        vs_cublas, vs_bnb = speedups(r)
        body.append([r["model"], r["layer"], f"{r['n']}x{r['k']}", str(r["m"]), f"{r['us_cublas']:.1f}",
                     fmt(r["us_bnb"], ".1f"), f"{r['us_ours']:.1f}", f"{vs_cublas:.2f}", fmt(vs_bnb, ".2f"),
                     f"{100 * bw_share(r, copy_bw):.0f}", r["plan"]])
    return markdown(head, body, numeric={3, 4, 5, 6, 7, 8, 9})


def markdown(head: list[str], body: list[list[str]], numeric: set[int]) -> list[str]:
    """An aligned markdown table; columns in `numeric` are right-aligned."""
    widths = [max(len(c[i]) for c in [head] + body) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return [line(head), sep] + [line(b) for b in body]


@dataclass
class Target:
    label: str
    value: float | None
    unit: str
    op: str  # ">=" or "<="
    goal: float

    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value >= self.goal if self.op == ">=" else self.value <= self.goal
        return "PASS" if ok else "FAIL"

    def line(self) -> str:
        value = "not measured" if self.value is None else f"{self.value:.2f}{self.unit}"
        return f"{self.verdict():<4}  {self.label}: {value} (target {self.op} {self.goal:g}{self.unit})"


def targets(rows: list[dict], copy_bw: float, decode_model: str, graphs: list[dict] | None = None) -> list[Target]:
    out = []
    m1 = [r for r in rows if r["model"] == decode_model and r["m"] == 1]
    if m1:
        t_ours = sum(r["us_ours"] for r in m1)
        share = sum(r["weight_bytes"] + r["act_bytes"] for r in m1) / (t_ours * 1e-6) / copy_bw
        bnb_sum = sum(r["us_bnb"] for r in m1) if all(r["us_bnb"] is not None for r in m1) else None
        out.append(Target(f"M=1 {decode_model} summed over {len(m1)} layers, bandwidth (eager)",
                          100 * share, "%", ">=", 70))
        out.append(Target(f"M=1 {decode_model} summed, speed-up over bnb (eager)",
                          None if bnb_sum is None else bnb_sum / t_ours, "x", ">=", 2.5))
    by_method = {g["method"]: g for g in graphs or [] if g.get("capturable")}
    if "ours" in by_method:
        ours = by_method["ours"]
        out.append(Target(f"M=1 {GRAPH_MODEL} in one CUDA graph, bandwidth", 100 * ours["bw_share"], "%", ">=", 70))
        if "bitsandbytes" in by_method:
            out.append(Target(f"M=1 {GRAPH_MODEL} in one CUDA graph, speed-up over bnb",
                              by_method["bitsandbytes"]["us_per_step"] / ours["us_per_step"], "x", ">=", 2.5))
    for m in (16, 64):
        at = [r for r in rows if r["m"] == m]
        if not at:
            continue
        vs_bnb = [speedups(r)[1] for r in at]
        out.append(Target(f"M={m} all layers, min speed-up over bnb",
                          None if None in vs_bnb else min(vs_bnb), "x", ">=", 4))
        out.append(Target(f"M={m} all layers, max time ours/cuBLAS",
                          max(r["us_ours"] / r["us_cublas"] for r in at), "", "<=", 0.6))
    at = [r for r in rows if r["m"] == 2048]
    if at:
        out.append(Target("M=2048 all layers, max time ours/cuBLAS",
                          max(r["us_ours"] / r["us_cublas"] for r in at), "", "<=", 1.15))
    return out


def graph_lines(graphs: list[dict] | None) -> list[str]:
    if graphs is None:
        return ["CUDA graph (M=1): skipped"]
    lines = []
    for g in graphs:
        if g["capturable"]:
            lines.append(f"CUDA graph M=1, {GRAPH_MODEL} qkv+o+gate_up+down, {g['method']}: "
                         f"{g['us_per_step']:.1f} us per step, {100 * g['bw_share']:.0f}% of copy bandwidth "
                         f"({g['bytes_per_step'] / 1e6:.1f} MB per step)")
        else:
            lines.append(f"CUDA graph M=1, {g['method']}: not capturable ({g['error']})")
    return lines


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama2-7b,llama3-8b", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--ms", default=None, help="comma-separated M values (default 1,4,16,64,256,2048; smoke 1,4)")
    p.add_argument("--no-tune", action="store_true", help="use the cached or heuristic plans, measure none")
    p.add_argument("--tune-ms", default=None,
                   help="tune only the M buckets of these values (default: those of --ms); plans already in "
                        "the cache are kept, so a later call can tune the rest")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA graph timing at M=1")
    p.add_argument("--l2-bytes", type=int, default=None,
                   help="rotate weight copies until their total exceeds this (default 64 MiB; smoke 64 KiB)")
    p.add_argument("--timer", choices=("loop", "do_bench"), default="loop",
                   help="loop: CUDA events around back-to-back calls (launch overhead included); "
                        "do_bench: triton.testing.do_bench median (L2 flushed, one call per sample)")
    p.add_argument("--json", metavar="PATH", help="write every row, the graph timings and the targets as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on whatever device there is (CPU), wall-clock timing: checks the harness only")
    args = p.parse_args(argv)
    args.ms = [int(m) for m in args.ms.split(",")] if args.ms else list(SMOKE_MS if args.smoke else FULL_MS)
    args.tune_ms = [int(m) for m in args.tune_ms.split(",")] if args.tune_ms else args.ms
    if args.l2_bytes is None:
        args.l2_bytes = (64 << 10) if args.smoke else (64 << 20)
    if args.smoke:
        args.models = SMOKE_MODELS
        args.timer = "wall (perf_counter)"
    else:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in MODELS]
        if unknown or not names:
            p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
        args.models = {m: MODELS[m] for m in names}
    return args


def bench_device(smoke: bool, name: str) -> torch.device | None:
    """CUDA for a full run (None, with a message, when there is none); anything for --smoke."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if smoke:
        return torch.device("cpu")
    print(f"{name} benchmark: a CUDA GPU is needed for the full run and none is available; "
          "use --smoke to check the harness on CPU", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench_device(args.smoke, "nf4_matmul")
    if device is None:
        return 2
    torch.manual_seed(0)

    bnb, bnb_missing = load_bnb()
    env = environment(device, bnb)
    header = header_lines(env, args)
    print("\n".join(header))
    if bnb is None:
        print(f"note: bitsandbytes not importable ({bnb_missing}); its column is skipped")
    timer = pick_timer(args)

    copy_bytes = (64 << 20) if args.smoke else (1 << 30)
    copy_bw = copy_bandwidth(device, copy_bytes, timer)
    copy_line = f"copy bandwidth ({copy_bytes >> 20} MiB clone, read + write): {copy_bw / 1e12:.3f} TB/s"
    print(copy_line, flush=True)

    shapes = sorted({nk for layers in args.models.values() for nk in layers.values()})
    if device.type == "cuda" and not args.no_tune and not args.smoke:
        print(f"tuning {len(shapes)} shapes x M {args.tune_ms} (cached per GPU in the plan cache) ...", flush=True)
        tune(shapes, args.tune_ms, DTYPE, device, l2_bytes=args.l2_bytes)

    rows = []
    for model, layers in args.models.items():
        for layer, (n, k) in layers.items():
            rows += measure_layer(model, layer, n, k, args.ms, device, args, timer, bnb)

    graphs = None
    if device.type == "cuda" and not args.no_graph and not args.smoke and 1 in args.ms:
        try:
            graphs = graph_timings(device, args, bnb, copy_bw)
        except Exception as e:  # keep the table: report the graph failure instead of dying
            graphs = [dict(method="all", capturable=False, error=f"{type(e).__name__}: {e}".splitlines()[0])]

    decode_model = GRAPH_MODEL if GRAPH_MODEL in args.models else next(iter(args.models))
    goals = targets(rows, copy_bw, decode_model, graphs)

    print()
    print("\n".join(header))
    print(copy_line)
    if bnb is None:
        print(f"bitsandbytes: not importable ({bnb_missing}); bnb column skipped")
    print()
    print("\n".join(table(rows, copy_bw)))
    print()
    print("\n".join(graph_lines(graphs)))
    print()
    if args.smoke:
        print("targets (smoke mode: tiny shapes on CPU, the verdicts mean nothing):")
    else:
        print("targets:")
    print("\n".join("  " + t.line() for t in goals))

    if args.json:
        report = dict(env=env, args={k: v for k, v in vars(args).items() if k != "models"},
                      models=args.models, copy_bandwidth_bytes_per_s=copy_bw, rows=rows, graphs=graphs,
                      targets=[dict(asdict(t), verdict=t.verdict()) for t in goals])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
