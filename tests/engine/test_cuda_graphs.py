"""Decode steps through the padded static buffers of `DecodeGraphs` give the same results as
the plain path: on CPU without capture (the padding logic), on a GPU with real graphs."""

from __future__ import annotations

import pytest
import torch

from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.cuda_graphs import DecodeGraphs
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.request import Request
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import runtime
from loraplex.model.loader import load_model
from tests.factory import make_model, random_adapter


def generate(loaded, graphs: str, max_tokens=6, async_scheduling=False):
    """graphs: "off", "eager" (padded buffers, no capture) or "captured"."""
    adapters = StaticAdapters(loaded.model, {"a": random_adapter(loaded.model, 1), "b": random_adapter(loaded.model, 2)}, max_rank=4)
    engine = Engine(loaded.model, loaded.tokenizer, adapters,
                    EngineConfig(kv_cache_tokens=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                                 cuda_graph_max_batch=8 if graphs == "captured" else 0,
                                 async_scheduling=async_scheduling))
    if graphs == "eager":
        engine.runner.graphs = DecodeGraphs(loaded.model, 8, max_blocks=-(-engine.max_model_len // 4))
    if graphs == "captured":
        engine.warm_up(["a", "b"])
        assert engine.runner.graphs is not None and engine.runner.graphs.captured
    replays = {"n": 0}
    if engine.runner.graphs is not None:
        real = engine.runner.graphs.run

        def counted(*args, **kw):
            replays["n"] += 1
            return real(*args, **kw)
        engine.runner.graphs.run = counted
    reqs = [Request(f"r{i}", list(range(3 + i, 9 + 2 * i)), SamplingParams(max_tokens=max_tokens - i % 3, temperature=0,
                                                                          logprobs=2, ignore_eos=True), name)
            for i, name in enumerate([None, "a", "b", "a", None])]
    outs = {r.request_id: [] for r in reqs}
    for r in reqs:
        r.on_output = outs[r.request_id].append
        engine.add_request(r)
    engine.run_until_done()
    assert graphs == "off" or replays["n"] > 0
    return {rid: [lp for o in lst for lp in o.logprobs] for rid, lst in outs.items()}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_padded_decode_path_matches_plain_path(tmp_path, async_scheduling):
    """With async scheduling the padded path also takes pending input tokens from the device."""
    make_model(tmp_path, "llama-gqa-tied")
    with runtime.reference_kernels():
        loaded = load_model(tmp_path, dtype=torch.float32, progress=False)
        plain, padded = generate(loaded, "off"), generate(loaded, "eager", async_scheduling=async_scheduling)
    for rid in plain:
        assert [lp.token_id for lp in padded[rid]] == [lp.token_id for lp in plain[rid]]
        for a, b in zip(plain[rid], padded[rid]):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_captured_graphs_match_eager_on_gpu(tmp_path, async_scheduling):
    """Eager and synchronous against captured graphs, with and without one step in flight (the
    CUDA default: pending input tokens, non-blocking copies, the graphs' logits buffer reused)."""
    make_model(tmp_path, "qwen2", hidden=128)
    loaded = load_model(tmp_path, dtype=torch.bfloat16, device="cuda", progress=False)
    eager, captured = generate(loaded, "off"), generate(loaded, "captured", async_scheduling=async_scheduling)
    for rid in eager:
        for a, b in zip(eager[rid], captured[rid]):
            assert b.top[0][1] == pytest.approx(a.top[0][1], abs=0.05)
            if a.token_id != b.token_id:
                assert a.top[0][1] - a.top[1][1] < 0.1
                break
