"""merge_adapters against peft's LoraModel.add_weighted_adapter (tiny random Llama, CPU)."""

import itertools

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.adapters.merge import MERGE_METHODS, MergeError, merge_adapters
from loraplex.adapters.peft_format import (
    AdapterError,
    LoRAAdapter,
    ModuleLoRA,
    read_peft_adapter,
    write_peft_adapter,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    # same rank (for linear / ties / dare), different alpha; down_proj only in "two",
    # k / o / gate / up only in "one"
    "one": dict(r=8, lora_alpha=16, target_modules=ALL[:6]),
    "two": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    # other ranks, per-module rank and rsLoRA: for cat / svd
    "three": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"k_proj": 2},
                  target_modules=["q_proj", "k_proj", "v_proj"]),
}
SAME_RANK = [("one", 0.7), ("two", -1.3)]
MIXED_RANK = [("one", 0.7), ("two", -1.3), ("three", 2.0)]
_fresh = itertools.count()


def _base():
    torch.manual_seed(0)  # every base is the same model
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One peft model holding the three adapters (random non-zero A and B), and each read back."""
    root = tmp_path_factory.mktemp("sources")
    model = None
    for name, fields in CONFIGS.items():
        config = LoraConfig(init_lora_weights=False, **fields)
        if model is None:
            model = get_peft_model(_base(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(1)
    for pname, p in model.named_parameters():
        if "lora_" in pname:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    adapters = {}
    for name in CONFIGS:
        model.save_pretrained(root, selected_adapters=[name])
        adapters[name] = read_peft_adapter(root / name)
    return model, adapters


def sources(adapters, pairs):
    return [(adapters[name], weight) for name, weight in pairs]


def deltas(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    return {key: m.scaling * m.b.float() @ m.a.float() for key, m in adapter.modules.items()}


def peft_merge(model, pairs, method, **kwargs) -> tuple[str, dict[str, torch.Tensor]]:
    """peft's merged adapter (a fresh name: peft silently skips a name it has) and its deltas."""
    name = f"merged{next(_fresh)}"
    names, weights = zip(*pairs)
    model.base_model.add_weighted_adapter(list(names), list(weights), name, combination_type=method, **kwargs)
    out = {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            a, b = module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()
            out[path.removeprefix("model.")] = module.scaling[name] * b @ a
    return name, out


def assert_deltas_close(ours: dict, theirs: dict, rtol=1e-4):
    assert ours.keys() == theirs.keys()
    for key in theirs:
        scale = theirs[key].abs().max().item()
        assert scale > 0, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=rtol, atol=rtol * scale, msg=key)


def weighted_sum(adapters, pairs) -> dict[str, torch.Tensor]:
    """sum_i w_i delta_i over the sources that target each module."""
    out = {}
    for name, weight in pairs:
        for key, delta in deltas(adapters[name]).items():
            out[key] = out.get(key, 0) + weight * delta
    return out


def lora(out_f=8, in_f=8, r=2, seed=0, scaling=0.5) -> ModuleLoRA:
    gen = torch.Generator().manual_seed(seed)
    return ModuleLoRA(torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen), scaling)


# ----------------------------------------------------------------------------------------
# Against peft
# ----------------------------------------------------------------------------------------

PEFT_CASES = [
    ("linear", SAME_RANK, {}),
    ("cat", MIXED_RANK, {}),
    ("svd", MIXED_RANK, {}),
    ("svd", MIXED_RANK, {"rank": 3}),
    ("ties", SAME_RANK, {"density": 0.5}),
    ("ties", SAME_RANK, {"density": 0.3, "majority_sign_method": "frequency"}),
    ("dare_linear", SAME_RANK, {"density": 1.0}),
    ("dare_ties", SAME_RANK, {"density": 1.0, "majority_sign_method": "frequency"}),
]


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("method, pairs, options", PEFT_CASES,
                         ids=lambda x: str(x) if isinstance(x, dict) else None)
def test_matches_peft(setup, method, pairs, options):
    model, adapters = setup
    peft_options = {("svd_rank" if k == "rank" else k): v for k, v in options.items()}
    _, theirs = peft_merge(model, pairs, method, **peft_options)
    merged = merge_adapters(sources(adapters, pairs), method, **options)
    assert_deltas_close(deltas(merged), theirs)
    assert all(m.scaling == 1.0 and m.a.dtype == torch.float32 for m in merged.modules.values())
    # the union of the sources' modules: down_proj is only in "two", up_proj only in "one"
    assert {"layers.1.mlp.down_proj", "layers.1.mlp.up_proj"} <= merged.modules.keys()


def test_methods_differ(setup):
    """The peft comparison above would not notice a method silently falling back to another."""
    _, adapters = setup
    src = sources(adapters, SAME_RANK)
    results = [
        deltas(merge_adapters(src, "linear")),
        deltas(merge_adapters(src, "cat")),
        deltas(merge_adapters(src, "ties", density=0.5)),
        deltas(merge_adapters(src, "ties", density=0.5, majority_sign_method="frequency")),
        deltas(merge_adapters(src, "dare_linear", density=0.5)),
        deltas(merge_adapters(src, "dare_ties", density=0.5)),
    ]
    key = "layers.0.self_attn.q_proj"  # in both sources
    for x, y in itertools.combinations(results, 2):
        assert not torch.allclose(x[key], y[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_draws_match_peft(setup, monkeypatch, method):
    """Same generator state when peft's merge loop starts -> the same masks, hence the same result.

    peft first builds the new adapter's layers (nn.Linear init draws from the global RNG), so
    the global generator is seeded at its first per-module merge call instead.
    """
    model, adapters = setup
    original = LoraModel._generalized_task_arithmetic_weighted_adapter
    started = []

    def seeded(self, *args, **kwargs):
        if not started:
            torch.manual_seed(1234)
            started.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded)
    _, theirs = peft_merge(model, SAME_RANK, method, density=0.6)
    src = sources(adapters, SAME_RANK)
    assert_deltas_close(deltas(merge_adapters(src, method, density=0.6, seed=1234)), theirs)
    other = deltas(merge_adapters(src, method, density=0.6, seed=1235))
    assert not torch.allclose(other["layers.0.self_attn.q_proj"], theirs["layers.0.self_attn.q_proj"])


def test_dare_is_reproducible_and_leaves_global_rng_alone(setup):
    _, adapters = setup
    src = sources(adapters, SAME_RANK)
    state = torch.random.get_rng_state()
    x, y = (merge_adapters(src, "dare_ties", density=0.4, seed=7) for _ in range(2))
    z = merge_adapters(src, "dare_ties", density=0.4, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert x.modules == y.modules
    assert x.modules != z.modules
    assert x.config["merge"] == {"method": "dare_ties", "weights": [0.7, -1.3], "density": 0.4,
                                 "majority_sign_method": "total", "seed": 7}


def test_dare_keeps_density_fraction_rescaled():
    """A module in one source only: entries kept with probability density, divided by it."""
    big = lora(out_f=256, in_f=256, r=8, seed=3, scaling=0.5)
    first = LoRAAdapter({"layers.0.mlp.up_proj": big})
    second = LoRAAdapter({"layers.0.self_attn.q_proj": lora(seed=4)})
    merged = merge_adapters([(first, 2.0), (second, 1.0)], "dare_linear", density=0.3, seed=0)
    # weight * scaling == 1, so each factor's weight is sqrt(1) == 1
    for got, source in ((merged.modules["layers.0.mlp.up_proj"].a, big.a),
                        (merged.modules["layers.0.mlp.up_proj"].b, big.b)):
        kept = got != 0
        assert abs(kept.float().mean().item() - 0.3) < 0.05
        torch.testing.assert_close(got[kept], source[kept] / 0.3)


def test_single_source_merges_linearly_like_peft(setup):
    """peft switches to linear for one source: no pruning or dropping, delta = w * delta."""
    model, adapters = setup
    pairs = [("one", -0.6)]
    expected = weighted_sum(adapters, pairs)
    for method, options in (("ties", {"density": 0.3}), ("dare_ties", {"density": 0.3}), ("svd", {})):
        _, theirs = peft_merge(model, pairs, method, **options)
        ours = deltas(merge_adapters(sources(adapters, pairs), method, **options))
        assert_deltas_close(ours, theirs)
        assert_deltas_close(ours, expected)


def test_single_source_svd_still_truncates(setup):
    """Divergence: peft ignores svd_rank for a single source; we truncate (compress an adapter)."""
    _, adapters = setup
    merged = merge_adapters([(adapters["one"], 1.0)], "svd", rank=2)
    assert {m.rank for m in merged.modules.values()} == {2}
    key = "layers.0.self_attn.q_proj"
    u, s, vh = torch.linalg.svd(deltas(adapters["one"])[key])
    torch.testing.assert_close(deltas(merged)[key], (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)


def test_round_trip_peft_loads_merged(setup, tmp_path):
    """write_peft_adapter(merged) loads in peft (cat: a different rank per module) and computes
    what peft's own merged adapter computes."""
    model, adapters = setup
    name, _ = peft_merge(model, MIXED_RANK, "cat")
    merged = merge_adapters(sources(adapters, MIXED_RANK), "cat")
    assert len({m.rank for m in merged.modules.values()}) > 1
    write_peft_adapter(merged, tmp_path)
    assert read_peft_adapter(tmp_path).modules == merged.modules
    loaded = PeftModel.from_pretrained(_base(), tmp_path).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    model.set_adapter(name)
    with torch.no_grad():
        expected, got, base = model(ids).logits, loaded(ids).logits, _base()(ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Exactness of cat and svd
# ----------------------------------------------------------------------------------------


def test_cat_is_exact_weighted_sum(setup):
    """rsLoRA source first: peft would inherit use_rslora and scale by sqrt(r); we do not."""
    _, adapters = setup
    pairs = [("three", 2.0), ("one", 0.7), ("two", -1.3)]
    merged = merge_adapters(sources(adapters, pairs), "cat")
    assert_deltas_close(deltas(merged), weighted_sum(adapters, pairs), rtol=1e-5)
    assert merged.modules["layers.0.self_attn.q_proj"].rank == 4 + 8 + 8
    assert merged.modules["layers.0.self_attn.k_proj"].rank == 2 + 8
    assert merged.modules["layers.1.mlp.down_proj"].rank == 8  # only "two" targets it
    assert merged.config["r"] == merged.config["lora_alpha"] == 20


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_svd_is_truncated_exact_sum(setup, rank):
    _, adapters = setup
    merged = merge_adapters(sources(adapters, MIXED_RANK), "svd", rank=rank)
    for key, exact in weighted_sum(adapters, MIXED_RANK).items():
        u, s, vh = torch.linalg.svd(exact)
        assert merged.modules[key].rank == rank
        truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(deltas(merged)[key], truncated, rtol=1e-4, atol=1e-4 * s[0].item())


def test_svd_rank_above_sum_is_exact(setup):
    _, adapters = setup
    merged = merge_adapters(sources(adapters, MIXED_RANK), "svd", rank=64)
    assert_deltas_close(deltas(merged), weighted_sum(adapters, MIXED_RANK))
    assert merged.modules["layers.0.self_attn.q_proj"].rank == 20  # the rank of the exact sum
    assert merged.modules["layers.0.mlp.up_proj"].rank == 8


def test_svd_never_forms_the_dense_delta(monkeypatch):
    """Llama-7B up_proj shape: the SVD only ever sees the small R x R core."""
    shapes = []
    svd = torch.linalg.svd

    def spy(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    key = "layers.0.mlp.up_proj"
    first, second = lora(11008, 4096, r=16, seed=1, scaling=2.0), lora(11008, 4096, r=16, seed=2, scaling=0.5)
    pairs = [(LoRAAdapter({key: first}), 0.7), (LoRAAdapter({key: second}), -1.3)]
    exact = merge_adapters(pairs, "svd", rank=32).modules[key]
    assert shapes == [(32, 32)]
    expected = torch.cat([first.b, second.b], dim=1) @ torch.cat([0.7 * 2.0 * first.a, -1.3 * 0.5 * second.a])
    atol = 1e-4 * expected.abs().max().item()
    torch.testing.assert_close(exact.b @ exact.a, expected, rtol=1e-4, atol=atol)


# ----------------------------------------------------------------------------------------
# Ranks, dtypes, inputs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties"])
def test_same_rank_methods_refuse_unequal_ranks(setup, method):
    model, adapters = setup
    pairs = [("one", 1.0), ("three", 1.0)]  # q_proj: rank 8 and rank 4
    density = None if method == "linear" else 0.5
    with pytest.raises(MergeError, match=r"layers\.0\.self_attn\.q_proj.*\[8, 4\].*'cat'.*'svd'"):
        merge_adapters(sources(adapters, pairs), method, density=density)
    with pytest.raises(ValueError, match="same r"):  # peft refuses too
        peft_merge(model, pairs, method, density=density)


def test_equal_ranks_are_checked_per_module(setup):
    """Divergence: peft compares each config's largest r and would refuse this."""
    _, adapters = setup
    down = adapters["two"].modules["layers.0.mlp.down_proj"]
    small = LoRAAdapter({"layers.0.mlp.down_proj": ModuleLoRA(down.a[:4], down.b[:, :4], 1.5)})
    merged = merge_adapters([(adapters["one"], 1.0), (small, -2.0)], "linear")
    assert merged.modules["layers.0.mlp.down_proj"].rank == 4
    key = "layers.0.mlp.down_proj"
    torch.testing.assert_close(deltas(merged)[key], -2.0 * deltas(small)[key])


def test_max_rank(setup):
    _, adapters = setup
    src = sources(adapters, SAME_RANK)
    with pytest.raises(MergeError, match=r"layers\.0\.self_attn\.q_proj: merged rank 16 exceeds max_rank 8"):
        merge_adapters(src, "cat", max_rank=8)
    assert merge_adapters(src, "cat", max_rank=16).max_rank == 16
    with pytest.raises(MergeError, match="merged rank 12 exceeds max_rank 8"):
        merge_adapters(src, "svd", rank=12, max_rank=8)
    assert merge_adapters(src, "linear", max_rank=8).max_rank == 8
    with pytest.raises(MergeError, match="merged rank 8 exceeds max_rank 4"):
        merge_adapters(src, "linear", max_rank=4)


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_sources_are_left_untouched(setup, method):
    _, adapters = setup
    pairs = MIXED_RANK if method in ("cat", "svd") else SAME_RANK
    src = sources(adapters, pairs)
    before = [{k: ModuleLoRA(m.a.clone(), m.b.clone(), m.scaling) for k, m in a.modules.items()}
              for a, _ in src]
    density = 0.5 if method in ("ties", "dare_linear", "dare_ties") else None
    merged = merge_adapters(src, method, density=density)
    for m in merged.modules.values():  # nothing is shared, so writing into the result is safe too
        m.a.add_(1.0)
        m.b.add_(1.0)
    assert [a.modules for a, _ in src] == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sources_are_upcast(setup, dtype):
    _, adapters = setup

    def cast(adapter, to):
        modules = adapter.modules.items()
        return LoRAAdapter({k: ModuleLoRA(m.a.to(to), m.b.to(to), m.scaling) for k, m in modules})

    low = [cast(adapters[name], dtype) for name, _ in SAME_RANK]
    as_fp32 = [cast(adapter, torch.float32) for adapter in low]
    weights = [w for _, w in SAME_RANK]
    for method, options in (("linear", {}), ("svd", {}), ("ties", {"density": 0.5})):
        merged = merge_adapters(list(zip(low, weights)), method, **options)
        assert {m.a.dtype for m in merged.modules.values()} == {torch.float32}
        assert merged.modules == merge_adapters(list(zip(as_fp32, weights)), method, **options).modules


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------

GOOD = LoRAAdapter({"layers.0.self_attn.q_proj": lora()})


def _with(**module):
    return LoRAAdapter({"layers.0.self_attn.q_proj": ModuleLoRA(**{**vars(lora()), **module})})


ERRORS = [
    (dict(sources=[]), "non-empty list"),
    (dict(sources=(GOOD, 1.0)), r"source 0: expected a \(LoRAAdapter, weight\) pair"),
    (dict(sources=[GOOD]), r"source 0: expected a \(LoRAAdapter, weight\) pair"),
    (dict(sources=[("adapter", 1.0)]), r"source 0: expected a \(LoRAAdapter, weight\) pair"),
    (dict(sources=[(GOOD, float("nan"))]), "source 0: weight must be a finite number"),
    (dict(sources=[(GOOD, 1.0), (GOOD, float("inf"))]), "source 1: weight must be a finite number"),
    (dict(sources=[(GOOD, True)]), "weight must be a finite number"),
    (dict(sources=[(GOOD, "1")]), "weight must be a finite number"),
    (dict(method="ties_svd"), "unknown merge method 'ties_svd'"),
    (dict(method="magnitude_prune"), "unknown merge method"),
    (dict(method="ties"), "method 'ties' needs density"),
    (dict(method="dare_linear", density=0), r"density must be a number in \(0, 1\]"),
    (dict(method="dare_ties", density=1.5), r"density must be a number in \(0, 1\]"),
    (dict(method="ties", density=float("nan")), r"density must be a number in \(0, 1\]"),
    (dict(method="linear", density=0.5), "density applies only to"),
    (dict(method="svd", rank=0), "rank must be an integer >= 1"),
    (dict(method="svd", rank=2.0), "rank must be an integer >= 1"),
    (dict(method="cat", rank=4), "rank applies only to method 'svd'"),
    (dict(method="ties", density=0.5, majority_sign_method="sum"), "majority_sign_method must be"),
    (dict(method="dare_ties", density=0.5, seed=-1), "seed must be an integer"),
    (dict(method="dare_ties", density=0.5, seed=1.5), "seed must be an integer"),
    (dict(max_rank=0), "max_rank must be an integer >= 1"),
    (dict(sources=[(GOOD, 1.0), (LoRAAdapter({}), 1.0)]), "source 1: the adapter has no modules"),
    (dict(sources=[(GOOD, 1.0), (LoRAAdapter({"layers.0.self_attn.q_proj": lora(in_f=16)}), 1.0)]),
     r"module layers\.0\.self_attn\.q_proj: the sources disagree on its \(out, in\) shape"),
    (dict(sources=[(LoRAAdapter({"layers.0.lm_head": lora()}), 1.0)]), "module key 'layers.0.lm_head'"),
    (dict(sources=[(LoRAAdapter({"q_proj": lora()}), 1.0)]), "module key 'q_proj'"),
    (dict(sources=[(_with(b=torch.ones(8, 3)), 1.0)]), r"expected a \[r, in\] and b \[out, r\]"),
    (dict(sources=[(_with(a=torch.ones(2, 8, 1)), 1.0)]), r"expected a \[r, in\] and b \[out, r\]"),
    (dict(sources=[(_with(a=torch.ones(2, 8, dtype=torch.int64)), 1.0)]), "expected float tensors"),
    (dict(sources=[(_with(scaling=float("inf")), 1.0)]), "scaling inf is not finite"),
    (dict(sources=[(_with(a=torch.full((2, 8), float("nan"))), 1.0)]), "NaN or infinite"),
]


@pytest.mark.parametrize("kwargs, message", ERRORS, ids=[m for _, m in ERRORS])
def test_errors(kwargs, message):
    kwargs = {"sources": [(GOOD, 1.0), (GOOD, 0.5)], "method": "cat", **kwargs}
    with pytest.raises(MergeError, match=message) as info:
        merge_adapters(**kwargs)
    assert isinstance(info.value, AdapterError) and isinstance(info.value, ValueError)
