"""Fused NF4 dequant-matmul: `y[M, N] = x[M, K] @ dequantize_nf4(w).T (+ bias)`.

Three ways to run one product, picked per (device, N, K, M bucket, dtype) by `plan_for`
(measured by `tune` at warm-up, else a heuristic):

- `gemv`  (decode, M = 1): CUDA cores. Each program streams BLOCK_N weight rows over its
  share of K exactly once in 16-byte loads, decodes nibbles with one gather per tile from
  the 16-entry code book held in registers (a shared-memory lookup, no global load per
  value), sums each 64-value block unscaled and multiplies once by the block's absmax,
  decoded inline from the double quantization.
- `gemm`  (M >= 2): tensor cores. Each program dequantizes a [BLOCK_N, BLOCK_K] weight tile
  once and reuses it for BLOCK_M rows (`tl.dot`, fp32 accumulation).
- `cublas` (large M): dequantize into a scratch bf16/fp16 buffer, then `F.linear`. The
  scratch (a `Workspace` buffer, see workspace.py) is reused between calls and layers; no
  dequantized weight stays resident per layer.

Split-K (several programs per output tile, so that a single row keeps every SM busy) uses
the self-cleaning buffers of `splitk.py`: no memset, no second kernel, a launch grid that
never depends on data (decode steps can be captured in CUDA graphs). An engine fixes its
plans once (`PlanTable`) and passes its frozen workspace, sized for those plans.

On CPU the product runs `nf4_matmul_ref` (dequantize + `F.linear`), unless
`TRITON_INTERPRET=1`, in which case the Triton kernels run in Triton's interpreter (tests).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import runtime
from .nf4 import NF4Weight, dequantize_nf4, nf4_levels
from .runtime import INTERPRET
from .splitk import split_for, splitk_needs
from .workspace import Need, Workspace, standalone

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): the reference path still works on CPU
    triton = None

_ACT_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------


def nf4_matmul_ref(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch oracle and CPU fallback: `x @ dequantize_nf4(w).T + bias`."""
    return F.linear(x, dequantize_nf4(w, x.dtype), None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if triton is not None:
    from .splitk import k_range, write_tile

    @triton.jit
    def _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, mask,
                      NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
        # fp32 absmax of blocks `blk`: code2[absmax_u8] * absmax2[blk // 256] + offset.
        if NESTED:
            a = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            s2 = tl.load(absmax2_ptr + blk // NESTED_BLOCK, mask=mask, other=0.0)
            return tl.load(code2_ptr + a) * s2 + offset
        else:
            return tl.load(absmax_ptr + blk, mask=mask, other=0.0)

    @triton.jit
    def _nibble(words, e: tl.constexpr):
        # Code of value e (0..7) of each uint32 word: bitsandbytes packs value 2j in the high
        # and 2j+1 in the low nibble of byte j.
        return ((words >> (8 * (e // 2) + 4 - 4 * (e % 2))) & 0xF).to(tl.int32)

    @triton.jit
    def _decode_words(words, levels):
        # uint32 words [R, B, W] -> NF4 levels [R, B, 8 * W] in k order, with one gather from
        # the 16-entry code book held in registers (no global load per value). Nested joins
        # keep a word's 8 values in its own thread; joined slot i holds value bitrev3(i) so
        # that the flattened order is k order.
        r = tl.join(tl.join(tl.join(_nibble(words, 0), _nibble(words, 4)),
                            tl.join(_nibble(words, 2), _nibble(words, 6))),
                    tl.join(tl.join(_nibble(words, 1), _nibble(words, 5)),
                            tl.join(_nibble(words, 3), _nibble(words, 7))))
        idx = tl.reshape(r, [words.shape[0], words.shape[1], 8 * words.shape[2]])
        flat = tl.gather(levels, tl.reshape(idx, [idx.numel]), 0)
        return tl.reshape(flat, idx.shape)

    @triton.jit
    def _weight_chunk(codes_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, offs_n, n_mask, k0, K, KH,
                      NB: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
        # Rows `offs_n` of the K chunk starting at k0: code words [BLOCK_N, NB, 8] (a 64-value
        # block is 8 uint32 words, read as 16-byte vectors), their fp32 block absmax
        # [BLOCK_N, NB], and which of the NB blocks lie inside K.
        b = tl.arange(0, NB)
        blocks = k0 // 64 + b
        b_mask = blocks < K // 64
        row = codes_ptr.to(tl.pointer_type(tl.uint32)) + offs_n.to(tl.int64)[:, None, None] * (KH // 4)
        words = tl.load(row + k0 // 8 + 8 * b[None, :, None] + tl.arange(0, 8)[None, None, :],
                        mask=n_mask[:, None, None] & b_mask[None, :, None], other=0,
                        eviction_policy="evict_first")
        scale = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset,
                              offs_n[:, None] * (K // 64) + blocks[None, :],
                              n_mask[:, None] & b_mask[None, :], NESTED, NESTED_BLOCK)
        return words, scale, b_mask

    @triton.jit(do_not_specialize=["M"])  # M changes from step to step: one compiled kernel for all
    def _nf4_gemv_kernel(
        x_ptr, codes_ptr, absmax_ptr, absmax2_ptr, code2_ptr, levels_ptr, offset,
        bias_ptr, y_ptr, ws_ptr, ticket_ptr, M, N, K, KH,
        NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        # grid = (cdiv(N, BLOCK_N), SPLIT_K, M): one output row, BLOCK_N columns, one K share.
        # Codes are read as uint32 words in tiles [BLOCK_N rows, NB blocks of 64 values,
        # 8 words] (16-byte loads); a block's unscaled sum is a reduction along the last axis,
        # scaled once by the block's absmax.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        NB: tl.constexpr = BLOCK_K // 64
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_offs = 64 * tl.arange(0, NB)[:, None] + tl.arange(0, 64)[None, :]
        levels = tl.load(levels_ptr + tl.arange(0, 16))
        k_lo, k_hi = k_range(pid_k, K, BLOCK_K, SPLIT_K)
        acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k0 = tl.multiple_of(k0, BLOCK_K)
            words, scale, b_mask = _weight_chunk(codes_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset,
                                                 offs_n, n_mask, k0, K, KH, NB, NESTED, NESTED_BLOCK)
            x = tl.load(x_ptr + pid_m * K + k0 + x_offs, mask=b_mask[:, None], other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            block_sums = tl.sum(_decode_words(words, levels) * x[None], axis=2)  # unscaled
            acc += block_sums * scale
        out = tl.sum(acc, axis=1)
        write_tile(out[None, :], pid_m + tl.arange(0, 1), offs_n, M, N, y_ptr, bias_ptr,
                    ws_ptr, ticket_ptr, pid_m * tl.cdiv(N, BLOCK_N) + pid_n, HAS_BIAS, SPLIT_K)

    @triton.jit(do_not_specialize=["M"])
    def _nf4_gemm_kernel(
        x_ptr, codes_ptr, absmax_ptr, absmax2_ptr, code2_ptr, levels_ptr, offset,
        bias_ptr, y_ptr, ws_ptr, ticket_ptr, M, N, K, KH,
        NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # grid = (m_tiles * n_tiles, SPLIT_K); tiles ordered in groups of GROUP_M rows of
        # tiles so that neighbouring programs share weight tiles in L2.
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        m_tiles = tl.cdiv(M, BLOCK_M)
        n_tiles = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * n_tiles)
        first_m = group * GROUP_M
        group_rows = tl.minimum(m_tiles - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * n_tiles)) % group_rows
        pid_n = (pid % (GROUP_M * n_tiles)) // group_rows

        NB: tl.constexpr = BLOCK_K // 64
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        kk = tl.arange(0, BLOCK_K)
        levels = tl.load(levels_ptr + tl.arange(0, 16))
        k_lo, k_hi = k_range(pid_k, K, BLOCK_K, SPLIT_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k0 = tl.multiple_of(k0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + kk)[None, :],
                        mask=m_mask[:, None] & ((k0 + kk) < K)[None, :], other=0.0)
            words, scale, _ = _weight_chunk(codes_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset,
                                            offs_n, n_mask, k0, K, KH, NB, NESTED, NESTED_BLOCK)
            w = tl.reshape(_decode_words(words, levels) * scale[:, :, None], [BLOCK_N, BLOCK_K])
            if DOT_FP32:  # interpreter: its bf16 arithmetic is wrong, compute in fp32
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        write_tile(acc, offs_m, offs_n, M, N, y_ptr, bias_ptr, ws_ptr, ticket_ptr,
                    pid_m * n_tiles + pid_n, HAS_BIAS, SPLIT_K)

    @triton.jit
    def _nf4_dequant_kernel(codes_ptr, absmax_ptr, absmax2_ptr, code2_ptr, levels_ptr, offset,
                            out_ptr, n_blocks,
                            NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
        # BLOCKS 64-value blocks (8 code words each) -> 64 * BLOCKS values, row-major like
        # the weight itself.
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = blk < n_blocks
        w8 = tl.arange(0, 8)
        words = tl.load(codes_ptr.to(tl.pointer_type(tl.uint32)) + 8 * blk[:, None, None] + w8[None, None, :],
                        mask=mask[:, None, None], other=0, eviction_policy="evict_first")
        levels = tl.load(levels_ptr + tl.arange(0, 16))
        scale = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, mask, NESTED, NESTED_BLOCK)
        w = tl.reshape(_decode_words(words, levels), [BLOCKS, 64]) * scale[:, None]
        out = out_ptr + 64 * blk[:, None] + tl.arange(0, 64)[None, :]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask[:, None])


# ----------------------------------------------------------------------------------------
# Plans: which kernel and tile sizes for a shape
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one product runs. `kind` is 'gemv', 'gemm' or 'cublas'."""

    kind: str
    block_m: int = 1
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the largest bucket for anything above it)."""
    return M_BUCKETS[-1] if m >= M_BUCKETS[-1] else 1 << (m - 1).bit_length()


def heuristic_plan(n: int, k: int, m: int, device: torch.device) -> Plan:
    """A reasonable plan without measurement (used until `tune` has measured a shape)."""
    sms = runtime.num_sms(device)
    if device.type != "cuda":  # interpreter: the same choices as below with small tiles (quick tests)
        if m == 1:
            return Plan("gemv", block_n=16, block_k=128, split_k=split_for(-(-n // 16), k // 128, sms))
        if m <= 64:
            tiles = -(-n // 32) * -(-m // 16)
            return Plan("gemm", block_m=16, block_n=32, block_k=64, split_k=split_for(tiles, k // 64, sms))
        return Plan("cublas") if m >= 1024 else Plan("gemm", block_m=16, block_n=32, block_k=64)
    if m == 1:
        block_k = 512 if k % 512 == 0 else 256
        tiles = -(-n // 16)
        return Plan("gemv", block_n=16, block_k=block_k, split_k=split_for(tiles, k // block_k, sms),
                    num_warps=4)
    if m <= 64:
        block_m = max(16, m_bucket(m))
        tiles = -(-n // 64) * -(-m // block_m)
        return Plan("gemm", block_m=block_m, block_n=64, block_k=128,
                    split_k=split_for(tiles, k // 128, sms), num_warps=4, num_stages=3)
    if m < 1024:
        return Plan("gemm", block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
    return Plan("cublas")


def candidate_plans(n: int, k: int, m: int, device: torch.device) -> list[Plan]:
    """Plans `tune` measures for one shape and M bucket (tens, not hundreds: each one is
    timed at warm-up; compiled kernels are shared between shapes, N and K being arguments)."""
    sms = runtime.num_sms(device)
    plans: list[Plan] = []
    if m == 1:
        for bn in (8, 16, 32, 64):
            for bk in (256, 512, 1024):
                if k % bk:
                    continue
                tiles = -(-n // bn)
                for warps in (2, 4, 8):
                    if not 16 <= bn * bk // 2 // (32 * warps) <= 64:  # code bytes per thread and step
                        continue
                    for split in (1, 2, 4, 8, 16):
                        programs = tiles * split
                        if split <= k // bk and (sms <= programs <= 16 * sms or (split == 1 and programs > sms)):
                            plans.append(Plan("gemv", block_n=bn, block_k=bk, split_k=split, num_warps=warps))
        return plans
    bucket = m_bucket(m)
    for bm in sorted({min(128, max(16, bucket)), min(128, max(16, bucket // 2))}):
        for bn in (64, 128, 256):
            for bk in (64, 128):
                if k % bk or bm * bn > 128 * 128:
                    continue
                split = split_for(-(-m // bm) * -(-n // bn), k // bk, sms)
                for split in sorted({split, max(1, split // 2)}):  # about two waves, or one
                    for warps, stages in ((4, 3), (8, 4)):
                        plans.append(Plan("gemm", bm, bn, bk, split, warps, stages))
    if m >= 64:
        plans.append(Plan("cublas"))
    return plans


class _PlanCache:
    """Measured plans per (device name, dtype, N, K, M bucket), kept in memory and on disk."""

    def __init__(self) -> None:
        self._plans: dict[str, Plan] = {}
        self._loaded = False
        self._lock = threading.Lock()

    @staticmethod
    def path() -> Path:
        default = Path.home() / ".cache" / "loraplex" / "nf4_plans.json"
        return Path(os.environ.get("LORAPLEX_TUNE_CACHE", default))

    @staticmethod
    def key(device: torch.device, dtype: torch.dtype, n: int, k: int, bucket: int) -> str:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        version = triton.__version__ if triton is not None else "none"
        return f"{name}|triton-{version}|{str(dtype).removeprefix('torch.')}|{n}x{k}|m{bucket}"

    def _load(self) -> None:
        self._loaded = True
        try:
            raw = json.loads(self.path().read_text())
            self._plans.update({key: Plan(**value) for key, value in raw.items()})
        except (OSError, ValueError, TypeError):
            pass  # no cache yet, or an unreadable one: tune again

    def get(self, key: str) -> Plan | None:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load()
        return self._plans.get(key)

    def put(self, key: str, plan: Plan) -> None:
        with self._lock:
            self._plans[key] = plan
            try:
                path = self.path()
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({k: asdict(v) for k, v in self._plans.items()}, indent=1))
                tmp.replace(path)
            except OSError:
                pass  # read-only home: keep the plan in memory only


_plans = _PlanCache()
_chosen: dict[tuple, Plan] = {}  # per-call lookup without building cache keys (hot path)


def plan_for(w: NF4Weight, m: int, dtype: torch.dtype) -> Plan:
    """The measured plan for this shape and M bucket, else the heuristic one."""
    n, k = w.shape
    bucket = m_bucket(m)
    memo_key = (w.device, dtype, n, k, bucket)
    plan = _chosen.get(memo_key)
    if plan is None:
        if w.device.type == "cuda":
            plan = _plans.get(_PlanCache.key(w.device, dtype, n, k, bucket))
        plan = _chosen[memo_key] = plan or heuristic_plan(n, k, bucket, w.device)
    return plan


class PlanTable:
    """The plan of every (N, K, M bucket) an engine can meet, chosen once at start-up (the
    measured plan where the cache has one, else the heuristic). What a step runs, and what
    the engine's workspace was sized for, then cannot change behind the engine's back: a
    later `tune` changes new tables, not this one."""

    def __init__(self, shapes: set[tuple[int, int]], max_m: int, dtype: torch.dtype, device: torch.device):
        self.max_m, self.dtype = max_m, dtype
        self.buckets = tuple(b for b in M_BUCKETS if b <= m_bucket(max_m))
        self._plans: dict[tuple[int, int, int], Plan] = {}
        for n, k in sorted(shapes):
            for bucket in self.buckets:
                measured = _plans.get(_PlanCache.key(device, dtype, n, k, bucket)) if device.type == "cuda" else None
                self._plans[(n, k, bucket)] = measured or heuristic_plan(n, k, bucket, device)

    def __call__(self, n: int, k: int, m: int) -> Plan:
        plan = self._plans.get((n, k, m_bucket(m)))
        if plan is None or m > self.max_m:
            raise ValueError(f"nf4_matmul: no plan for N={n}, K={k}, M={m}: the engine's table covers its "
                             f"model's shapes up to M={self.max_m}")
        return plan

    def items(self) -> list[tuple[tuple[int, int, int], Plan]]:
        """((N, K, M bucket), plan) for every entry."""
        return list(self._plans.items())


# ----------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------

DENSE = "nf4.dense"  # the cuBLAS plan's dequantized weight, one layer at a time


def workspace_needs(plan: Plan, m: int, n: int, k: int, dtype: torch.dtype) -> tuple[Need, ...]:
    """Workspace of one product [m, k] x [n, k].T under `plan`."""
    if plan.kind == "cublas":
        return (Need(DENSE, n * k, dtype),)
    tiles = -(-n // plan.block_n) * (m if plan.kind == "gemv" else -(-m // plan.block_m))
    return splitk_needs(plan.split_k, m * n, tiles)


def _weight_args(w: NF4Weight) -> tuple:
    levels = nf4_levels(w.device)
    if w.nested:
        return w.codes, w.absmax, w.absmax2, w.code2, levels, w.offset
    return w.codes, w.absmax, w.absmax, w.absmax, levels, 0.0


def _check(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None) -> None:
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, weight expects K={k}")
    if k % 64:
        raise ValueError(f"nf4_matmul: K={k} must be a multiple of 64")
    if w.blocksize != 64:
        raise ValueError(f"nf4_matmul: the kernels need NF4 blocksize 64, this weight has {w.blocksize}")
    if x.device != w.device:
        raise ValueError(f"nf4_matmul: x is on {x.device}, weight on {w.device}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"nf4_matmul: bias must have shape [{n}], got {list(bias.shape)}")


def dequantize_to(w: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized [N, K] weight into `out` (bf16/fp16/fp32) with one kernel launch."""
    if w.blocksize != 64 or w.shape[1] % 64 or out.shape != w.shape:
        raise ValueError(f"dequantize_to: needs blocksize 64, K a multiple of 64 and out of shape {list(w.shape)}")
    n_blocks = w.absmax.numel()
    blocks = 64
    runtime.launch(_nf4_dequant_kernel, (triton.cdiv(n_blocks, blocks),),
                   *_weight_args(w), out, n_blocks, NESTED=w.nested, NESTED_BLOCK=w.nested_blocksize, BLOCKS=blocks)
    return out


def _run_plan(plan: Plan, x2: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, ws: Workspace) -> torch.Tensor:
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    buffers = ws.take(workspace_needs(plan, m, n, k, x2.dtype))
    if plan.kind == "cublas":
        w_dense = dequantize_to(w, buffers[0].view(n, k))
        return torch.addmm(bias.to(x2.dtype), x2, w_dense.T, out=y) if bias is not None \
            else torch.mm(x2, w_dense.T, out=y)

    common = dict(NESTED=w.nested, NESTED_BLOCK=w.nested_blocksize, HAS_BIAS=bias is not None,
                  BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, SPLIT_K=plan.split_k,
                  num_warps=plan.num_warps, num_stages=plan.num_stages)
    n_tiles = triton.cdiv(n, plan.block_n)
    if plan.kind == "gemv":
        grid = (n_tiles, plan.split_k, m)
        kernel, extra = _nf4_gemv_kernel, {}
    elif plan.kind == "gemm":
        grid = (triton.cdiv(m, plan.block_m) * n_tiles, plan.split_k)
        kernel, extra = _nf4_gemm_kernel, dict(BLOCK_M=plan.block_m, GROUP_M=8, DOT_FP32=INTERPRET)
    else:
        raise ValueError(f"unknown plan kind {plan.kind!r}")
    partials, tickets = buffers if buffers else (y, y)  # unused without a split
    runtime.launch(kernel, grid, x2, *_weight_args(w), bias if bias is not None else y, y, partials, tickets,
                   m, n, k, k // 2, **common, **extra)
    return y


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None,
               plan: Plan | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """`y = x @ dequantize_nf4(w).T + bias` for x [..., K] in bf16/fp16 (fp32 accumulation).

    `plan` forces a kernel configuration (an engine's `PlanTable`, tests, tuning); by
    default the measured or heuristic plan for this shape is used. `workspace` holds the
    split-K and cuBLAS scratch (an engine passes its frozen one; default: a growable one).
    """
    _check(x, w, bias)
    if not runtime.use_triton(x.device):
        return nf4_matmul_ref(x, w, bias)
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"nf4_matmul: activations must be bfloat16 or float16, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    plan = plan or plan_for(w, x2.shape[0], x.dtype)
    return _run_plan(plan, x2, w, bias, workspace or standalone(x.device)).view(*lead, w.shape[0])


# ----------------------------------------------------------------------------------------
# Tuning (warm-up only; never on the request path)
# ----------------------------------------------------------------------------------------


def tune(shapes: list[tuple[int, int]], ms: list[int], dtype: torch.dtype = torch.bfloat16,
         device: torch.device | str = "cuda", l2_bytes: int = 64 << 20, force: bool = False,
         progress: bool = True) -> dict[str, Plan]:
    """Measure every candidate plan for each (N, K) and M bucket, keep the fastest.

    Weights are rotated among enough random copies to exceed L2, so the timing is of
    memory, not cache. Results persist in the plan cache (`LORAPLEX_TUNE_CACHE`).
    """
    from triton.testing import do_bench
    from tqdm import tqdm

    from .nf4 import quantize_nf4

    device = torch.device(device)
    chosen: dict[str, Plan] = {}
    jobs = [(n, k, m_bucket(m)) for n, k in shapes for m in sorted({m_bucket(m) for m in ms})]
    for n, k, m in tqdm(jobs, desc="tuning nf4_matmul", disable=not progress):
        key = _PlanCache.key(device, dtype, n, k, m)
        if not force and (found := _plans.get(key)) is not None:
            chosen[key] = found
            continue
        base = quantize_nf4(torch.randn(n, k, device=device, dtype=dtype) * 0.02)
        copies = max(1, -(-l2_bytes // base.resident_bytes()))
        weights = [base] + [quantize_nf4(torch.randn(n, k, device=device, dtype=dtype) * 0.02)
                            for _ in range(copies - 1)]
        x = torch.randn(m, k, device=device, dtype=dtype)
        best, best_ms = None, float("inf")
        for plan in candidate_plans(n, k, m, device):
            turn = iter(range(1 << 62))
            try:
                t = do_bench(lambda: nf4_matmul(x, weights[next(turn) % copies], plan=plan),
                             warmup=5, rep=20)
            except Exception:  # a config that does not compile or fit (shared memory): skip it
                continue
            if t < best_ms:
                best, best_ms = plan, t
        if best is not None:
            _plans.put(key, best)
            chosen[key] = best
    _chosen.clear()  # later calls pick up the measured plans
    return chosen
