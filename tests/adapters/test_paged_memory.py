"""Paged adapter memory through the registry and the engine: any rank without restart,
residency by bytes, waiting instead of refusing, and long churn that stays exact and leaves
the pool free.

Outputs are checked against transformers + PEFT (ranks 1..256 in one batch) or against an
oracle engine holding the adapter alone (tests/adapters/test_registry.py's `expected`).
"""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.adapters.peft_format import AdapterError, LoRAAdapter, ModuleLoRA, write_peft_adapter
from loraplex.adapters.registry import AdapterRegistry, RegistryBusyError, RegistryConfig
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.request import FinishReason, Request
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import runtime
from tests.adapters.test_registry import expected, finish, run, spec_of, submit, tokens, world  # noqa: F401
from tests.factory import hf_on_nf4

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(autouse=True)
def reference_kernels():
    with runtime.reference_kernels():
        yield


def lora(model, seed: int, ranks: dict[str, int], layers=None) -> LoRAAdapter:
    """A random adapter: `ranks` maps linear names (LINEARS) to ranks, on `layers` (default all)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, linear in model.linears().items():
        layer = int(path.split(".")[1])
        if layers is not None and layer not in layers:
            continue
        for name, w in zip(linear.names, linear.parts):
            r = ranks.get(name)
            if r:
                out_f, in_f = w.shape
                a = torch.randn(r, in_f, generator=gen) / in_f ** 0.5
                b = torch.randn(out_f, r, generator=gen) * 0.5
                modules[f"layers.{layer}.{name}"] = ModuleLoRA(a, b, 2.0 / r ** 0.5)
    return LoRAAdapter(modules)


def make(world, **config):  # noqa: F811
    _, served, _, _ = world
    registry = AdapterRegistry(served.model, spec_of(served),
                               RegistryConfig(**{"gpu_slots": 8, "host_slots": 16, "max_rank": 256, **config}))
    engine = Engine(served.model, served.tokenizer, registry, EngineConfig(kv_cache_tokens=512, max_num_seqs=8,
                                                                          max_num_batched_tokens=64))
    return registry, engine


def pages_of(registry, name) -> int:
    return registry.info(name).pages


def test_ranks_1_to_256_and_disjoint_targets_in_one_batch_match_transformers_peft(world, tmp_path):
    root, served, _, _ = world
    shapes = {  # rank per linear; the sets of linears are disjoint, and rank 256 exceeds the hidden size (64)
        "r1": {"self_attn.q_proj": 1},
        "r3": {"self_attn.k_proj": 3, "self_attn.v_proj": 3},
        "r8": {"self_attn.o_proj": 8},
        "r64": {"mlp.gate_proj": 64, "mlp.up_proj": 64},
        "r256": {"mlp.down_proj": 256},
    }
    paths = {name: write_peft_adapter(lora(served.model, i, ranks), tmp_path / name)
             for i, (name, ranks) in enumerate(shapes.items())}
    registry, engine = make(world)
    for name, path in paths.items():
        registry.register(name, path)
    gen = torch.Generator().manual_seed(3)
    vocab = served.model.config.vocab_size
    reqs = []
    for i, name in enumerate([*paths, None, *paths]):
        prompt = torch.randint(3, vocab, (4 + 3 * i % 11,), generator=gen).tolist()
        req = Request(f"q{i}", prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=2, ignore_eos=True), name)
        req.outputs = []
        req.on_output = req.outputs.append
        engine.add_request(req)
        reqs.append(req)
    run(engine)
    assert {i.name: i.tier for i in registry.list()} == dict.fromkeys(paths, "gpu")  # all resident at once
    assert registry.usage()["gpu_pages_used"] == sum(pages_of(registry, n) for n in paths)
    for req in reqs:
        hf = hf_on_nf4(root / "base", served.model, paths.get(req.adapter))
        with torch.no_grad():
            out = hf.generate(torch.tensor([req.prompt_ids]), max_new_tokens=5, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=served.tokenizer.pad_token_id,
                              attention_mask=torch.ones(1, len(req.prompt_ids)))
        assert tokens(req) == out.sequences[0, len(req.prompt_ids):].tolist(), req.adapter
        ours = [lp for o in req.outputs for lp in o.logprobs]
        for lp, step in zip(ours, out.logits):
            assert lp.logprob == pytest.approx(torch.log_softmax(step[0].float(), -1)[lp.token_id].item(), abs=1e-4)
    registry.close()


def test_residency_is_bounded_by_bytes_not_by_a_slot_count(world, tmp_path):
    """Small adapters share the memory one large one takes; the large one evicts idle small ones,
    least recently used first, only as many as it needs."""
    _, served, oracle, _ = world
    small = {f"s{i}": write_peft_adapter(lora(served.model, 10 + i, {"self_attn.q_proj": 4, "self_attn.v_proj": 4}),
                                         tmp_path / f"s{i}") for i in range(6)}
    big = write_peft_adapter(lora(served.model, 20, dict.fromkeys(LINEARS, 8)), tmp_path / "big")
    probe, _ = make(world)
    probe.register("big", big)
    probe.register("s0", small["s0"])
    big_pages, small_pages = pages_of(probe, "big"), pages_of(probe, "s0")
    probe.close()
    assert big_pages >= 6 * small_pages
    page_bytes = probe.pool.page_bytes
    registry, engine = make(world, gpu_slots=16, gpu_bytes=(big_pages + 2 * small_pages) * page_bytes)
    for name, path in small.items():
        registry.register(name, path)
    registry.register("big", big)
    reqs = [submit(engine, name, name) for name in small]
    run(engine)
    assert all(registry.info(n).tier == "gpu" for n in small)  # six adapters resident in little memory
    assert registry.usage()["gpu_pages_used"] == 6 * small_pages
    assert registry.info("s0").gpu_bytes == small_pages * page_bytes
    reqs += [submit(engine, "b", "big")]
    run(engine)
    tiers = {n: registry.info(n).tier for n in small}
    # room for big: the pool holds big + 2 small, so four of the six (the least recently used) went
    assert sorted(n for n, t in tiers.items() if t == "gpu") == ["s4", "s5"] and registry.info("big").tier == "gpu"
    usage = registry.usage()
    assert usage["gpu_pages_used"] == big_pages + 2 * small_pages <= usage["gpu_pages"]
    for req in reqs:
        assert finish(req) is FinishReason.LENGTH
        assert tokens(req) == expected(oracle, big if req.adapter == "big" else small[req.adapter])
    registry.close()


def test_an_adapter_that_does_not_fit_beside_running_ones_waits_and_is_never_refused(world, tmp_path):
    """The running adapters are reserved (no new sequences) until they finish; then the large
    one is paged in, and the reserved ones' later requests are served after it."""
    _, served, oracle, _ = world
    small = {f"s{i}": write_peft_adapter(lora(served.model, 30 + i, {"mlp.down_proj": 8}), tmp_path / f"s{i}")
             for i in range(2)}
    big = write_peft_adapter(lora(served.model, 40, dict.fromkeys(LINEARS, 16)), tmp_path / "big")
    probe, _ = make(world)
    probe.register("big", big)
    big_pages = pages_of(probe, "big")
    probe.close()
    registry, engine = make(world, gpu_bytes=big_pages * probe.pool.page_bytes)
    for name, path in small.items():
        registry.register(name, path)
    registry.register("big", big)
    long = [submit(engine, f"long-{n}", n, n=20) for n in small]
    for _ in range(3):
        engine.step()
    waiting = submit(engine, "big", "big")
    later = [submit(engine, f"later-{n}", n) for n in small]
    step, order = 0, {}
    while engine.has_work():
        engine.step()
        step += 1
        for req in [*long, waiting, *later]:
            if req.outputs and req.request_id not in order:
                order[req.request_id] = step
        assert step < 500
    assert order["big"] < min(order["later-s0"], order["later-s1"])  # it was not starved by newer requests
    for req in [*long, waiting, *later]:
        assert finish(req) is FinishReason.LENGTH
        path = big if req.adapter == "big" else small[req.adapter]
        assert tokens(req) == expected(oracle, path, n=req.params.max_tokens)
    registry.close()


def test_what_can_never_fit_is_refused_at_registration_with_the_sizes(world, tmp_path):
    _, served, _, _ = world
    big = write_peft_adapter(lora(served.model, 50, dict.fromkeys(LINEARS, 32)), tmp_path / "big")
    small = write_peft_adapter(lora(served.model, 51, {"self_attn.q_proj": 2}), tmp_path / "small")
    registry, _ = make(world, gpu_bytes=1 << 16)
    with pytest.raises(AdapterError, match=r"takes .* MiB of GPU adapter memory, more than there is \(0.1 MiB\)"):
        registry.register("big", big)
    registry.close()
    registry, _ = make(world, host_bytes=1 << 12)
    with pytest.raises(AdapterError, match="more than the host adapter memory"):
        registry.register("big", big)
    registry.close()
    # pins leave room for the largest unpinned adapter, and nothing registers that pins crowd out
    probe, _ = make(world)
    probe.register("big", big)
    pages = pages_of(probe, "big")
    probe.close()
    registry, _ = make(world, gpu_bytes=int(1.5 * pages) * probe.pool.page_bytes)
    registry.register("big", big)
    registry.register("small", small, pin=True)
    with pytest.raises(RegistryBusyError, match="too little left for the largest unpinned adapter"):
        registry.register("big2", big, pin=True)
    registry.pin("small", False)
    registry.unload("big")
    registry.register("big-pinned", big, pin=True)
    with pytest.raises(RegistryBusyError, match="pinned adapters leave"):
        registry.register("big3", big)
    assert registry.names() == ["big-pinned", "small"]
    registry.close()


def test_a_cat_merge_past_sixteen_ranks_serves(world, tmp_path):
    _, served, oracle, adapters = world
    registry, engine = make(world)
    registry.register("all", adapters["all"])  # rank 8 everywhere
    registry.register("wide", write_peft_adapter(lora(served.model, 60, dict.fromkeys(LINEARS, 24)),
                                                  tmp_path / "wide"))
    info = registry.merge("mix", "cat", [("all", 1.0), ("wide", 0.5)])
    assert info.rank == 32
    req = submit(engine, "m", "mix")
    run(engine)
    assert tokens(req) == expected(oracle, registry.info("mix").path)
    registry.close()


def test_thousand_churn_cycles_with_random_ranks_and_targets_stay_exact_and_free_the_pool(world, tmp_path):
    """Register, serve and unload (sometimes forced, sometimes replaced) adapters of random
    ranks (1..256) and random targets in a pool that holds only a few of them, 1,000 times,
    with requests in flight: every request that finishes gives its adapter's exact tokens, and
    afterwards every page, table entry, slot and host byte is free."""
    _, served, oracle, _ = world
    rng = random.Random(7)
    files = []
    for i in range(10):
        ranks = {name: rng.choice([1, 2, 4, 8, 16, 64, 256]) for name in rng.sample(LINEARS, rng.randint(1, 4))}
        layers = None if i % 3 else {rng.randrange(2)}
        files.append(write_peft_adapter(lora(served.model, 100 + i, ranks, layers), tmp_path / f"f{i}"))
    probe, _ = make(world)
    for i, path in enumerate(files):
        probe.register(f"f{i}", path)
    sizes = sorted(pages_of(probe, f"f{i}") for i in range(10))
    probe.close()
    # room for the largest adapter and a little more: most page-ins evict
    registry, engine = make(world, gpu_slots=4, host_slots=6, gpu_bytes=(sizes[-1] + sizes[3]) * probe.pool.page_bytes)
    events = {"evict_gpu": 0, "evict_host": 0}
    registry.on_event = lambda kind, name, seconds: events.__setitem__(kind, events.get(kind, 0) + 1)
    live: dict[str, int] = {}  # name -> file index
    reqs = []
    for cycle in range(1000):
        name = f"a{rng.randrange(8)}"
        choice = rng.randrange(10)
        if name in live and rng.random() < 0.2:
            registry.unload(name, force=rng.random() < 0.3)
            del live[name]
        else:
            registry.register(name, files[choice], replace=name in live)
            live[name] = choice
        if live and cycle % 4 == 0:
            for target in rng.sample(sorted(live), min(2, len(live))):  # two adapters per batch
                req = submit(engine, f"c{cycle}-{target}", target, n=2)
                req.file = live[target]
                reqs.append(req)
        engine.step()
    for name in list(live):
        registry.unload(name)
    run(engine, max_steps=5000)
    engine.step()
    finished = [r for r in reqs if finish(r) is FinishReason.LENGTH]
    assert len(finished) > 100
    for req in finished:
        assert tokens(req) == expected(oracle, files[req.file], n=2), req.request_id
    assert all(finish(r) in (FinishReason.LENGTH, FinishReason.ABORT) for r in reqs)
    assert events["evict_gpu"] > 20 and events["evict_host"] > 20  # both tiers were under pressure
    usage = registry.usage()
    assert usage["registered"] == usage["draining"] == usage["gpu_slots_used"] == usage["gpu_pages_used"] == 0
    assert usage["host_adapters"] == usage["host_bytes_used"] == usage["host_claims"] == 0
    pool = registry.pool
    assert not pool.placed and pool._free_pages.runs() == [(0, pool.num_pages)]
    assert pool._free_table.runs() == [(0, pool.num_pages)]
    registry.close()
