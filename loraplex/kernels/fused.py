"""Fused elementwise ops of a decoder layer: one launch each where PyTorch needs several.

    add_rms_norm:   r' = x + r;   y = w * (r' * rsqrt(mean(r'^2) + eps))
    silu_mul:       y = silu(gate_up[:, :I]) * gate_up[:, I:]
    rope_write_kv:  q' = rope(q);   k_cache[slot] = rope(k);   v_cache[slot] = v

At batch-1 decode a step is mostly launches of tiny kernels (the unfused RMSNorm is ~7,
rotary ~5 per tensor, plus the residual adds and the KV writes); these three replace them.

Every op rounds where the unfused PyTorch code rounds, so the results are those of the
model's own PyTorch ops: everything is computed in fp32 from the loaded values and rounded
to the activation dtype after each op PyTorch runs in that dtype (the residual add; the
normalised row, then its product with the weight; silu, then the product with up; each
rotary product, then their sum). Where the order of operations is PyTorch's (the residual,
rotary, the cache writes) the kernels are bit-exact in every dtype; the norm's sum of
squares (a tree instead of PyTorch's order) and silu's exp differ by a few fp32 ulps; in
bf16/fp16 that now and then rounds the intermediate (normalised row, silu) one ulp the other
way, which the product after it can make two ulps of the output.

- `add_rms_norm`: one program per row (BLOCK = next_power_of_2(H) in registers).
  `residual=None` (the first layer) normalises x alone and returns x as the new residual.
- `silu_mul`: programs over (row, SILU_BLOCK columns of I).
- `rope_write_kv`: programs over (token, tile of ROPE_TILE / D heads); the first
  cdiv(Hq, heads) tiles rotate q heads into a new tensor, the others rotate k heads and copy
  v heads straight into the paged caches, so the rotated k never exists as a tensor. q, k,
  v may be views of the fused qkv output (any row and head strides).

Rounding in the interpreter: it truncates fp32 -> bf16 conversions (even with
fp_downcast_rounding="rtne"), so there (`EXACT_BF16`) the kernels round to nearest even by
hand on the fp32 bits; compiled kernels use the hardware conversion, which already does.
FMA contraction is off (`enable_fp_fusion=False`) so fp32 results match PyTorch's separate
multiply and add; the kernels are memory-bound, it costs nothing.

On CPU the `*_ref` functions run unless `TRITON_INTERPRET=1` (tests), as in `lora`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import runtime
from .runtime import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

MAX_NORM_WIDTH = 16384  # the norm holds a whole row in registers
SILU_BLOCK = 1024       # columns of I per silu_mul program
ROPE_TILE = 1024        # elements (heads * padded head dim) per rope_write_kv program


def norm_config(hidden: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the norm kernel: the row padded to a power of two, 16 elements a
    thread (two 16-byte bf16 loads per tensor), 1 to 16 warps."""
    block = 1 << max(hidden - 1, 0).bit_length()
    return block, min(16, max(1, block // 512))


def silu_config(inter: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of silu_mul: SILU_BLOCK columns a program (fewer for small I), 8 a thread."""
    block = min(SILU_BLOCK, 1 << max(inter - 1, 0).bit_length())
    return block, max(1, min(4, block // 256))


def rope_heads(head_dim: int, heads: int) -> int:
    """Heads per rope_write_kv program: a tile of about ROPE_TILE elements, no more heads
    than the larger of Hq and Hkv (rounded up to a power of two)."""
    block_d = 1 << max(head_dim - 1, 1).bit_length()
    return max(1, min(ROPE_TILE // block_d, 1 << max(heads - 1, 0).bit_length()))


def rope_config(head_dim: int, q_heads: int, kv_heads: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps) of rope_write_kv: heads per program, the half head
    dim padded to a power of two, 4 elements of each half a thread, up to 4 warps (8 a thread
    would make the 1-D cos/sin loads go through shared memory to meet the 2-D layout)."""
    block_h = rope_heads(head_dim, max(q_heads, kv_heads))
    block_half = 1 << max(head_dim // 2 - 1, 0).bit_length()
    return block_h, block_half, max(1, min(4, block_h * block_half // 128))


# ----------------------------------------------------------------------------------------
# Checks and references
# ----------------------------------------------------------------------------------------


def _same_device(what: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_norm(x, residual, weight) -> None:
    what = "add_rms_norm"
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be [T, H], got shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{what}: x must be bf16, fp16 or fp32, got {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{what}: residual must match x ({x.dtype} {list(x.shape)}), "
                         f"got {residual.dtype} {list(residual.shape)}")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"{what}: weight must be {x.dtype} [{x.shape[1]}], "
                         f"got {weight.dtype} {list(weight.shape)}")
    _same_device(what, x, weight, *(() if residual is None else (residual,)))


def _check_silu(gate_up) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up must be [T, 2 * I], got shape {list(gate_up.shape)}")
    if gate_up.dtype not in _DTYPES:
        raise ValueError(f"silu_mul: gate_up must be bf16, fp16 or fp32, got {gate_up.dtype}")


def _check_rope(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    what = "rope_write_kv"
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"{what}: q must be [T, Hq, D], k and v [T, Hkv, D], "
                         f"got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"{what}: q {list(q.shape)} and k {list(k.shape)} differ in tokens or head dim")
    if d % 2:
        raise ValueError(f"{what}: rotate-half needs an even head dim, got {d}")
    if cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"{what}: cos and sin must be [{t}, {d}], "
                         f"got {list(cos.shape)} and {list(sin.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"{what}: k_cache and v_cache must both be "
                         f"[num_blocks, block_size, {k.shape[1]}, {d}], "
                         f"got {list(k_cache.shape)} and {list(v_cache.shape)}")
    dtypes = {x.dtype for x in (q, k, v, cos, sin, k_cache, v_cache)}
    if len(dtypes) != 1 or q.dtype not in _DTYPES:
        raise ValueError(f"{what}: q, k, v, cos, sin and the caches must share one dtype of bf16/fp16/fp32, "
                         f"got {sorted(map(str, dtypes))}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{what}: k_cache and v_cache must be contiguous")
    if slot_mapping.shape != (t,) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: slot_mapping must be int64 (or int32) [{t}], "
                         f"got {slot_mapping.dtype} {list(slot_mapping.shape)}")
    _same_device(what, q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual): the residual add then transformers' Llama RMSNorm, op for op."""
    _check_norm(x, residual, weight)
    new_residual = x if residual is None else x + residual
    x32 = new_residual.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), new_residual


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the input dtype, as the unfused MLP computes it."""
    _check_silu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate-half rotary, the same ops in the same order as transformers' apply_rotary_pos_emb
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary on q and k, rotated k and v stored at their cache rows; returns rotated q."""
    _check_rope(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    rows = slot_mapping.long()
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, rows, _rope_ref(k, cos, sin))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, rows, v)
    return _rope_ref(q, cos, sin)


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _round(x, DT: tl.constexpr, EXACT_BF16: tl.constexpr):
        # fp32 x rounded (to nearest even) to DT, returned in fp32: one PyTorch op's rounding
        if DT == tl.float32:
            return x
        elif EXACT_BF16 and DT == tl.bfloat16:  # the interpreter truncates: round on the bits
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        else:
            return x.to(DT).to(tl.float32)

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, stride_x, stride_res, H, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr,
    ):
        # grid = (T,): one row. new_res = x + res; out = w * (new_res * rsqrt(mean(new_res^2) + eps))
        row = tl.program_id(0).to(tl.int64)
        dt: tl.constexpr = out_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
            s = _round(s + r, dt, EXACT_BF16)
            tl.store(new_res_ptr + row * H + cols, s.to(dt), mask=mask)
        mean_sq = tl.sum(s * s, axis=0) / H
        inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))  # IEEE, as torch.rsqrt on CPU
        normed = _round(s * inv_rms, dt, EXACT_BF16)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + cols, _round(w * normed, dt, EXACT_BF16).to(dt), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, I, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
        # grid = (T, cdiv(I, BLOCK)): out[row, cols] = silu(x[row, cols]) * x[row, I + cols]
        row = tl.program_id(0).to(tl.int64)
        dt: tl.constexpr = out_ptr.dtype.element_ty
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
        silu = _round(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), dt, EXACT_BF16)  # F.silu's formula
        tl.store(out_ptr + row * I + cols, _round(silu * up, dt, EXACT_BF16).to(dt), mask=mask)

    @triton.jit
    def _rope_halves(ptrs, mask, c1, c2, s1, s2, HALF: tl.constexpr, dt: tl.constexpr,
                     EXACT_BF16: tl.constexpr):
        # [heads, D/2] halves of x * cos + rotate_half(x) * sin, each product and the sum rounded:
        # first half x1 * c1 + (-x2) * s1, second half x2 * c2 + x1 * s2
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = _round(_round(x1 * c1[None, :], dt, EXACT_BF16) - _round(x2 * s1[None, :], dt, EXACT_BF16),
                    dt, EXACT_BF16)
        o2 = _round(_round(x2 * c2[None, :], dt, EXACT_BF16) + _round(x1 * s2[None, :], dt, EXACT_BF16),
                    dt, EXACT_BF16)
        return o1.to(dt), o2.to(dt)

    @triton.jit
    def _rope_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, q_out_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin, Hq, Hkv,
        D: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, EXACT_BF16: tl.constexpr,
    ):
        # grid = (T, cdiv(Hq, BLOCK_H) + cdiv(Hkv, BLOCK_H)): a tile of q heads (rotated into
        # q_out) or of kv heads (k rotated, v copied, both into the caches at the token's slot)
        t = tl.program_id(0).to(tl.int64)
        pid_h = tl.program_id(1)
        q_tiles = tl.cdiv(Hq, BLOCK_H)
        dt: tl.constexpr = q_out_ptr.dtype.element_ty
        HALF: tl.constexpr = D // 2
        dd = tl.arange(0, BLOCK_HALF)
        d_mask = dd < HALF
        c1 = tl.load(cos_ptr + t * stride_cos + dd, mask=d_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_cos + HALF + dd, mask=d_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_sin + dd, mask=d_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_sin + HALF + dd, mask=d_mask, other=0.0).to(tl.float32)
        if pid_h < q_tiles:
            heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads < Hq)[:, None] & d_mask[None, :]
            o1, o2 = _rope_halves(q_ptr + t * stride_qt + heads[:, None] * stride_qh + dd[None, :], mask,
                                  c1, c2, s1, s2, HALF, dt, EXACT_BF16)
            out = q_out_ptr + (t * Hq + heads[:, None]) * D + dd[None, :]
            tl.store(out, o1, mask=mask)
            tl.store(out + HALF, o2, mask=mask)
        else:
            heads = (pid_h - q_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads < Hkv)[:, None] & d_mask[None, :]
            slot = tl.load(slot_ptr + t).to(tl.int64)
            row = (slot * Hkv + heads[:, None]) * D + dd[None, :]  # caches are [rows, Hkv, D]
            o1, o2 = _rope_halves(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dd[None, :], mask,
                                  c1, c2, s1, s2, HALF, dt, EXACT_BF16)
            tl.store(k_cache_ptr + row, o1, mask=mask)
            tl.store(k_cache_ptr + row + HALF, o2, mask=mask)
            v_src = v_ptr + t * stride_vt + heads[:, None] * stride_vh + dd[None, :]
            tl.store(v_cache_ptr + row, tl.load(v_src, mask=mask), mask=mask)
            tl.store(v_cache_ptr + row + HALF, tl.load(v_src + HALF, mask=mask), mask=mask)


# ----------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) with new_residual = x + residual (x itself when residual is
    None) and normed = RMSNorm(new_residual) as transformers' Llama computes it. x, residual
    [T, H] and weight [H] share one dtype; both results are [T, H] in it."""
    _check_norm(x, residual, weight)
    if not runtime.use_triton(x.device):
        return add_rms_norm_ref(x, residual, weight, eps)
    t, h = x.shape
    if h > MAX_NORM_WIDTH:
        raise ValueError(f"add_rms_norm: the kernel holds a row in registers, H up to {MAX_NORM_WIDTH}, "
                         f"got {h}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    weight = weight.contiguous()
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty_like(out)
    if t == 0:
        return out, new_residual
    block, warps = norm_config(h)
    res = x if residual is None else residual  # unread without a residual
    runtime.launch(
        _add_rms_norm_kernel, (t,), x, res, weight, out, new_residual, x.stride(0), res.stride(0), h, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, EXACT_BF16=INTERPRET,
        num_warps=warps, enable_fp_fusion=False,
    )
    return out, new_residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] as a new [T, I] tensor in the input dtype."""
    _check_silu(gate_up)
    if not runtime.use_triton(gate_up.device):
        return silu_mul_ref(gate_up)
    t, i = gate_up.shape[0], gate_up.shape[1] // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty(t, i, dtype=gate_up.dtype, device=gate_up.device)
    if t == 0 or i == 0:
        return out
    block, warps = silu_config(i)
    runtime.launch(
        _silu_mul_kernel, (t, triton.cdiv(i, block)), gate_up, out, gate_up.stride(0), i,
        BLOCK=block, EXACT_BF16=INTERPRET, num_warps=warps, enable_fp_fusion=False,
    )
    return out


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary (rotate-half) on q [T, Hq, D] and k [T, Hkv, D]; the rotated k and v [T, Hkv, D]
    go to rows slot_mapping[t] (block * block_size + offset, distinct, all within the cache)
    of k_cache, v_cache [num_blocks, block_size, Hkv, D]. Returns the rotated q as a new
    contiguous tensor. q, k, v need a unit stride along D only (views of the fused qkv
    output are fine); cos, sin [T, D] are in the activation dtype."""
    _check_rope(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    if not runtime.use_triton(q.device):
        return rope_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    t, hq, d = q.shape
    hkv = k.shape[1]
    q, k, v, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, cos, sin))
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    block_h, block_half, warps = rope_config(d, hq, hkv)
    tiles = triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h)
    runtime.launch(
        _rope_write_kv_kernel, (t, tiles), q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), hq, hkv,
        D=d, BLOCK_HALF=block_half, BLOCK_H=block_h, EXACT_BF16=INTERPRET,
        num_warps=warps, enable_fp_fusion=False,
    )
    return q_out
