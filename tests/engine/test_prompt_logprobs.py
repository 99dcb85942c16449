"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers + PEFT.

Reference: transformers on the NF4-dequantized weights in fp32, with the adapter loaded by
PEFT, one forward over the prompt: prompt token i + 1's logprob is log_softmax(logits)[i,
prompt[i + 1]]. loraplex computes them in its prefill pass, over several steps when the
prompt is chunked, once even when a preempted request is recomputed, with or without async
scheduling, and without touching the other requests of the batch.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters.peft_format import read_peft_adapter
from loraplex.engine import prompt_logprobs
from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.request import Request
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import runtime
from loraplex.model.loader import load_model
from tests.factory import hf_on_nf4, make_adapter, make_model, random_adapter

# every test but the last on the PyTorch references (fixture: tests/engine/conftest.py)
on_references = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-logprobs")
    make_model(root / "base", "llama")
    adapters = {"all": make_adapter(root / "base", root / "all", "all", seed=1)}
    with runtime.reference_kernels():
        loaded = load_model(root / "base", dtype=torch.float32, progress=False)
    return root, loaded, adapters


@pytest.fixture(scope="module")
def hf_models(setup):
    """transformers (+ PEFT) on our NF4 weights, by adapter name (None = base)."""
    root, loaded, adapters = setup
    return {name: hf_on_nf4(root / "base", loaded.model, None if name is None else adapters[name])
            for name in [None, *adapters]}


def reference(hf_models, adapter, prompt) -> torch.Tensor:
    """log_softmax of transformers' logits at every prompt position [L, V]."""
    with torch.no_grad():
        logits = hf_models[adapter](torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def make_engine(setup, **config) -> Engine:
    _, loaded, adapters = setup
    read = {n: read_peft_adapter(p) for n, p in adapters.items()}
    provider = StaticAdapters(loaded.model, read, max_rank=16)
    return Engine(loaded.model, loaded.tokenizer, provider, EngineConfig(**config))


def run(engine: Engine, arrivals: dict[int, list[Request]], preempted_at_first: dict | None = None
        ) -> dict[str, list]:
    """arrivals: {step: [Request, ...]}; returns {request_id: [outputs]}. `preempted_at_first`
    gets each request's preemption count when its first output came."""
    outputs: dict[str, list] = {}
    step = 0

    def channel(req):
        def on_output(out):
            outputs.setdefault(req.request_id, []).append(out)
            if preempted_at_first is not None:
                preempted_at_first.setdefault(req.request_id, req.num_preemptions)
        return on_output
    while step <= max(arrivals) or engine.has_work():
        for req in arrivals.get(step, []):
            req.on_output = channel(req)
            engine.add_request(req)
        engine.step()
        step += 1
        assert step < 500
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1
    return outputs


def prompts(setup, lengths, seed=0):
    vocab = setup[1].model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def prompt_lps(outs):
    """The request's prompt logprobs: on its first output only."""
    assert all(o.prompt_logprobs is None for o in outs[1:])
    return outs[0].prompt_logprobs


def values(lps):
    """(token ids, logprobs, top ids, top values) of a prompt_logprobs list, the None first skipped."""
    assert lps[0] is None and all(lp is not None for lp in lps[1:])
    return ([lp.token_id for lp in lps[1:]], [lp.logprob for lp in lps[1:]],
            [[t for t, _ in lp.top] for lp in lps[1:]], [[v for _, v in lp.top] for lp in lps[1:]])


def check_against_reference(hf_models, req, lps, k):
    prompt = req.prompt_ids
    assert len(lps) == len(prompt)
    ref = reference(hf_models, req.adapter, prompt)
    ids, lp, top_ids, top_values = values(lps)
    assert ids == prompt[1:]
    assert lp == pytest.approx([ref[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)], abs=1e-4)
    ref_top = ref[:-1].topk(k, dim=-1) if k else None
    assert top_ids == (ref_top.indices.tolist() if k else [[]] * (len(prompt) - 1))
    if k:
        assert top_values == [pytest.approx(row, abs=1e-4) for row in ref_top.values.tolist()]


@on_references
def test_prompt_logprobs_match_transformers_peft(setup, hf_models):
    engine = make_engine(setup, max_num_seqs=4, max_num_batched_tokens=64, block_size=4, kv_cache_tokens=256)
    lengths, names, ks = [13, 9, 1, 6], [None, "all", "all", None], [3, 5, 2, 0]
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=k),
                    name)
            for i, (p, name, k) in enumerate(zip(prompts(setup, lengths), names, ks))]
    outputs = run(engine, {0: reqs})
    for req, k in zip(reqs, ks):
        lps = prompt_lps(outputs[req.request_id])
        if len(req.prompt_ids) == 1:
            assert lps == [None]  # nothing predicts the first token
        else:
            check_against_reference(hf_models, req, lps, k)


@on_references
def test_chunked_prompt_gives_the_unchunked_values(setup, hf_models, monkeypatch):
    """A prompt over several steps (token budget 8), or its logits made a few rows at a time
    (the memory bound), gives the values of one step at once."""
    prompt = prompts(setup, [37], seed=1)[0]
    results = {}
    for budget, rows_per_chunk in ((64, 256), (64, 5), (8, 256)):
        monkeypatch.setattr(prompt_logprobs, "ROWS_PER_CHUNK", rows_per_chunk)
        engine = make_engine(setup, max_num_seqs=4, max_num_batched_tokens=budget, block_size=4,
                             kv_cache_tokens=256)
        req = Request("long", prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=4), "all")
        outs = run(engine, {0: [req]})["long"]
        results[budget, rows_per_chunk] = values(prompt_lps(outs))
    check_against_reference(hf_models, req, prompt_lps(outs), 4)
    ids, lp, top_ids, top_values = results[64, 256]
    for other in (results[64, 5], results[8, 256]):  # equal up to fp32 rounding (other matmul shapes)
        assert other[:3:2] == (ids, top_ids)
        assert other[1] == pytest.approx(lp, abs=1e-5)
        assert other[3] == [pytest.approx(row, abs=1e-5) for row in top_values]


@on_references
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preemption_computes_each_prompt_position_once(setup, hf_models, monkeypatch, async_scheduling):
    """A tiny KV cache: "c" is preempted in the middle of its chunked prefill (some of its
    prompt logprobs collected), "b" after its first output; each prompt position is computed
    once and each request's list holds every position once."""
    computed = []
    real = prompt_logprobs.compute

    def counted(model, x, residual, wanted):
        computed.extend((req.request_id, p) for req, lo, hi in wanted.segments for p in range(lo, hi))
        return real(model, x, residual, wanted)
    monkeypatch.setattr(prompt_logprobs, "compute", counted)

    engine = make_engine(setup, max_num_seqs=4, max_num_batched_tokens=8, block_size=4, kv_cache_tokens=48,
                         async_scheduling=async_scheduling)
    long_params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, prompt_logprobs=2)
    reqs = [Request("a", prompts(setup, [4], seed=2)[0], long_params),
            Request("b", prompts(setup, [6], seed=3)[0], long_params, "all"),
            Request("c", prompts(setup, [19], seed=4)[0], long_params)]
    preempted_at_first: dict[str, int] = {}
    outputs = run(engine, {0: reqs[:2], 6: reqs[2:]}, preempted_at_first)
    assert reqs[1].num_preemptions > 0 and reqs[2].num_preemptions > 0, "the cache was meant to be too small"
    assert len(computed) == len(set(computed)) == sum(len(r.prompt_ids) - 1 for r in reqs)
    for req in reqs:
        outs = outputs[req.request_id]
        assert sum(len(o.token_ids) for o in outs) == 24
        check_against_reference(hf_models, req, prompt_lps(outs), 2)
    assert preempted_at_first["c"] > 0, "c was meant to be preempted while prefilling"


@on_references
def test_other_requests_are_unchanged(setup, monkeypatch):
    """A mixed batch: with prompt_logprobs on two requests the others' tokens and logprobs are
    the same as without (and without any, the prompt-logprob path never runs)."""
    calls = []
    real = prompt_logprobs.compute
    monkeypatch.setattr(prompt_logprobs, "compute", lambda *args: calls.append(1) or real(*args))

    def workload(asked: bool):
        ps = prompts(setup, [11, 7, 15, 5], seed=5)
        return {0: [Request(f"m{i}", p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2,
                                                        prompt_logprobs=(1 if asked and i % 2 else None)),
                            name)
                    for i, (p, name) in enumerate(zip(ps, [None, "all", "all", None]))]}

    results = {}
    for asked in (False, True):
        calls.clear()
        engine = make_engine(setup, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
                             kv_cache_tokens=256)
        outputs = run(engine, workload(asked))
        assert bool(calls) == asked
        results[asked] = {rid: ([t for o in outs for t in o.token_ids],
                                [(lp.token_id, lp.logprob, lp.top) for o in outs for lp in o.logprobs])
                          for rid, outs in outputs.items()}
        for i, rid in enumerate(sorted(outputs)):
            assert (prompt_lps(outputs[rid]) is not None) == (asked and i % 2 == 1)
    assert results[True] == results[False]


@on_references
def test_async_scheduling_gives_the_same_values(setup, hf_models):
    ps = prompts(setup, [21, 10, 3], seed=6)
    results = {}
    for mode in (False, True):
        engine = make_engine(setup, max_num_seqs=4, max_num_batched_tokens=8, block_size=4, kv_cache_tokens=256,
                             async_scheduling=mode)
        reqs = [Request(f"s{i}", p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3),
                        name) for i, (p, name) in enumerate(zip(ps, ["all", None, "all"]))]
        outputs = run(engine, {0: reqs[:2], 2: reqs[2:]})
        results[mode] = {r.request_id: (values(prompt_lps(outputs[r.request_id])),
                                        [t for o in outputs[r.request_id] for t in o.token_ids]) for r in reqs}
        if mode:
            for req in reqs:
                check_against_reference(hf_models, req, prompt_lps(outputs[req.request_id]), 3)
    for rid, ((ids, lp, top_ids, top_values), tokens) in results[False].items():
        (a_ids, a_lp, a_top_ids, a_top_values), a_tokens = results[True][rid]
        assert (a_ids, a_top_ids, a_tokens) == (ids, top_ids, tokens)
        assert a_lp == pytest.approx(lp, abs=1e-5)


def test_triton_path_in_bf16(tmp_path, device):
    """The Triton kernels (the interpreter on CPU, compiled on GPU, where the values come back
    through the pinned copy) in bf16 give the reference path's prompt logprobs."""
    make_model(tmp_path, "qwen2", hidden=64)
    loaded = load_model(tmp_path, dtype=torch.bfloat16, device=device, progress=False)

    def prompt_values(adapters):
        engine = Engine(loaded.model, loaded.tokenizer, StaticAdapters(loaded.model, adapters, max_rank=4),
                        EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, kv_cache_tokens=128, block_size=16))
        params = SamplingParams(max_tokens=1, prompt_logprobs=2)
        reqs = [Request(f"t{i}", list(range(5 + i, 25 + 2 * i)), params, name) for i, name in enumerate([None, "a"])]
        outputs = run(engine, {0: reqs})
        return {r.request_id: values(prompt_lps(outputs[r.request_id])) for r in reqs}

    adapters = {"a": random_adapter(loaded.model, 1)}
    with runtime.reference_kernels():
        expected = prompt_values(adapters)
    assert runtime.use_triton(loaded.model.device), "this test is about the Triton path"
    got = prompt_values(adapters)
    for rid, (ids, lp, _, top_values) in expected.items():
        assert got[rid][0] == ids
        # bf16 rounding, through two layers and a strong random LoRA: a few hundredths on
        # average, a few tenths at worst (a misplaced row would be off by nats)
        for want, have in ((lp, got[rid][1]), ([r[0] for r in top_values], [r[0] for r in got[rid][3]])):
            diffs = [abs(a - b) for a, b in zip(want, have)]
            assert len(diffs) == len(ids), rid
            assert max(diffs) < 0.5 and sum(diffs) / len(diffs) < 0.05, (rid, diffs)
