"""peft_format against what peft itself writes, loads and computes (tiny random Llama, CPU)."""

import json
import math
import re
import shutil
import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.adapters.peft_format import (
    LINEAR_NAMES,
    AdapterError,
    BaseModelSpec,
    LoRAAdapter,
    ModuleLoRA,
    read_peft_adapter,
    write_peft_adapter,
)

PREFIX = "base_model.model.model."


def _llama_config(**kw):
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return LlamaConfig(**{**sizes, "num_key_value_heads": 2, "vocab_size": 128, **kw})


def _base(**kw):
    torch.manual_seed(0)  # every base is the same model
    return LlamaForCausalLM(_llama_config(**kw)).eval()


def _spec_of(model) -> BaseModelSpec:
    """The spec read off a real model's modules (cross-checks BaseModelSpec.from_hf_config)."""
    layer = model.model.layers[0]
    shapes = {name: tuple(layer.get_submodule(name).weight.shape) for name in LINEAR_NAMES}
    return BaseModelSpec("LlamaForCausalLM", len(model.model.layers), shapes, "llama")


SPEC = _spec_of(_base())
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def _save_peft(tmp_path, name="adapter", base_kw=None, **lora_kw):
    """A peft LoRA adapter with non-zero random lora_B (peft initialises B to zero)."""
    model = get_peft_model(_base(**(base_kw or {})), LoraConfig(**lora_kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for lin in module.lora_B.values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.1)
    path = tmp_path / name
    model.save_pretrained(path)
    return path, model.eval()


def _peft_layers(model) -> dict[str, LoraLayer]:
    return {
        name.removeprefix(PREFIX): m
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }


def _merged_logits(adapter: LoRAAdapter) -> torch.Tensor:
    """Our reading of the adapter, merged into a fresh base by hand: W += scaling * B @ A."""
    model = _base()
    with torch.no_grad():
        for key, m in adapter.modules.items():
            model.model.get_submodule(key).weight += m.scaling * (m.b @ m.a)
        return model(IDS).logits


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _assert_matches_peft(adapter: LoRAAdapter, peft_model) -> None:
    layers = _peft_layers(peft_model)
    assert set(adapter.modules) == set(layers)
    for key, m in adapter.modules.items():
        layer = layers[key]
        assert m.a.shape[0] == layer.r["default"]
        assert m.scaling == layer.scaling["default"]  # exactly: same formula, same inputs
        assert m.a.dtype == torch.float32 and m.a.is_contiguous() and m.b.is_contiguous()
        torch.testing.assert_close(m.scaling * (m.b @ m.a), layer.get_delta_weight("default"))
    torch.testing.assert_close(_merged_logits(adapter), _logits(peft_model), rtol=1e-5, atol=1e-5)


def _edit_config(path, **changes):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def _edit_tensors(path, edit):
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})


def _load_peft_quietly(path):
    """PeftModel.from_pretrained on a fresh base; fails on any missing/unexpected key warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(_base(), path).eval()
    bad = [str(w.message) for w in caught if re.search(r"missing|unexpected", str(w.message), re.IGNORECASE)]
    assert not bad, bad
    return model


# ----------------------------------------------------------------------------------------
# Reading what peft writes
# ----------------------------------------------------------------------------------------

CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"down_proj": 3, r"layers\.[01]\.self_attn\.v_proj": 5},
    ),
    "rslora_patterns": dict(
        r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 7}
    ),
    "list_mlp": dict(r=3, lora_alpha=5, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "regex": dict(r=4, lora_alpha=16, target_modules=r".*\.(k_proj|up_proj)"),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "layers_to_transform": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "mlp.up_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    ),
    "layers_to_transform_int": dict(r=4, lora_alpha=8, target_modules=["v_proj"], layers_to_transform=0),
    # an exact module path in the list escapes the layer filter (peft checks it first)
    "layers_to_transform_exact_path": dict(
        r=4,
        lora_alpha=8,
        target_modules=["model.layers.0.self_attn.q_proj", "v_proj"],
        layers_to_transform=[1],
    ),
    "attention_only": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "exclude_modules": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["model.layers.0.self_attn.v_proj"],
    ),
    "default_targets": dict(r=4, lora_alpha=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_matches_peft(tmp_path, case):
    path, peft_model = _save_peft(tmp_path, **CASES[case])
    adapter = read_peft_adapter(path, SPEC)
    _assert_matches_peft(adapter, peft_model)
    assert adapter.config == json.loads((path / "adapter_config.json").read_text())


def test_spec_from_hf_config_matches_model():
    assert BaseModelSpec.from_hf_config(_llama_config(), "LlamaForCausalLM") == SPEC


def test_adapter_properties(tmp_path):
    path, _ = _save_peft(tmp_path, **CASES["patterns"])
    adapter = read_peft_adapter(path, SPEC)
    assert adapter.max_rank == 6
    assert adapter.targets == {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"}
    assert adapter.nbytes() == sum(4 * (m.a.numel() + m.b.numel()) for m in adapter.modules.values())
    assert list(adapter.modules)[:3] == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.0.mlp.down_proj",
    ]


def test_all_linear_string_in_config(tmp_path):
    # peft saves "all-linear" expanded to full paths; a config may still carry the shorthand
    path, peft_model = _save_peft(tmp_path, **CASES["all_linear"])
    _edit_config(path, target_modules="all-linear")
    _assert_matches_peft(read_peft_adapter(path, SPEC), peft_model)


def test_fan_in_fan_out_does_not_change_layout(tmp_path):
    # peft resets fan_in_fan_out to False for nn.Linear (with a warning), so the tensors keep
    # their layout; a config saying true must read the same as peft loads it
    path, peft_model = _save_peft(tmp_path, **CASES["plain"])
    _edit_config(path, fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(_base(), path).eval()
    adapter = read_peft_adapter(path, SPEC)
    _assert_matches_peft(adapter, loaded)
    _assert_matches_peft(adapter, peft_model)


def test_bias_setting_without_bias_tensors_is_plain_lora(tmp_path):
    # Llama's linears have no bias, so bias="lora_only" saves nothing extra
    path, peft_model = _save_peft(tmp_path, bias="lora_only", **CASES["plain"])
    _assert_matches_peft(read_peft_adapter(path, SPEC), peft_model)


def test_dtype_conversion(tmp_path):
    path, _ = _save_peft(tmp_path, **CASES["plain"])
    adapter = read_peft_adapter(path, dtype=torch.bfloat16)
    reference = read_peft_adapter(path)
    for key, m in adapter.modules.items():
        assert m.a.dtype == m.b.dtype == torch.bfloat16 and m.a.is_contiguous() and m.b.is_contiguous()
        assert torch.equal(m.a, reference.modules[key].a.to(torch.bfloat16))


def test_bf16_tensors_in_file(tmp_path):
    path, peft_model = _save_peft(tmp_path, **CASES["plain"])
    _edit_tensors(path, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    adapter = read_peft_adapter(path, SPEC)
    for key, layer in _peft_layers(peft_model).items():
        assert torch.equal(adapter.modules[key].b, layer.lora_B["default"].weight.to(torch.bfloat16).float())


def test_pattern_order_is_the_saved_order(tmp_path):
    # peft matches the first pattern key in dict order but saves the keys sorted, so an
    # adapter whose order mattered cannot be loaded back by peft; we refuse it the same way
    path, _ = _save_peft(
        tmp_path,
        r=4,
        target_modules=["v_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.v_proj": 3},
    )
    with pytest.raises(RuntimeError, match="size mismatch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(_base(), path)
    with pytest.raises(AdapterError, match=r"layers\.1\.self_attn\.v_proj.*rank 2.*gives rank 3"):
        read_peft_adapter(path, SPEC)


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["patterns", "rslora_patterns", "all_linear", "layers_to_transform"])
def test_write_round_trip_through_peft(tmp_path, case):
    path, peft_model = _save_peft(tmp_path, **CASES[case])
    adapter = read_peft_adapter(path, SPEC)
    out = write_peft_adapter(adapter, tmp_path / "written", base_model_name_or_path="tiny-llama")
    assert out == tmp_path / "written"
    reloaded = _load_peft_quietly(out)
    torch.testing.assert_close(_logits(reloaded), _logits(peft_model), rtol=1e-6, atol=1e-6)
    for key, layer in _peft_layers(reloaded).items():
        assert layer.r["default"] == adapter.modules[key].a.shape[0]
        assert math.isclose(layer.scaling["default"], adapter.modules[key].scaling, rel_tol=1e-15)
    again = read_peft_adapter(out, SPEC)
    assert again == adapter
    assert again.config["base_model_name_or_path"] == "tiny-llama"


def test_write_exact_scalings_round_trip(tmp_path):
    # scalings that no alpha / r hits exactly still come back bit for bit
    gen = torch.Generator().manual_seed(5)
    modules = {}
    for i, (name, r, scaling) in enumerate(
        [("self_attn.q_proj", 3, 0.1), ("mlp.down_proj", 7, 1 / 3), ("self_attn.k_proj", 5, math.pi)]
    ):
        out_f, in_f = SPEC.shapes[name]
        modules[f"layers.{i % 2}.{name}"] = ModuleLoRA(
            torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen), scaling
        )
    adapter = LoRAAdapter(modules)
    path = write_peft_adapter(adapter, tmp_path / "exact")
    assert read_peft_adapter(path, SPEC) == adapter
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 7 and len(config["rank_pattern"]) == 2
    for key, layer in _peft_layers(_load_peft_quietly(path)).items():
        assert math.isclose(layer.scaling["default"], adapter.modules[key].scaling, rel_tol=1e-15)


def test_write_refuses_bad_module_key(tmp_path):
    m = ModuleLoRA(torch.zeros(2, 64), torch.zeros(64, 2), 1.0)
    with pytest.raises(AdapterError, match="embed_tokens"):
        write_peft_adapter(LoRAAdapter({"layers.0.embed_tokens": m}), tmp_path / "bad")
    with pytest.raises(AdapterError, match="expected a"):
        write_peft_adapter(
            LoRAAdapter({"layers.0.self_attn.q_proj": ModuleLoRA(m.a, m.b.T, 1.0)}), tmp_path / "bad"
        )


# ----------------------------------------------------------------------------------------
# Validation errors
# ----------------------------------------------------------------------------------------


@pytest.fixture
def plain(tmp_path):
    return _save_peft(tmp_path, **CASES["plain"])[0]


def test_pickle_only_is_refused(tmp_path):
    model = get_peft_model(_base(), LoraConfig(**CASES["plain"]))
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    with pytest.raises(AdapterError, match=r"pickle.*safetensors") as info:
        read_peft_adapter(tmp_path / "bin")
    assert "st.save_file(torch.load(" in str(info.value)


def test_missing_files(tmp_path, plain):
    with pytest.raises(AdapterError, match="does not exist"):
        read_peft_adapter(tmp_path / "nowhere")
    no_config = shutil.copytree(plain, tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        read_peft_adapter(no_config)
    (plain / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        read_peft_adapter(plain)


def test_wrong_peft_type(tmp_path):
    get_peft_model(
        _base(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    ).save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterError, match=r"peft_type.*expected 'LORA', found 'IA3'"):
        read_peft_adapter(tmp_path / "ia3")


def test_dora_is_refused(tmp_path):
    path, _ = _save_peft(tmp_path, use_dora=True, **CASES["plain"])
    with pytest.raises(AdapterError, match="DoRA"):
        read_peft_adapter(path)
    _edit_config(path, use_dora=False)  # the magnitude vectors alone give it away too
    with pytest.raises(AdapterError, match="DoRA.*lora_magnitude_vector"):
        read_peft_adapter(path)


def test_embedding_lora_is_refused(tmp_path):
    path, _ = _save_peft(tmp_path, r=4, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(AdapterError, match="embed_tokens.*embeddings or lm_head"):
        read_peft_adapter(path)
    _edit_config(path, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="embed"):
        read_peft_adapter(path)
    path, _ = _save_peft(tmp_path, name="head", r=4, target_modules=r".*(q_proj|lm_head)")
    with pytest.raises(AdapterError, match="lm_head"):
        read_peft_adapter(path)


def test_modules_to_save_is_refused(tmp_path):
    path, _ = _save_peft(tmp_path, modules_to_save=["lm_head"], **CASES["plain"])
    with pytest.raises(AdapterError, match="modules_to_save"):
        read_peft_adapter(path)


def test_trained_biases_are_refused(tmp_path):
    path, _ = _save_peft(tmp_path, base_kw=dict(attention_bias=True), bias="all", **CASES["plain"])
    with pytest.raises(AdapterError, match=r"k_proj\.bias.*biases"):
        read_peft_adapter(path)
    path, _ = _save_peft(tmp_path, name="lora_bias", lora_bias=True, **CASES["plain"])
    with pytest.raises(AdapterError, match="lora_bias"):
        read_peft_adapter(path)


def test_base_rewriting_init_is_refused(plain):
    _edit_config(plain, init_lora_weights="pissa_niter_4")
    with pytest.raises(AdapterError, match="init_lora_weights.*rewrites the base weights"):
        read_peft_adapter(plain)


def test_shape_mismatch_vs_spec(plain):
    spec = BaseModelSpec.from_hf_config(_llama_config(num_key_value_heads=4), "LlamaForCausalLM")
    with pytest.raises(AdapterError) as info:
        read_peft_adapter(plain, spec)
    message = str(info.value)
    assert "layers.0.self_attn.v_proj.lora_B.weight" in message
    assert "expected shape (64, 4)" in message and "found (32, 4)" in message


def test_layer_out_of_range(plain):
    spec = BaseModelSpec("LlamaForCausalLM", 1, SPEC.shapes, "llama")
    with pytest.raises(AdapterError, match=r"layers\.1\..*layer 1 out of range.*1 layers"):
        read_peft_adapter(plain, spec)


def test_architecture_mismatch(plain):
    spec = BaseModelSpec("MistralForCausalLM", 2, SPEC.shapes, "mistral")
    with pytest.raises(AdapterError, match="expected 'MistralForCausalLM'.*found 'LlamaForCausalLM'"):
        read_peft_adapter(plain, spec)


def test_unknown_module_name(plain):
    def rename(t):
        for which in "AB":
            t[f"{PREFIX}layers.0.self_attn.qkv_proj.lora_{which}.weight"] = t.pop(
                f"{PREFIX}layers.0.self_attn.q_proj.lora_{which}.weight"
            )

    _edit_tensors(plain, rename)
    with pytest.raises(AdapterError, match="unknown module 'self_attn.qkv_proj'"):
        read_peft_adapter(plain)


def test_unexpected_key(plain):
    _edit_tensors(plain, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}))
    with pytest.raises(AdapterError, match=r"'base_model\.model\.model\.norm\.weight': unexpected key"):
        read_peft_adapter(plain)


def test_key_not_targeted_by_config(plain):
    _edit_config(plain, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"v_proj\.lora_A\.weight.*not targeted"):
        read_peft_adapter(plain)


def test_targeted_module_without_weights(plain):
    _edit_config(plain, target_modules=["q_proj", "v_proj", "k_proj"])
    read_peft_adapter(plain)  # without a spec the layers are unknown
    with pytest.raises(AdapterError, match=r"targets layers\.0\.self_attn\.k_proj.*no weights"):
        read_peft_adapter(plain, SPEC)


def test_rank_above_max_rank(plain):
    with pytest.raises(AdapterError, match=r"rank 4 is outside the supported range 1\.\.2"):
        read_peft_adapter(plain, max_rank=2)


def test_rank_disagrees_with_config(plain):
    _edit_config(plain, r=8)
    with pytest.raises(AdapterError, match=r"rank 4.*gives rank 8"):
        read_peft_adapter(plain)


def test_non_finite_value_names_key(plain):
    key = f"{PREFIX}layers.1.self_attn.v_proj.lora_B.weight"
    _edit_tensors(plain, lambda t: t[key].__setitem__((3, 1), float("nan")))
    with pytest.raises(AdapterError, match=re.escape(key) + ".*NaN"):
        read_peft_adapter(plain)


def test_overflow_on_conversion(plain):
    key = f"{PREFIX}layers.0.self_attn.q_proj.lora_A.weight"
    _edit_tensors(plain, lambda t: t[key].__setitem__((0, 0), 1e6))
    with pytest.raises(AdapterError, match=re.escape(key) + ".*overflow"):
        read_peft_adapter(plain, dtype=torch.float16)


def test_file_too_large(plain):
    with pytest.raises(AdapterError, match="larger than the limit of 1000 bytes"):
        read_peft_adapter(plain, max_file_bytes=1000)


def test_a_without_b(plain):
    _edit_tensors(plain, lambda t: t.pop(f"{PREFIX}layers.1.self_attn.q_proj.lora_B.weight"))
    with pytest.raises(
        AdapterError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.weight' has no matching lora_B"
    ):
        read_peft_adapter(plain)


def test_b_without_a(plain):
    _edit_tensors(plain, lambda t: t.pop(f"{PREFIX}layers.0.self_attn.v_proj.lora_A.weight"))
    with pytest.raises(AdapterError, match=r"lora_B\.weight' has no matching lora_A"):
        read_peft_adapter(plain)


def test_corrupt_config(plain):
    (plain / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_peft_adapter(plain)


def test_errors_are_value_errors():
    assert issubclass(AdapterError, ValueError)
