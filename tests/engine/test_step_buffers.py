"""Everything a step's kernels touch is allocated once, at its largest, before the first step,
and warm-up compiles every kernel variant a step can select.

Steps of every size from 1 to max_num_batched_tokens (prompt chunks with decodes, and decode-
only steps through the CUDA graphs' static buffers) must reallocate nothing: a captured graph
keeps writing the buffers it was captured with. Before the engine sized and froze its
workspace, the split-K buffers grew on the first step larger than the warm-up's and the old
ones were freed under the graphs. Run on the Triton interpreter and on the reference path;
on a GPU, with real graphs, against an engine without them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.cuda_graphs import DecodeGraphs
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine import launches
from loraplex.engine.launches import StepLimits, size_workspace
from loraplex.engine.request import Request
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import attention, nf4_matmul, runtime, splitk
from loraplex.kernels.lora import BatchMeta
from loraplex.kernels.nf4_matmul import Plan
from loraplex.kernels.workspace import WorkspaceError
from loraplex.model.loader import load_model
from tests.factory import make_model, random_adapter

MAX_TOKENS, MAX_SEQS = 24, 4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    # intermediate 128 = two LoRA K tiles of 64 in the interpreter: the down projection's shrink splits
    make_model(path, "llama", hidden=64, layers=1, max_position_embeddings=1024)
    return load_model(path, dtype=torch.bfloat16, progress=False)


@pytest.fixture
def gpu_like(monkeypatch):
    """K splits as on a GPU with more SMs than the CPU stand-in's 4, a plan of its own for
    every M bucket (as tuning may choose; num_stages tells them apart) and the dequantize +
    cuBLAS plan from M = 32 up: every kind of workspace buffer and many variants in play."""
    monkeypatch.setattr(runtime, "num_sms", lambda device: 16)
    heuristic = nf4_matmul.heuristic_plan

    def plan(n, k, m, device):
        return Plan("cublas") if m >= 32 else dataclasses.replace(heuristic(n, k, m, device), num_stages=m.bit_length())
    monkeypatch.setattr(nf4_matmul, "heuristic_plan", plan)


def make_engine(loaded, block_size: int = 16) -> Engine:
    model = loaded.model
    adapters = StaticAdapters(model, {"a": random_adapter(model, 1), "b": random_adapter(model, 2, rank=8)}, max_rank=8)
    engine = Engine(model, loaded.tokenizer, adapters,
                    EngineConfig(kv_cache_tokens=512, max_num_seqs=MAX_SEQS, max_num_batched_tokens=MAX_TOKENS,
                                 block_size=block_size,
                                 enable_prefix_caching=False))  # steps as large as their prompts
    engine.runner.graphs = DecodeGraphs(model, MAX_SEQS, engine.limits.max_blocks)  # the graphs' path, eagerly
    return engine


def long_lived_buffers(engine: Engine) -> dict[str, tuple]:
    """(address, elements) of every buffer that outlives a step and that a kernel touches."""
    sizes = engine.workspace.sizes()
    out = {f"workspace {name}": (ptr, sizes[name]) for name, ptr in engine.workspace.pointers().items()}
    graphs = engine.runner.graphs
    for name in ("input_ids", "positions", "slot_mapping", "lora_slots", "block_tables", "seq_lens", "rows"):
        t = getattr(graphs, name)
        out[f"graph input {name}"] = (t.data_ptr(), t.numel())
    out["kv cache"] = tuple(t.data_ptr() for t in engine.kv_cache.k + engine.kv_cache.v)
    pool = engine.model.lora_pool
    out["adapter memory"] = tuple(t.data_ptr() for t in (pool.pages, pool.table, pool.info, pool.scaling))
    return out


def step(engine: Engine) -> int:
    """One step; the number of tokens it ran."""
    engine.step()
    return sum(n for _, n in engine.last_step.prefills) + len(engine.last_step.decodes)


def every_step_size(engine: Engine) -> set[int]:
    """Steps of every size from 1 to MAX_TOKENS: three decodes beside a prompt chunk (sizes 4
    and up), then decode-only steps of 4, 3, 2, 1 sequences through the graphs' buffers.
    Returns the sizes run."""
    def request(rid: str, prompt_len: int, max_tokens: int, adapter: str | None) -> None:
        engine.add_request(Request(rid, [1 + i % 50 for i in range(prompt_len)],
                                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), adapter))

    for i, adapter in enumerate(["a", "b", None]):
        request(f"long-{i}", 2 + i, 200, adapter)
    sizes = {step(engine)}  # their three prompts
    for size in range(4, MAX_TOKENS + 1):  # each prompt ends in its step (max_tokens=1)
        request(f"p{size}", size - 3, 1, ["a", None, "b"][size % 3])
        sizes.add(step(engine))
    request("long-3", 3, 200, "b")
    sizes.add(step(engine))
    while engine.scheduler.running:
        sizes.add(step(engine))
        engine.abort(engine.scheduler.running[-1].request_id)
    return sizes


@pytest.mark.parametrize("path", ["interpreter", "reference"])
def test_after_warm_up_steps_of_any_size_reallocate_and_compile_nothing(loaded, gpu_like, path):
    if path == "reference":
        with runtime.reference_kernels():
            engine = make_engine(loaded)
            before = long_lived_buffers(engine)
            engine.warm_up(["a", "b"])
            sizes = every_step_size(engine)
    else:
        assert runtime.use_triton(loaded.model.device), "the Triton kernels must run (interpreter)"
        engine = make_engine(loaded)
        before = long_lived_buffers(engine)
        with runtime.recording_launches() as variants:
            engine.warm_up(["a", "b"])
            warmed = set(variants)
            sizes = every_step_size(engine)
        assert variants == warmed, f"kernel variants first met after warm-up: {sorted(variants - warmed)}"
        # the limits put every kind of buffer in play
        assert {splitk.VALUES, splitk.TICKETS, nf4_matmul.DENSE, attention.PARTIALS} <= set(engine.workspace.sizes())
    assert sizes >= set(range(1, MAX_TOKENS + 1))
    assert engine.workspace.frozen and engine.workspace.reallocations == 0
    assert long_lived_buffers(engine) == before


def test_the_warm_up_sweep_meets_what_every_step_size_meets(loaded, gpu_like):
    """Brute force against the sweep's enumeration: every token count through every linear
    (NF4 and LoRA, tokens of both adapters and the base model) and every decode batch at
    every block table width (blocks of 64 positions: fewer widths, the same splits)."""
    engine = make_engine(loaded, block_size=64)
    model, dev, dtype = engine.model, engine.model.device, engine.model.dtype
    with runtime.recording_launches() as swept:
        launches.warm_up_kernels(model, engine.limits, engine.plans, engine.workspace)
    with runtime.recording_launches() as met:
        for t in range(1, MAX_TOKENS + 1):
            meta = BatchMeta.build(torch.arange(t, dtype=torch.int32, device=dev) % 3 - 1, model.lora_slots)
            for linear in model.linears().values():
                linear(torch.randn(t, linear.in_features, device=dev, dtype=dtype), meta)
        attn, c = model.layers[0].self_attn, model.config
        for b in range(1, MAX_SEQS + 1):
            for width in range(1, engine.limits.max_blocks + 1):
                attention.paged_decode_attention(
                    torch.randn(b, c.num_heads, c.head_dim, device=dev, dtype=dtype), attn.k_cache, attn.v_cache,
                    torch.zeros(b, width, dtype=torch.int32, device=dev), torch.ones(b, dtype=torch.int32, device=dev),
                    attn.scale, engine.workspace)
    assert met <= swept, f"variants the sweep misses: {sorted(met - swept)}"
    assert {v[0] for v in swept} >= {"_nf4_gemv_kernel", "_nf4_gemm_kernel", "_nf4_dequant_kernel",
                                     "_paged_shrink_kernel", "_paged_expand_kernel", "_paged_decode_kernel",
                                     "_split_combine_kernel"}


def test_a_launch_beyond_the_limits_raises_naming_the_buffer(loaded, gpu_like):
    engine = make_engine(loaded)
    small = size_workspace(engine.model, StepLimits(max_tokens=2, max_decodes=2, max_blocks=2, block_size=16),
                           engine.plans)
    engine.workspace = small
    engine.model.bind_kernels(engine.plans, small)
    engine.add_request(Request("big", list(range(1, 21)), SamplingParams(max_tokens=1), "a"))
    with pytest.raises(WorkspaceError, match="splitk.values"):
        engine.step()


@pytest.mark.gpu
def test_graphs_stay_exact_while_larger_eager_steps_run_and_nothing_compiles_after_warm_up(tmp_path):
    """The review's case: decode graphs captured, then prompt chunks far larger than any decode
    batch run eagerly between replays. Greedy outputs must match an engine without graphs,
    and serving must not compile a kernel after warm-up."""
    make_model(tmp_path, "qwen2", hidden=256, max_position_embeddings=4096)
    loaded = load_model(tmp_path, dtype=torch.bfloat16, device="cuda", progress=False)
    model = loaded.model
    adapters = {"a": random_adapter(model, 1), "b": random_adapter(model, 2, rank=8)}

    def serve(graphs: bool) -> dict[str, list]:
        engine = Engine(model, loaded.tokenizer, StaticAdapters(model, adapters, max_rank=8),
                        EngineConfig(kv_cache_tokens=16384, max_num_seqs=16, max_num_batched_tokens=256,
                                     cuda_graph_max_batch=16 if graphs else 0))
        engine.warm_up(["a", "b"])
        assert (engine.runner.graphs is not None and engine.runner.graphs.captured) == graphs
        compiled, buffers = runtime.compiled_kernels(), engine.workspace.pointers()
        outs: dict[str, list] = {}
        for i in range(12):  # decodes first, then long prompts arrive while they run
            rid = f"r{i}"
            outs[rid] = []
            n = 5 + i if i < 8 else 200 + 100 * i  # chunks of up to 256 tokens beside graph-sized decodes
            engine.add_request(Request(rid, [1 + (i * 7 + j) % 200 for j in range(n)],
                                       SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True),
                                       [None, "a", "b"][i % 3], on_output=outs[rid].append))
            engine.step()
        engine.run_until_done()
        assert runtime.compiled_kernels() == compiled, "a kernel compiled while serving"
        assert engine.workspace.pointers() == buffers
        return {rid: [lp for o in lst for lp in o.logprobs] for rid, lst in outs.items()}

    eager, graphed = serve(False), serve(True)
    for rid in eager:
        for a, b in zip(eager[rid], graphed[rid]):
            assert b.top[0][1] == pytest.approx(a.top[0][1], abs=0.05), rid
            if a.token_id != b.token_id:  # bf16 near-ties only; the histories differ after
                assert a.top[0][1] - a.top[1][1] < 0.1, rid
                break
