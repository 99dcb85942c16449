"""The engine against transformers + PEFT: one mixed batch of many adapters, token for token.

Reference: transformers on the NF4-dequantized weights in fp32, each request alone with its
adapter loaded by PEFT, greedy. loraplex runs every request at once (base + three adapters,
different prompt lengths, arrivals at different steps, chunked prefill, small KV blocks) and
must produce the same tokens and the same log-probabilities.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters.peft_format import read_peft_adapter
from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.request import FinishReason, Request
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import runtime
from loraplex.model import attention as model_attention
from loraplex.model.loader import load_model
from tests.factory import ADAPTERS, hf_on_nf4, make_adapter, make_model


@pytest.fixture(autouse=True)
def reference_kernels():
    # fp32 end to end on the PyTorch references; the Triton path is covered in test_model_triton.py
    with runtime.reference_kernels():
        yield


@pytest.fixture(scope="module", params=["llama", "llama-gqa-tied", "qwen2", "mistral"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_model(root / "base", request.param)
    adapters = {name: make_adapter(root / "base", root / name, name, seed=i + 1)
                for i, name in enumerate(ADAPTERS)}
    with runtime.reference_kernels():
        loaded = load_model(root / "base", dtype=torch.float32, progress=False)
    return root, loaded, adapters


def reference(root, loaded, adapter_dir, prompt, max_new):
    """Greedy tokens and per-step log-probs from transformers (+ PEFT) on our NF4 weights."""
    hf = hf_on_nf4(root / "base", loaded.model, adapter_dir)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                          output_logits=True, return_dict_in_generate=True,
                          pad_token_id=loaded.tokenizer.pad_token_id, attention_mask=torch.ones(1, len(prompt)))
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(step[0].float(), -1) for step in out.logits]


def make_engine(loaded, adapters, **config):
    provider = StaticAdapters(loaded.model, {n: read_peft_adapter(p) for n, p in adapters.items()}, max_rank=16)
    return Engine(loaded.model, loaded.tokenizer, provider, EngineConfig(**config))


def run(engine, arrivals):
    """arrivals: {step: [Request, ...]}; returns {request_id: [outputs]}."""
    outputs: dict[str, list] = {}
    step = 0
    while step <= max(arrivals) or engine.has_work():
        for req in arrivals.get(step, []):
            req.on_output = outputs.setdefault(req.request_id, []).append
            engine.add_request(req)
        engine.step()
        step += 1
        assert step < 500
    return outputs


def prompts(loaded, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.model.config.vocab_size
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_mixed_batch_matches_transformers_peft(setup):
    check_mixed_batch(*setup)


def test_mixed_batch_matches_transformers_peft_with_the_prefill_kernel(setup, monkeypatch):
    """The same, with the paged prefill attention kernel (interpreted) in place of the
    reference's gather + SDPA; everything else stays on the references."""
    real = model_attention.paged_prefill_attention

    def kernel(*args):
        monkeypatch.setattr(runtime, "_reference_only", False)
        try:
            return real(*args)
        finally:
            monkeypatch.setattr(runtime, "_reference_only", True)

    monkeypatch.setattr(model_attention, "paged_prefill_attention", kernel)
    with runtime.recording_launches() as launched:
        check_mixed_batch(*setup)
    assert {key[0] for key in launched} == {"_paged_prefill_kernel"}


def check_mixed_batch(root, loaded, adapters):
    lengths = [5, 11, 3, 23, 7, 9, 1]
    names = [None, "all", "attn", "pattern", "all", None, "pattern"]
    arrive = [0, 0, 0, 0, 3, 5, 6]
    max_new = [8, 6, 10, 7, 9, 5, 6]
    engine = make_engine(loaded, adapters, max_num_seqs=8, max_num_batched_tokens=16, block_size=4,
                         kv_cache_tokens=512)
    arrivals: dict[int, list] = {}
    for i, (p, name, step, n) in enumerate(zip(prompts(loaded, lengths), names, arrive, max_new)):
        params = SamplingParams(max_tokens=n, temperature=0.0, logprobs=3)
        arrivals.setdefault(step, []).append(Request(f"r{i}", p, params, name))
    reqs = [r for rs in arrivals.values() for r in rs]
    outputs = run(engine, arrivals)
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1  # every block came back
    for req in reqs:
        outs = outputs[req.request_id]
        tokens = [t for o in outs for t in o.token_ids]
        logprobs = [lp for o in outs for lp in (o.logprobs or [])]
        ref_tokens, ref_logprobs = reference(root, loaded, adapters.get(req.adapter), req.prompt_ids,
                                             req.params.max_tokens)
        assert tokens == ref_tokens, f"{req.request_id} ({req.adapter}): {tokens} != {ref_tokens}"
        assert outs[-1].finished and outs[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        for lp, ref in zip(logprobs, ref_logprobs):
            assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=2e-4)
            ref_top = ref.topk(3)
            assert [t for t, _ in lp.top] == ref_top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(ref_top.values.tolist(), abs=2e-4)


def test_adapters_change_outputs(setup):
    """Guard against a vacuous comparison: every adapter moves the logits away from the base."""
    _, loaded, adapters = setup
    engine = make_engine(loaded, adapters, kv_cache_tokens=256)
    prompt = prompts(loaded, [12], seed=3)[0]
    arrivals = {0: [Request(name or "base", prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=5), name)
                    for name in [None, *ADAPTERS]]}
    outputs = run(engine, arrivals)
    tops = {rid: outs[-1].logprobs[0].top for rid, outs in outputs.items()}
    for name in ADAPTERS:
        assert tops[name] != tops["base"]


def test_preemption_under_kv_pressure_keeps_outputs_exact(setup):
    root, loaded, adapters = setup
    engine = make_engine(loaded, adapters, max_num_seqs=6, max_num_batched_tokens=32, block_size=4,
                         kv_cache_tokens=64)
    reqs = [Request(f"p{i}", p, SamplingParams(max_tokens=14, temperature=0, ignore_eos=True), name)
            for i, (p, name) in enumerate(zip(prompts(loaded, [9, 13, 6, 10], seed=5), [None, "all", "attn", "pattern"]))]
    outputs = run(engine, {0: reqs})
    assert sum(r.num_preemptions for r in reqs) > 0, "the cache was meant to be too small for all four"
    assert engine.allocator.num_free == engine.allocator.num_blocks - 1
    for req in reqs:
        tokens = [t for o in outputs[req.request_id] for t in o.token_ids]
        assert len(tokens) == 14
        # reference without EOS: compare the prefix up to the reference's stop, if any
        ref_tokens, _ = reference(root, loaded, adapters.get(req.adapter), req.prompt_ids, 14)
        assert tokens[:len(ref_tokens)] == ref_tokens
