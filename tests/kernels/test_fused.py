"""Fused add + RMSNorm, SiLU * up and rotary + KV-cache write: the kernels against their
references, the references against transformers' own Llama code (LlamaRMSNorm,
apply_rotary_pos_emb) and F.silu.

Without CUDA the Triton kernels run in Triton's interpreter (conftest.py). Where a kernel
does PyTorch's operations in PyTorch's order (the residual add, rotary, the cache writes)
it must be bit-exact in every dtype; the norm's sum of squares and silu's exp are computed
differently, which may move a result by a few fp32 ulps, or after rounding to bf16/fp16 by
one ulp of that dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import runtime
from loraplex.kernels.fused import (
    add_rms_norm,
    add_rms_norm_ref,
    rope_heads,
    rope_write_kv,
    rope_write_kv_ref,
    silu_mul,
    silu_mul_ref,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb


def _hf_rms_norm(w, eps, x):
    norm = LlamaRMSNorm(w.shape[0], eps).to(w.device, w.dtype)
    norm.weight.data.copy_(w)
    return norm(x)


def apply_rope(x, cos, sin):
    """transformers' rotary on [T, H, D] (it takes [batch, heads, seq, D] and cos/sin [batch, seq, D])."""
    rotated, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    return rotated[0].transpose(0, 1)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOKENS = [0, 1, 5, 33]
# largest kernel-vs-reference distance in ulps of the output dtype. fp32: the summation order
# of the norm, exp in silu (seen: 4 and 5). bf16/fp16: the intermediate (normalised row,
# silu) may round one ulp the other way, which the product with weight / up can turn into
# two ulps of the output (seen: fp16 2 in ~1 of 20,000 elements, bf16 never)
ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}
EPS = 1e-5


def _ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| in ulps of their dtype at the larger magnitude."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if not expected.numel():
        return 0.0
    finfo = torch.finfo(expected.dtype)
    a, e = actual.double(), expected.double()
    exponent = torch.frexp(torch.maximum(a.abs(), e.abs())).exponent  # |x| in [2^(exp-1), 2^exp)
    ulp = torch.ldexp(torch.full_like(a, finfo.eps), exponent - 1).clamp(min=finfo.tiny * finfo.eps)
    return ((a - e).abs() / ulp).max().item()


def _randn(*shape, dtype, device, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


# --- add_rms_norm ----------------------------------------------------------------------------


def _norm_inputs(t, h, dtype, device, residual, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + t * 7 + h)
    x = _randn(t, h, dtype=dtype, device=device, g=g, scale=3.0)
    res = _randn(t, h, dtype=dtype, device=device, g=g, scale=3.0) if residual else None
    w = (1 + torch.randn(h, generator=g) * 0.3).to(device=device, dtype=dtype)
    return x, res, w


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", [64, 96, 4096])
@pytest.mark.parametrize("t", TOKENS)
def test_add_rms_norm_matches_reference(device, t, h, dtype, residual):
    if h == 4096 and t == 33 and dtype != torch.bfloat16:
        t = 9  # the interpreter is slow on wide rows: the full case once, in bf16
    x, res, w = _norm_inputs(t, h, dtype, device, residual)
    out, new_res = add_rms_norm(x, res, w, EPS)
    ref_out, ref_res = add_rms_norm_ref(x, res, w, EPS)
    assert out.shape == (t, h) and out.dtype == dtype and new_res.dtype == dtype
    assert torch.equal(new_res, ref_res)  # one add, rounded once: bit-exact
    if not residual:
        assert new_res is x
    assert _ulps(out, ref_out) <= ULPS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_reads_row_strides(device, dtype):
    g = torch.Generator().manual_seed(3)
    big = _randn(6, 2, 160, dtype=dtype, device=device, g=g)
    x, res = big[:, 0, :96], big[:, 1, 32:128]  # row stride 320, neither contiguous
    w = _randn(96, dtype=dtype, device=device, g=g)
    out, new_res = add_rms_norm(x, res, w, EPS)
    ref_out, ref_res = add_rms_norm_ref(x.contiguous(), res.contiguous(), w, EPS)
    assert torch.equal(new_res, ref_res) and _ulps(out, ref_out) <= ULPS[dtype]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_reference_is_the_model_formula(device, dtype, residual):
    x, res, w = _norm_inputs(7, 96, dtype, device, residual)
    out, new_res = add_rms_norm_ref(x, res, w, EPS)
    expected_res = x if res is None else x + res
    assert torch.equal(new_res, expected_res)
    assert torch.equal(out, _hf_rms_norm(w, EPS, expected_res))  # transformers' formula, bit for bit
    # and the exact value of that formula (fp64) within one rounding of the output
    x64 = expected_res.double()
    exact = (w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype).double())
    assert _ulps(out, exact.to(dtype)) <= (4 if dtype == torch.float32 else 1)


# --- silu_mul --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("i", [64, 96, 1500])  # 1500: two column blocks, the second partial
@pytest.mark.parametrize("t", TOKENS)
def test_silu_mul_matches_reference(device, t, i, dtype):
    g = torch.Generator().manual_seed(t * 7 + i)
    gate_up = _randn(t, 2 * i, dtype=dtype, device=device, g=g, scale=4.0)
    out = silu_mul(gate_up)
    assert out.shape == (t, i) and out.dtype == dtype
    assert _ulps(out, silu_mul_ref(gate_up)) <= ULPS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_view_and_reference(device, dtype):
    g = torch.Generator().manual_seed(1)
    wide = _randn(5, 3 * 96, dtype=dtype, device=device, g=g, scale=4.0)
    gate_up = wide[:, 96:]  # row stride 288
    gate, up = gate_up.chunk(2, dim=-1)
    ref = silu_mul_ref(gate_up)
    assert torch.equal(ref, F.silu(gate) * up)  # the unfused MLP's formula
    assert _ulps(silu_mul(gate_up), ref) <= ULPS[dtype]


# --- rope_write_kv ---------------------------------------------------------------------------

HEADS = [(4, 4, 16), (8, 2, 32), (4, 1, 64)]


def _slots(t, num_blocks, block_size, g):
    """Distinct cache rows for t tokens of a few sequences, each continuing in its own
    shuffled blocks (as an engine step maps prefill chunks and decode tokens)."""
    blocks = torch.randperm(num_blocks, generator=g).tolist()
    slots, left = [], t
    while left:
        n = min(left, 1 + int(torch.randint(0, 12, (1,), generator=g)))
        start = int(torch.randint(0, block_size, (1,), generator=g))  # context already cached
        mine = [blocks.pop() for _ in range(-(-(start + n) // block_size))]
        slots += [mine[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        left -= n
    return torch.tensor(slots, dtype=torch.int64)


def _rope_inputs(t, hq, hkv, d, dtype, device, fused=True, seed=0):
    """q, k, v (views of one fused [T, (Hq + 2 Hkv) * D] tensor, or contiguous), cos, sin
    (arbitrary values in [-1, 1]: halves differ, unlike real tables, so a swapped half
    shows), NaN-filled caches and a slot mapping."""
    g = torch.Generator().manual_seed(seed + t * 31 + hq * 7 + d)
    qkv = _randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=device, g=g, scale=2.0)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    if not fused:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cos = (torch.rand(t, d, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    sin = (torch.rand(t, d, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    block_size = 4
    num_blocks = 2 * (t // block_size) + 12
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=device)
    slots = _slots(t, num_blocks, block_size, g).to(device)
    return q, k, v, cos, sin, k_cache, k_cache.clone(), slots


def _same(a, b):
    """Bit-exact, NaN (unwritten cache rows) included."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _check_rope(t, hq, hkv, d, dtype, device, fused=True):
    q, k, v, cos, sin, k_cache, v_cache, slots = _rope_inputs(t, hq, hkv, d, dtype, device, fused)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_rot = rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    q_ref = rope_write_kv_ref(q, k, v, cos, sin, k_ref, v_ref, slots)
    assert q_rot.shape == (t, hq, d) and q_rot.dtype == dtype and q_rot.is_contiguous()
    _same(q_rot, q_ref)  # same products, same roundings: bit-exact in every dtype
    _same(k_cache, k_ref)  # written rows equal, every other row still NaN
    _same(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("t", TOKENS)
def test_rope_write_kv_matches_reference(device, t, hq, hkv, d, dtype):
    _check_rope(t, hq, hkv, d, dtype, device)  # q, k, v: views of a fused qkv tensor


@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("t", [1, 5])
def test_rope_write_kv_contiguous_inputs(device, t, hq, hkv, d):
    _check_rope(t, hq, hkv, d, torch.bfloat16, device, fused=False)


def test_rope_write_kv_odd_half_and_many_tiles(device):
    # D = 80 (half 40: masked lanes), Hq = 40 > heads per program: several q tiles, a partial one
    assert rope_heads(80, 40) < 40
    _check_rope(3, 40, 8, 80, torch.bfloat16, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", HEADS)
def test_rope_write_kv_reference_is_apply_rope(device, hq, hkv, d, dtype):
    q, k, v, cos, sin, k_cache, v_cache, slots = _rope_inputs(9, hq, hkv, d, dtype, device)
    q_rot = rope_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(q_rot, apply_rope(q, cos, sin))
    rows = k_cache.view(-1, hkv, d)[slots]
    assert torch.equal(rows, apply_rope(k, cos, sin))
    assert torch.equal(v_cache.view(-1, hkv, d)[slots], v)
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool, device=device)
    written[slots] = True
    assert k_cache.view(-1, hkv, d)[~written].isnan().all()
    assert v_cache.view(-1, hkv, d)[~written].isnan().all()


def test_rope_heads_tile():
    assert rope_heads(128, 32) == 8 and rope_heads(64, 4) == 4 and rope_heads(80, 40) == 8
    assert rope_heads(256, 1) == 1 and rope_heads(16, 64) == 64


# --- bad inputs ------------------------------------------------------------------------------


def _bad_norm(case, device):
    x = torch.zeros(3, 64, dtype=torch.bfloat16, device=device)
    res, w = x.clone(), torch.ones(64, dtype=torch.bfloat16, device=device)
    if case == "x 3-D":
        x = x[None]
    elif case == "int":
        x, res, w = x.int(), res.int(), w.int()
    elif case == "residual shape":
        res = res[:2]
    elif case == "residual dtype":
        res = res.half()
    elif case == "weight shape":
        w = w[:32]
    elif case == "weight dtype":
        w = w.float()
    elif case == "device":
        w = torch.ones(64, dtype=torch.bfloat16, device="meta")
    return x, res, w


@pytest.mark.parametrize("fn", [add_rms_norm, add_rms_norm_ref])
@pytest.mark.parametrize("case,match", [
    ("x 3-D", r"\[T, H\]"), ("int", "bf16, fp16 or fp32"), ("residual shape", "residual"),
    ("residual dtype", "residual"), ("weight shape", "weight"), ("weight dtype", "weight"),
    ("device", "one device"),
])
def test_add_rms_norm_bad_inputs_raise(device, fn, case, match):
    with pytest.raises(ValueError, match=match):
        fn(*_bad_norm(case, device), EPS)


def test_add_rms_norm_kernel_rejects_rows_too_wide(device):
    if not runtime.use_triton(device):
        pytest.skip("the Triton kernel does not run here")
    x = torch.zeros(1, 16385, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="H up to"):
        add_rms_norm(x, None, torch.ones(16385, dtype=torch.bfloat16, device=device), EPS)


@pytest.mark.parametrize("fn", [silu_mul, silu_mul_ref])
@pytest.mark.parametrize("gate_up,match", [
    (torch.zeros(2, 7), r"\[T, 2 \* I\]"), (torch.zeros(2, 3, 8), r"\[T, 2 \* I\]"),
    (torch.zeros(2, 8, dtype=torch.int32), "bf16, fp16 or fp32"),
])
def test_silu_mul_bad_inputs_raise(device, fn, gate_up, match):
    with pytest.raises(ValueError, match=match):
        fn(gate_up.to(device))


def _bad_rope(case, device):
    q, k, v, cos, sin, k_cache, v_cache, slots = _rope_inputs(2, 4, 2, 16, torch.bfloat16, device)
    if case == "q 2-D":
        q = q[0]
    elif case == "v shape":
        v = v[:, :1]
    elif case == "tokens":
        k, v = k[:1], v[:1]
    elif case == "odd head dim":
        q, k, v = q[..., :15], k[..., :15], v[..., :15]
        cos, sin, k_cache, v_cache = cos[:, :15], sin[:, :15], k_cache[..., :15], v_cache[..., :15]
    elif case == "cos":
        cos = cos[:, :8]
    elif case == "cache shape":
        v_cache = v_cache[:, :2]
    elif case == "cache heads":
        k_cache = v_cache = torch.zeros(4, 4, 1, 16, dtype=torch.bfloat16, device=device)
    elif case == "dtype":
        sin = sin.half()
    elif case == "int":
        q, k, v, cos, sin = q.int(), k.int(), v.int(), cos.int(), sin.int()
        k_cache, v_cache = k_cache.int(), v_cache.int()
    elif case == "contiguous":
        k_cache = v_cache = torch.zeros(4, 2, 4, 16, dtype=torch.bfloat16, device=device).transpose(1, 2)
    elif case == "slots dtype":
        slots = slots.float()
    elif case == "slots shape":
        slots = slots[:1]
    elif case == "device":
        slots = torch.zeros(2, dtype=torch.int64, device="meta")
    return q, k, v, cos, sin, k_cache, v_cache, slots


@pytest.mark.parametrize("fn", [rope_write_kv, rope_write_kv_ref])
@pytest.mark.parametrize("case,match", [
    ("q 2-D", r"\[T, Hq, D\]"), ("v shape", r"\[T, Hkv, D\]"), ("tokens", "tokens or head dim"),
    ("odd head dim", "even head dim"), ("cos", "cos and sin"), ("cache shape", "k_cache and v_cache"),
    ("cache heads", "k_cache and v_cache"), ("dtype", "one dtype"), ("int", "one dtype"),
    ("contiguous", "contiguous"), ("slots dtype", "slot_mapping"), ("slots shape", "slot_mapping"),
    ("device", "one device"),
])
def test_rope_write_kv_bad_inputs_raise(device, fn, case, match):
    with pytest.raises(ValueError, match=match):
        fn(*_bad_rope(case, device))
