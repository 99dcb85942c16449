"""Benchmark loraplex's paged prefill attention against gather + SDPA and flash-attn.

One prompt chunk of --chunk tokens (default 2,048) of one sequence whose first --contexts
positions (default 4k, 32k, 128k) are already in the paged KV cache, Llama-3.1-8B's
attention shapes (Hq = 32, Hkv = 8, D = 128, bf16) and the engine's block size (16,
`EngineConfig.block_size`), the chunk's blocks shuffled over the cache. One run measures
per context:

1. ours          `paged_prefill_attention(q, k_cache, v_cache, cu_seqlens, context_lens,
                 block_tables, scale)`: reads K/V in place through the block table
2. gather+SDPA   `paged_prefill_attention_ref` with the same arguments: today's model path
                 (gather the blocks, `repeat_interleave` to all query heads, SDPA with the
                 causal mask offset by the context; plus one host sync for the chunk bounds).
                 Its transient copies may not fit at long contexts: "OOM" in the row.
3. flash-attn    `flash_attn_varlen_func(..., causal=True)` when `flash_attn` is importable:
                 with its paged `block_table` argument where the version has one and the
                 block size allows it (FlashAttention-2 needs a multiple of 256), else on
                 contiguous K/V copied out of the cache before timing (so not paying for
                 the paging at all: a floor, not a like-for-like rival). The mode is printed.

Per method: time (us per call), achieved bandwidth, FLOP/s, peak memory, and the time of
ours over this method's (< 1: ours faster).
    bytes   = 2 * (context + chunk) * Hkv * D * 2 (K and V, each position once)
              + 2 * chunk * Hq * D * 2 (q read, out written), in bf16
    FLOPs   = 4 * Hq * D * pairs, pairs = chunk * context + chunk * (chunk + 1) / 2
              (the causal (query, key) pairs: two products of 2 FLOPs per multiply-add)
    peak    = torch.cuda.max_memory_allocated() during one call minus what was allocated
              before it (the output included)
The bandwidth counts the bytes that must move at least: the kernel itself reads each K/V
tile once per query tile (from L2 mostly), so it is an effective figure, not DRAM traffic.

Timing: CUDA events around back-to-back calls, median of --samples samples after warm-up
(`loop_timer` of bench/nf4_matmul.py). Every method rotates among enough copies of (q,
cache) that their total exceeds --l2-bytes (default 128 MiB; an H100/H200 has 50 MB of L2),
so each call reads K/V from HBM. Before timing, every method's output is checked against the
reference on the chunk's first and last --check-rows rows (relative error <= 2e-2; the
reference computed on just those rows fits where the whole chunk's may not); a mismatch
aborts the run.

Run:
    python bench/attention.py                         # on a CUDA GPU machine (full run)
    python bench/attention.py --contexts 4096 --chunk 512
    python bench/attention.py --smoke                 # anywhere (CPU): harness check only
    TRITON_INTERPRET=1 python bench/attention.py --smoke   # real Triton kernel, interpreted
`--smoke` uses tiny shapes (Hq 8, Hkv 2, D 64, a 40-token chunk at contexts 0, 37, 130),
checks ours and the reference against the fp32 reference on every row, and on CPU measures
nothing (timings of the interpreter mean nothing): the table says "not measured: no GPU".
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from loraplex.kernels import runtime  # noqa: E402
from loraplex.kernels.prefill_attention import (paged_prefill_attention,  # noqa: E402
                                                paged_prefill_attention_ref, prefill_tiles)

from bench.lora import ints  # noqa: E402
from bench.nf4_matmul import bench_device, copies_for, fmt, loop_timer, markdown, rel_error  # noqa: E402
from bench.nf4_matmul import environment as nf4_environment  # noqa: E402

FULL = dict(contexts=(4096, 32768, 131072), chunk=2048, hq=32, hkv=8, d=128)  # Llama-3.1-8B
SMOKE = dict(contexts=(0, 37, 130), chunk=40, hq=8, hkv=2, d=64)
DTYPE = torch.bfloat16
BLOCK_SIZE = 16  # the engine's default (EngineConfig.block_size)
REL_TOL = 2e-2   # ||out - ref|| / ||ref|| on the checked rows
NOT_MEASURED = "not measured: no GPU"
METHODS = ("ours", "gather+SDPA", "flash-attn")


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------


def load_flash():
    """flash_attn_varlen_func, or (None, reason) when flash_attn cannot be imported."""
    try:
        from flash_attn import flash_attn_varlen_func
        import flash_attn
    except Exception as e:  # missing, or built for another torch / CUDA
        return None, None, f"{type(e).__name__}: {e}".splitlines()[0]
    return flash_attn_varlen_func, flash_attn.__version__, None


def ours_backend(device: torch.device) -> str:
    if runtime.use_triton(device):
        return "Triton" + (" (interpreted)" if device.type == "cpu" else "")
    return "torch reference (no Triton on this device)"


def environment(device: torch.device, flash_version: str | None) -> dict[str, str]:
    env = nf4_environment(device, None)
    del env["bitsandbytes"]  # not a baseline here
    return {**env, "flash_attn": flash_version or "not installed", "ours": ours_backend(device)}


def header_lines(env: dict[str, str], args) -> list[str]:
    mode = "SMOKE (harness check only, not performance)" if args.smoke else "full"
    block_m, block_n = prefill_tiles(args.hq // args.hkv, args.d)
    return [
        f"# prefill attention benchmark, {mode}",
        f"date {env['date']} | device {env['device']}",
        f"torch {env['torch']} | triton {env['triton']} | flash_attn {env['flash_attn']}"
        f" | TRITON_INTERPRET={env['triton_interpret']} | ours: {env['ours']}",
        f"Hq {args.hq} | Hkv {args.hkv} | D {args.d} | {str(DTYPE).removeprefix('torch.')}"
        f" | block size {args.block_size} | chunk {args.chunk}"
        f" | ours' tiles BLOCK_M {block_m} BLOCK_N {block_n}"
        f" | timer {args.timer} | samples {args.samples} | l2-bytes {args.l2_bytes}",
    ]


# ----------------------------------------------------------------------------------------
# One point: a chunk at a context, its paged cache and copies
# ----------------------------------------------------------------------------------------


class Point:
    """q and a paged cache holding context + chunk positions of one sequence in shuffled
    blocks (every position written), plus copies of both until they exceed --l2-bytes."""

    def __init__(self, context: int, args, device: torch.device):
        self.context, self.chunk = context, args.chunk
        self.total = context + args.chunk
        bs = args.block_size
        blocks = -(-self.total // bs)
        self.scale = args.d ** -0.5
        self.cu_seqlens = torch.tensor([0, args.chunk], dtype=torch.int32, device=device)
        self.context_lens = torch.tensor([context], dtype=torch.int32, device=device)
        self.tables = torch.randperm(blocks, device=device).to(torch.int32)[None]  # [1, blocks]
        shape = (blocks, bs, args.hkv, args.d)
        per_copy = 2 * math.prod(shape) * 2 + 2 * args.chunk * args.hq * args.d * 2
        self.copies = [(torch.randn(args.chunk, args.hq, args.d, device=device, dtype=DTYPE),
                        torch.randn(shape, device=device, dtype=DTYPE),
                        torch.randn(shape, device=device, dtype=DTYPE))
                       for _ in range(copies_for(per_copy, args.l2_bytes))]
        hq, hkv, d, t = args.hq, args.hkv, args.d, args.chunk
        self.bytes = 2 * self.total * hkv * d * 2 + 2 * t * hq * d * 2
        self.pairs = t * context + t * (t + 1) // 2
        self.flops = 4 * hq * d * self.pairs

    def args(self, i: int = 0) -> tuple:
        q, k, v = self.copies[i]
        return q, k, v, self.cu_seqlens, self.context_lens, self.tables, self.scale

    def contiguous_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K/V [total, Hkv, D] copied out of copy i's cache (flash-attn)."""
        _, k, v = self.copies[i]
        blocks = self.tables[0].long()
        return (k[blocks].flatten(0, 1)[: self.total].contiguous(),
                v[blocks].flatten(0, 1)[: self.total].contiguous())

    def check_rows(self, n: int) -> list[tuple[int, int]]:
        """(first row, rows) of the chunk the outputs are checked on: its first and last n."""
        if 2 * n >= self.chunk:
            return [(0, self.chunk)]
        return [(0, n), (self.chunk - n, n)]


def reference_rows(point: Point, rows: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """The reference on just `rows` of the chunk (as sub-chunks of one launch), in `dtype`."""
    q, k, v, _, _, tables, scale = point.args()
    qs = torch.cat([q[r0:r0 + n] for r0, n in rows]).to(dtype)
    lens = torch.tensor([0] + [n for _, n in rows], dtype=torch.int32, device=q.device)
    cu = lens.cumsum(0, dtype=torch.int32)
    ctx = torch.tensor([point.context + r0 for r0, _ in rows], dtype=torch.int32, device=q.device)
    return paged_prefill_attention_ref(qs, k.to(dtype), v.to(dtype), cu, ctx, tables.expand(len(rows), -1),
                                       scale)


def pick(out: torch.Tensor, rows: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([out[r0:r0 + n] for r0, n in rows])


# ----------------------------------------------------------------------------------------
# The methods: closures over one copy, each returning [chunk, Hq, D]
# ----------------------------------------------------------------------------------------


def ours_fn(point: Point, i: int) -> Callable[[], torch.Tensor]:
    a = point.args(i)
    return lambda: paged_prefill_attention(*a)


def gather_fn(point: Point, i: int) -> Callable[[], torch.Tensor]:
    a = point.args(i)
    return lambda: paged_prefill_attention_ref(*a)


def flash_modes(flash, block_size: int) -> str:
    """'paged' where flash_attn_varlen_func takes a block table this block size suits (FA2:
    a multiple of 256), else 'contiguous'."""
    try:
        paged = "block_table" in inspect.signature(flash).parameters
    except (TypeError, ValueError):
        paged = False
    return "paged" if paged and block_size % 256 == 0 else "contiguous"


def flash_fn(flash, mode: str, point: Point, i: int) -> Callable[[], torch.Tensor]:
    q, k_cache, v_cache = point.copies[i]
    cu_q = point.cu_seqlens
    cu_k = torch.tensor([0, point.total], dtype=torch.int32, device=q.device)
    common = dict(softmax_scale=point.scale, causal=True)  # causal aligned bottom-right, as ours
    if mode == "paged":
        return lambda: flash(q, k_cache, v_cache, cu_q, cu_k, point.chunk, point.total,
                             block_table=point.tables, **common)
    k, v = point.contiguous_kv(i)
    return lambda: flash(q, k, v, cu_q, cu_k, point.chunk, point.total, **common)


# ----------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Memory allocated at the peak of one call beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - before


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure(method: str, make: Callable[[Point, int], Callable[[], torch.Tensor]], point: Point,
            expected: torch.Tensor, rows: list[tuple[int, int]], device: torch.device, args) -> dict:
    """Check one method against the reference rows, then time it (CUDA), catching OOM."""
    row = dict(context=point.context, chunk=point.chunk, method=method, us=None, bytes=point.bytes,
               flops=point.flops, gb_s=None, tflop_s=None, peak_bytes=None, rel_err=None, error=None)
    try:
        out = make(point, 0)()
        row["rel_err"] = err = rel_error(pick(out, rows).float(), expected.float())
        del out
        if not err <= REL_TOL:  # `not <=` also catches NaN
            raise SystemExit(f"WRONG RESULT: {method} at context {point.context}: relative error {err:.3g} > "
                             f"{REL_TOL} against paged_prefill_attention_ref on {sum(n for _, n in rows)} "
                             "rows; "
                             "not timing a wrong method")
        if device.type != "cuda":
            return row
        fns = [make(point, i) for i in range(len(point.copies))]
        row["peak_bytes"] = peak_bytes(fns[0], device)
        row["us"] = us = args.timer_fn(fns)
        row["gb_s"] = point.bytes / (us * 1e-6) / 1e9
        row["tflop_s"] = point.flops / (us * 1e-6) / 1e12
    except Exception as e:
        if not is_oom(e):
            raise
        row["error"] = "OOM"
        row["rel_err"] = None
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    return row


def measure_point(context: int, device: torch.device, args, flash, flash_mode: str | None) -> list[dict]:
    point = Point(context, args, device)
    rows = point.check_rows(args.check_rows)
    ref_dtype = torch.float32 if args.smoke else DTYPE  # fp32 where it is cheap: the exact answer
    expected = reference_rows(point, rows, ref_dtype)
    methods = [("ours", ours_fn), ("gather+SDPA", gather_fn)]
    if flash is not None and device.type == "cuda":
        methods.append((f"flash-attn ({flash_mode})", functools.partial(flash_fn, flash, flash_mode)))
    out = []
    for name, make in methods:
        row = measure(name, make, point, expected, rows, device, args)
        row["copies"] = len(point.copies)
        out.append(row)
        print("  " + inline(row), flush=True)
    ours = out[0]["us"]
    for row in out:
        row["ours_over_this"] = ours / row["us"] if ours is not None and row["us"] is not None else None
    del point, expected
    return out


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def inline(row: dict) -> str:
    if row["error"]:
        what = row["error"]
    elif row["us"] is None:
        what = f"agrees (rel err {row['rel_err']:.2g}), {NOT_MEASURED}"
    else:
        what = (f"{row['us']:10.1f} us  {row['gb_s']:7.0f} GB/s  {row['tflop_s']:6.1f} TFLOP/s  "
                f"peak {row['peak_bytes'] / 2**20:8.1f} MiB  rel err {row['rel_err']:.2g}")
    return f"context {row['context']:>6} chunk {row['chunk']}  {row['method']:<24} {what}"


HEAD = ["context", "chunk", "method", "time us", "GB/s", "TFLOP/s", "peak MiB", "ours/this", "rel err"]
NUMERIC = {0, 1, 3, 4, 5, 6, 7, 8}


def cells(row: dict) -> list[str]:
    if row["error"]:
        time_cell = row["error"]
    else:
        time_cell = NOT_MEASURED if row["us"] is None else f"{row['us']:.1f}"
    peak = None if row["peak_bytes"] is None else row["peak_bytes"] / 2**20
    return [str(row["context"]), str(row["chunk"]), row["method"], time_cell, fmt(row["gb_s"], ".0f"),
            fmt(row["tflop_s"], ".1f"), fmt(peak, ".1f"), fmt(row.get("ours_over_this"), ".2f"),
            fmt(row["rel_err"], ".2g")]


def summary_lines(rows: list[dict]) -> list[str]:
    """Per context: ours' time over each baseline's (< 1: ours faster)."""
    lines = []
    for context in dict.fromkeys(r["context"] for r in rows):
        at = [r for r in rows if r["context"] == context]
        parts = []
        for r in at[1:]:
            if r["ours_over_this"] is not None:
                parts.append(f"ours/{r['method']} {r['ours_over_this']:.2f}")
            else:
                parts.append(f"ours/{r['method']} n/a ({r['error'] or NOT_MEASURED})")
        lines.append(f"context {context}: " + ", ".join(parts))
    return lines


def agreement_line(rows: list[dict]) -> str:
    checked = [r["rel_err"] for r in rows if r["rel_err"] is not None]
    worst = f"max relative error {max(checked):.2g} <= {REL_TOL}" if checked else "none checked"
    return (f"agreement: {len(checked)} of {len(rows)} rows checked against paged_prefill_attention_ref, "
            f"{worst}")


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default=None,
                   help="positions cached before the chunk (default 4096,32768,131072; smoke 0,37,130)")
    p.add_argument("--chunk", type=int, default=None, help="prompt chunk tokens (default 2048; smoke 40)")
    p.add_argument("--hq", type=int, default=None, help="query heads (default 32; smoke 8)")
    p.add_argument("--hkv", type=int, default=None, help="kv heads (default 8; smoke 2)")
    p.add_argument("--d", type=int, default=None, help="head dim (default 128; smoke 64)")
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                   help="KV cache positions per block (default 16, the engine's)")
    p.add_argument("--samples", type=int, default=10, help="timing samples per method")
    p.add_argument("--check-rows", type=int, default=64,
                   help="rows at each end of the chunk checked against the reference (default 64)")
    p.add_argument("--l2-bytes", type=int, default=None,
                   help="rotate (q, cache) copies until their total exceeds this "
                        "(default 128 MiB; smoke 64 KiB)")
    p.add_argument("--no-flash", action="store_true", help="skip flash-attn even where it is importable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every row as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on whatever device there is (CPU: nothing timed): "
                        "checks the harness only")
    args = p.parse_args(argv)
    d = SMOKE if args.smoke else FULL
    args.contexts = ints(args.contexts) if args.contexts else list(d["contexts"])
    for key in ("chunk", "hq", "hkv", "d"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    if args.l2_bytes is None:
        args.l2_bytes = (64 << 10) if args.smoke else (128 << 20)
    if not args.contexts or min(args.contexts) < 0 or args.chunk < 1:
        p.error("contexts must be >= 0 and the chunk >= 1 token")
    if args.hkv < 1 or args.hq % args.hkv:
        p.error(f"--hq ({args.hq}) must be a multiple of --hkv ({args.hkv})")
    if args.block_size < 1 or args.block_size & (args.block_size - 1):
        p.error(f"--block-size must be a power of two, got {args.block_size}")
    args.timer = "loop (CUDA events)" if torch.cuda.is_available() else "none (no GPU)"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench_device(args.smoke, "prefill attention")
    if device is None:
        return 2
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    args.timer_fn = functools.partial(loop_timer, samples=args.samples, sample_ms=5.0)

    flash, flash_version, flash_missing = (None, None, "--no-flash") if args.no_flash else load_flash()
    flash_mode = flash_modes(flash, args.block_size) if flash is not None else None
    env = environment(device, flash_version)
    header = header_lines(env, args)
    print("\n".join(header), flush=True)
    flash_line = (f"flash-attn: {flash_mode} K/V" if flash is not None
                  else f"flash-attn: not run ({flash_missing})")
    print(flash_line, flush=True)

    rows = []
    for context in args.contexts:
        print(f"[{time.perf_counter() - started:.0f} s] context {context}, chunk {args.chunk}", flush=True)
        rows += measure_point(context, device, args, flash, flash_mode)
    elapsed = time.perf_counter() - started

    print()
    print("\n".join(header))
    print(flash_line)
    print("bytes = 2 (K, V) * (context + chunk) * Hkv * D * 2 + 2 (q, out) * chunk * Hq * D * 2; "
          "FLOPs = 4 * Hq * D * causal pairs; ours/this = time ratio (< 1: ours faster)")
    print()
    print("\n".join(markdown(HEAD, [cells(r) for r in rows], NUMERIC)))
    print()
    print("\n".join(summary_lines(rows)))
    print(agreement_line(rows))
    print(f"\n{len(rows)} rows in {elapsed:.1f} s")

    if args.json:
        skip = {"timer_fn"}
        report = dict(env=env, args={k: v for k, v in vars(args).items() if k not in skip},
                      flash_mode=flash_mode, flash_missing=flash_missing, rows=rows, seconds=elapsed)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
