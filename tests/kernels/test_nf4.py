"""NF4 format: bit-exact with bitsandbytes, and the checkpoints transformers writes."""

import json

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file

from loraplex.kernels.nf4 import (
    NF4FormatError,
    NF4Weight,
    dequantize_nf4,
    dynamic_map,
    nf4_levels,
    quantize_nf4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 64), (256, 192), (1000, 320), (3, 100), (333, 64)]  # (3, 100): partial last block


def _weight(shape, dtype, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * scale
    w[0, : min(64, shape[1])] = 0  # an all-zero block
    return w.to(dtype)


def _bnb_state(w, double_quant=True, quant_storage=torch.uint8):
    packed, qs = bnbF.quantize_4bit(
        w, blocksize=64, compress_statistics=double_quant, quant_type="nf4", quant_storage=quant_storage
    )
    state = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    return packed, qs, state


def test_code_books_match_bitsandbytes():
    assert torch.equal(nf4_levels(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.02, 3.0])
def test_quantize_is_bit_exact_with_bitsandbytes(dtype, shape, scale):
    w = _weight(shape, dtype, seed=hash((shape, scale)) % 1000, scale=scale)
    packed, qs, state = _bnb_state(w)
    ours = quantize_nf4(w).to_bnb()
    assert ours.keys() == state.keys()
    for key, expected in state.items():
        assert torch.equal(ours[key], expected), key
    assert json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))["nested_offset"] == qs.offset.item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_matches_bitsandbytes(dtype, double_quant):
    w = _weight((256, 320), dtype, seed=1)
    packed, qs, _ = _bnb_state(w, double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    assert q.nested == double_quant
    expected = bnbF.dequantize_4bit(packed, qs, quant_type="nf4")
    got = dequantize_nf4(q)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_non_nested_codes_match_bitsandbytes():
    w = _weight((128, 192), torch.bfloat16, seed=2)
    packed, qs, _ = _bnb_state(w, double_quant=False)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.codes.reshape(-1, 1), packed)
    assert torch.equal(q.absmax, qs.absmax)


def test_quantization_error_is_small():
    w = torch.randn(512, 512) * 0.02
    rel = (dequantize_nf4(quantize_nf4(w), torch.float32) - w).norm() / w.norm()
    assert rel < 0.12  # NF4 on Gaussian weights: ~0.1 relative error


def test_from_bnb_reads_other_quant_storage():
    w = _weight((64, 128), torch.bfloat16, seed=3)
    packed, qs, state = _bnb_state(w, quant_storage=torch.bfloat16)
    assert state["weight"].dtype == torch.bfloat16
    q = NF4Weight.from_bnb(state)
    assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(packed.view(torch.uint8), qs, quant_type="nf4"))


def test_resident_size_per_weight():
    q = quantize_nf4(torch.randn(4096, 4096, dtype=torch.bfloat16))
    bytes_per_weight = q.resident_bytes() / (4096 * 4096)
    assert bytes_per_weight <= 0.52
    assert q.codes.dtype == torch.uint8 and q.absmax.dtype == torch.uint8  # no fp32 absmax kept
    assert q.code2 is dynamic_map(q.device)  # the shared table, not a copy per weight


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="float"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)


def test_from_bnb_errors_are_specific():
    w = _weight((64, 128), torch.float16, seed=4)
    _, _, state = _bnb_state(w)
    for missing, pattern in [("weight.absmax", "weight.absmax"), ("weight.nested_quant_map", "nested_quant_map")]:
        broken = dict(state)
        del broken[missing]
        with pytest.raises(NF4FormatError, match=pattern):
            NF4Weight.from_bnb(broken)
    broken = dict(state, weight=state["weight"][:-1])
    with pytest.raises(NF4FormatError, match="code bytes"):
        NF4Weight.from_bnb(broken)
    broken = dict(state, **{"weight.quant_map": torch.linspace(-1, 1, 16)})
    with pytest.raises(NF4FormatError, match="code book"):
        NF4Weight.from_bnb(broken)
    with pytest.raises(NF4FormatError, match="missing tensor 'w2'"):
        NF4Weight.from_bnb(state, prefix="w2")


def test_fp4_is_refused_naming_the_quant_type():
    packed, qs = bnbF.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="fp4")
    state = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    with pytest.raises(NF4FormatError, match="'fp4'"):
        NF4Weight.from_bnb(state)


# --- checkpoints written by transformers + bitsandbytes -----------------------------------


def _tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    src = tmp_path / "bf16"
    model.save_pretrained(src)
    return src, {k: v for k, v in model.state_dict().items()}


def _quantized_checkpoint(src, dst, quant_type="nf4", double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu").save_pretrained(dst)
    return load_file(dst / "model.safetensors")


def _linear_prefixes(state):
    return sorted(k[: -len(".quant_state.bitsandbytes__nf4")] for k in state if k.endswith("bitsandbytes__nf4"))


@pytest.mark.parametrize("double_quant", [True, False])
def test_transformers_checkpoint_round_trips_bit_exact(tmp_path, double_quant):
    src, original = _tiny_llama_dir(tmp_path)
    state = _quantized_checkpoint(src, tmp_path / "nf4", double_quant=double_quant)
    prefixes = _linear_prefixes(state)
    assert len(prefixes) == 2 * 7  # q k v o gate up down per layer
    for prefix in prefixes:
        entries = {k: v for k, v in state.items() if k == prefix or k.startswith(prefix + ".")}
        q = NF4Weight.from_bnb(entries, prefix=prefix)
        assert q.nested == double_quant
        exported = q.to_bnb(prefix=prefix)
        assert exported.keys() == entries.keys(), prefix
        for key in entries:
            assert torch.equal(exported[key], entries[key]), key
        # our quantizer gives the very same checkpoint from the original weight
        ours = quantize_nf4(original[prefix], double_quant=double_quant).to_bnb(prefix=prefix)
        for key in entries:
            assert torch.equal(ours[key], entries[key]), key


def test_transformers_fp4_checkpoint_gets_a_clear_error(tmp_path):
    src, _ = _tiny_llama_dir(tmp_path)
    state = _quantized_checkpoint(src, tmp_path / "fp4", quant_type="fp4")
    prefix = "model.layers.0.self_attn.q_proj.weight"
    entries = {k: v for k, v in state.items() if k == prefix or k.startswith(prefix + ".")}
    with pytest.raises(NF4FormatError, match="quant type 'fp4' is not supported"):
        NF4Weight.from_bnb(entries, prefix=prefix)


def test_codes_are_kept_aligned_for_word_loads():
    q = quantize_nf4(torch.randn(64, 128))
    buffer = torch.zeros(q.codes.numel() + 1, dtype=torch.uint8)
    buffer[1:] = q.codes
    state = q.to_bnb()
    state["weight"] = buffer[1:].view(-1, 1)  # a view one byte into a larger buffer
    loaded = NF4Weight.from_bnb(state)
    assert loaded.codes.data_ptr() % 16 == 0
    assert torch.equal(loaded.codes, q.codes)
