"""Fused NF4 dequant-matmul against its PyTorch reference.

Without CUDA these run the Triton kernels in Triton's interpreter on small shapes (see
conftest.py); with CUDA the same tests run the compiled kernels.
"""

import pytest
import torch

from loraplex.kernels import nf4_matmul as mm
from loraplex.kernels import runtime, splitk
from loraplex.kernels.nf4 import dequantize_nf4, quantize_nf4
from loraplex.kernels.nf4_matmul import Plan, nf4_matmul, nf4_matmul_ref, workspace_needs
from loraplex.kernels.workspace import Workspace, WorkspaceError, standalone

# One output ulp of slack: the interpreter truncates fp32 -> bf16 instead of rounding.
RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _expected(x, w, bias):
    y = x.float() @ dequantize_nf4(w, torch.float32).T
    return y if bias is None else y + bias.float()


def _assert_matches(y, x, w, bias=None, atol=2e-3):
    expected = _expected(x, w, bias)
    assert y.dtype == x.dtype and y.shape == expected.shape
    torch.testing.assert_close(y.float(), expected, rtol=RTOL[x.dtype], atol=atol * expected.abs().max().item())


def _case(n, k, m, dtype, device, bias, seed=0, double_quant=True):
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4((torch.randn(n, k, generator=g) * 0.05).to(device), double_quant=double_quant)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_default_plan_matches_reference(device, dtype, m, bias):
    x, w, b = _case(96, 256, m, dtype, device, bias, seed=m)
    _assert_matches(nf4_matmul(x, w, b), x, w, b)


PLANS = [
    Plan("gemv", block_n=16, block_k=128, split_k=1),
    Plan("gemv", block_n=32, block_k=64, split_k=3),  # uneven split: one share is short
    Plan("gemv", block_n=64, block_k=256, split_k=2),  # K tail shorter than a chunk
    Plan("gemm", block_m=16, block_n=32, block_k=64, split_k=1),
    Plan("gemm", block_m=16, block_n=32, block_k=64, split_k=4),
    Plan("gemm", block_m=32, block_n=64, block_k=128, split_k=2),
    Plan("cublas"),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.kind}-n{p.block_n}-k{p.block_k}-s{p.split_k}")
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("double_quant", [True, False])
def test_every_kernel_path(device, plan, m, double_quant):
    # N not a multiple of any block, K = 320 = 5 blocks of 64: masks on both axes.
    x, w, b = _case(80, 320, m, torch.bfloat16, device, bias=True, seed=7, double_quant=double_quant)
    # cublas multiplies weights rounded to bf16 (truncated, so biased, in the interpreter)
    atol = 1e-2 if plan.kind == "cublas" else 2e-3
    _assert_matches(nf4_matmul(x, w, b, plan=plan), x, w, b, atol=atol)


def test_split_k_leaves_the_workspace_clean(device):
    x, w, _ = _case(64, 512, 3, torch.float16, device, bias=False)
    for plan in (Plan("gemv", block_n=16, block_k=128, split_k=4), Plan("gemm", 16, 32, 64, split_k=8)):
        first = nf4_matmul(x, w, plan=plan)
        again = nf4_matmul(x, w, plan=plan)  # a dirty workspace would add the first result
        assert torch.equal(first, again)
        buffers = standalone(x.device).buffers()
        assert not any(buffers[n].any() for n in (splitk.VALUES, splitk.TICKETS) if n in buffers)


def test_batched_input_keeps_leading_dims(device):
    x, w, b = _case(64, 128, 6, torch.bfloat16, device, bias=True)
    y = nf4_matmul(x.view(2, 3, 128), w, b)
    assert y.shape == (2, 3, 64)
    _assert_matches(y.view(6, 64), x, w, b)


def test_empty_batch(device):
    x, w, _ = _case(64, 128, 0, torch.bfloat16, device, bias=False)
    assert nf4_matmul(x, w).shape == (0, 64)


def test_dequantize_kernel_matches_reference(device):
    w = quantize_nf4(torch.randn(48, 320, device=device) * 0.1)
    out = torch.empty(48, 320, device=device)
    torch.testing.assert_close(mm.dequantize_to(w, out), dequantize_nf4(w, torch.float32), rtol=1e-6, atol=0)


def test_reference_equals_dense_linear():
    x, w, b = _case(32, 128, 4, torch.float32, "cpu", bias=True)
    expected = torch.nn.functional.linear(x, dequantize_nf4(w, torch.float32), b)
    assert torch.equal(nf4_matmul_ref(x, w, b), expected)


def test_clear_errors(device):
    x, w, _ = _case(64, 128, 2, torch.bfloat16, device, bias=False)
    with pytest.raises(ValueError, match="expects K=128"):
        nf4_matmul(x[:, :64], w)
    with pytest.raises(ValueError, match="bias must have shape"):
        nf4_matmul(x, w, torch.zeros(63, device=device, dtype=x.dtype))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        nf4_matmul(x.float(), w)
    odd = quantize_nf4(torch.randn(8, 96, device=device))
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_matmul(torch.randn(1, 96, device=device, dtype=torch.bfloat16), odd)
    big_blocks = quantize_nf4(torch.randn(8, 128, device=device), blocksize=128)
    with pytest.raises(ValueError, match="blocksize 64"):
        nf4_matmul(x, big_blocks)


# --- plans ---------------------------------------------------------------------------------

LLAMA_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 16, 64, 256, 2048, 8192])
def test_plans_are_well_formed(n, k, m, monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(runtime, "num_sms", lambda device: 132)  # an H100's plans, without one
    plans = mm.candidate_plans(n, k, m, cuda) + [mm.heuristic_plan(n, k, m, cuda)]
    assert plans
    for plan in plans:
        assert plan.kind in ("gemv", "gemm", "cublas")
        if plan.kind == "cublas":
            continue
        assert plan.block_k % 64 == 0 and 1 <= plan.split_k <= k // plan.block_k
        assert (plan.kind == "gemv") == (m == 1)


def test_m_buckets():
    assert [mm.m_bucket(m) for m in (1, 2, 3, 5, 64, 65, 4096, 10000)] == [1, 2, 4, 8, 64, 128, 4096, 4096]


def test_plan_cache_persists(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_TUNE_CACHE", str(tmp_path / "plans.json"))
    cache = mm._PlanCache()
    plan = Plan("gemm", 16, 64, 128, 4, 4, 3)
    cache.put("gpu|triton|bfloat16|64x128|m16", plan)
    assert mm._PlanCache().get("gpu|triton|bfloat16|64x128|m16") == plan
    (tmp_path / "plans.json").write_text("not json")
    assert mm._PlanCache().get("gpu|triton|bfloat16|64x128|m16") is None  # unreadable cache: re-tune


# --- GPU only ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 11008)])
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256, 2048])
def test_llama_shapes_on_gpu(n, k, m):
    x, w, b = _case(n, k, m, torch.bfloat16, "cuda", bias=False)
    _assert_matches(nf4_matmul(x, w), x, w)


@pytest.mark.gpu
def test_every_candidate_plan_on_gpu():
    from triton.runtime.errors import OutOfResources

    ran = 0
    for m in (1, 16, 64):
        x, w, _ = _case(4096, 4096, m, torch.float16, "cuda", bias=False)
        for plan in mm.candidate_plans(4096, 4096, m, x.device)[::5]:
            try:
                y = nf4_matmul(x, w, plan=plan)
            except OutOfResources:  # a tile that does not fit this GPU: `tune` skips it too
                continue
            _assert_matches(y, x, w, atol=1e-2 if plan.kind == "cublas" else 2e-3)
            ran += 1
    assert ran >= 10


@pytest.mark.gpu
def test_cuda_graph_replay_with_split_k():
    x, w, b = _case(4096, 4096, 1, torch.bfloat16, "cuda", bias=True)
    plan = Plan("gemv", block_n=16, block_k=512, split_k=4)
    ws = Workspace("cuda")  # what a graph touches is sized and frozen before capture
    ws.reserve(workspace_needs(plan, 1, 4096, 4096, torch.bfloat16))
    ws.freeze()
    nf4_matmul(x, w, b, plan=plan, workspace=ws)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nf4_matmul(x, w, b, plan=plan, workspace=ws)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nf4_matmul(x, w, b, plan=plan, workspace=ws)
    with pytest.raises(WorkspaceError, match="capture"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        nf4_matmul(x, w, b, plan=plan)  # the growable workspace refuses a capture
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches(y, x, w, b)


@pytest.mark.gpu
def test_tune_picks_a_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_TUNE_CACHE", str(tmp_path / "plans.json"))
    monkeypatch.setattr(mm, "_plans", mm._PlanCache())
    chosen = mm.tune([(1024, 1024)], [1, 16], l2_bytes=1 << 20, progress=False)
    assert len(chosen) == 2
    w = quantize_nf4(torch.randn(1024, 1024, device="cuda"))
    assert mm.plan_for(w, 1, torch.bfloat16) in chosen.values()


def test_plan_lookup_is_memoized_per_bucket(device):
    w = quantize_nf4(torch.randn(64, 128, device=device))
    first = mm.plan_for(w, 5, torch.bfloat16)
    assert mm.plan_for(w, 7, torch.bfloat16) is first  # same bucket (8): same object, no rebuild
    assert mm.plan_for(w, 1, torch.bfloat16).kind == "gemv"
