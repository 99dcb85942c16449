"""Everything a step's kernels touch is allocated once, at its largest, before the first step.

Steps of every size from 1 to max_num_batched_tokens (prompt chunks with decodes, and decode-
only steps through the CUDA graphs' static buffers) must reallocate nothing: a captured graph
keeps writing the buffers it was captured with. Before the engine sized and froze its
workspace, the split-K buffers grew on the first step larger than the warm-up's and the old
ones were freed under the graphs. Run on the Triton interpreter and on the reference path.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.cuda_graphs import DecodeGraphs
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.launches import StepLimits, size_workspace
from loraplex.engine.request import Request
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import attention, nf4_matmul, runtime, splitk
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
    """K splits as on a GPU with more SMs than the CPU stand-in's 4, and the dequantize +
    cuBLAS plan from M = 16 up: every kind of workspace buffer is in play."""
    monkeypatch.setattr(runtime, "num_sms", lambda device: 16)
    heuristic = nf4_matmul.heuristic_plan
    monkeypatch.setattr(nf4_matmul, "heuristic_plan",
                        lambda n, k, m, device: Plan("cublas") if m >= 16 else heuristic(n, k, m, device))


def make_engine(loaded, max_tokens: int = MAX_TOKENS) -> Engine:
    model = loaded.model
    adapters = StaticAdapters(model, {"a": random_adapter(model, 1), "b": random_adapter(model, 2, rank=8)}, max_rank=8)
    engine = Engine(model, loaded.tokenizer, adapters,
                    EngineConfig(kv_cache_tokens=512, max_num_seqs=MAX_SEQS, max_num_batched_tokens=max_tokens))
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
    out["adapter slots"] = tuple(t.data_ptr() for t in (pool.weights, pool.scaling, pool.rank))
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
def test_no_buffer_is_reallocated_by_steps_of_any_size(loaded, gpu_like, path):
    if path == "reference":
        with runtime.reference_kernels():
            engine = make_engine(loaded)
            before = long_lived_buffers(engine)
            sizes = every_step_size(engine)
    else:
        assert runtime.use_triton(loaded.model.device), "the Triton kernels must run (interpreter)"
        engine = make_engine(loaded)
        before = long_lived_buffers(engine)
        sizes = every_step_size(engine)
        # the limits put every kind of buffer in play
        assert {splitk.VALUES, splitk.TICKETS, nf4_matmul.DENSE, attention.PARTIALS} <= set(engine.workspace.sizes())
    assert sizes >= set(range(1, MAX_TOKENS + 1))
    assert engine.workspace.frozen and engine.workspace.reallocations == 0
    assert long_lived_buffers(engine) == before


def test_a_launch_beyond_the_limits_raises_naming_the_buffer(loaded, gpu_like):
    engine = make_engine(loaded)
    small = size_workspace(engine.model, StepLimits(max_tokens=2, max_decodes=2, max_blocks=2, block_size=16),
                           engine.plans)
    engine.workspace = small
    engine.model.bind_kernels(engine.plans, small)
    engine.add_request(Request("big", list(range(1, 21)), SamplingParams(max_tokens=1), "a"))
    with pytest.raises(WorkspaceError, match="splitk.values"):
        engine.step()
