"""Checkpoints: Hugging Face models read layer by layer into NF4, NF4 checkpoints written back."""

import gc
import json
import shutil
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file

import loraplex.model.checkpoint as ckpt
from loraplex.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from loraplex.model.checkpoint import (
    LINEAR_NAMES,
    CheckpointError,
    CheckpointReader,
    write_nf4_checkpoint,
)

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128}


# --- tiny checkpoints, built once per module -------------------------------------------------


def _model(kind, **overrides):
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **overrides}))
    with torch.no_grad():  # norms at 1.0 and zero biases would hide mix-ups: randomize them too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _saved_tensors(path):
    files = sorted(path.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Unquantized checkpoints by name, each {"dir": Path, "state": the saved tensors}."""
    root = tmp_path_factory.mktemp("ckpt")
    specs = {
        "llama-bf16": ("llama", torch.bfloat16, {}, {}),
        "llama-fp32": ("llama", torch.float32, {}, {}),
        "llama-sharded": ("llama", torch.bfloat16, {}, {"max_shard_size": "50KB"}),
        "llama-tied": ("llama", torch.bfloat16, {"tie_word_embeddings": True}, {}),
        "qwen2-bias": ("qwen2", torch.bfloat16, {}, {}),
        "mistral-fp16": ("mistral", torch.float16, {}, {}),
    }
    out = {}
    for name, (kind, dtype, overrides, save_kwargs) in specs.items():
        path = root / name
        _model(kind, **overrides).to(dtype).save_pretrained(path, **save_kwargs)
        out[name] = {"dir": path, "state": _saved_tensors(path), "dtype": dtype}
    return out


def _bnb_checkpoint(src, dst, quant_type="nf4", double_quant=True, skip=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu").save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def bnb_checkpoints(checkpoints, tmp_path_factory):
    """transformers + bitsandbytes NF4 checkpoints of llama-bf16: double quant and not."""
    root = tmp_path_factory.mktemp("bnb")
    src = checkpoints["llama-bf16"]["dir"]
    return {dq: _bnb_checkpoint(src, root / f"nf4-dq{int(dq)}", double_quant=dq) for dq in (True, False)}


def _entries(state, prefix):
    return {k: v for k, v in state.items() if k == prefix or k.startswith(prefix + ".")}


def _assert_same_nf4(ours, expected_entries, prefix):
    exported = ours.to_bnb(prefix=prefix)
    assert exported.keys() == expected_entries.keys(), prefix
    for key, expected in expected_entries.items():
        assert torch.equal(exported[key].cpu(), expected), key


def _quantize_calls_forbidden(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("quantize_nf4 called on an NF4 checkpoint")

    monkeypatch.setattr(ckpt, "quantize_nf4", refuse)


# --- unquantized checkpoints --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["llama-bf16", "llama-fp32", "llama-sharded", "llama-tied", "qwen2-bias", "mistral-fp16"]
)
def test_unquantized_checkpoint_is_quantized_bit_exactly(checkpoints, name):
    ckpt_info = checkpoints[name]
    state, path = ckpt_info["state"], ckpt_info["dir"]
    if name == "llama-sharded":
        assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    reader = CheckpointReader(path, dtype=torch.float32, progress=False)
    assert not reader.prequantized
    assert reader.config.architectures[0] == type(reader.config).__name__.replace("Config", "ForCausalLM")
    assert reader.source_dtype == ckpt_info["dtype"]

    layers = list(reader.layers())
    assert [layer.index for layer in layers] == [0, 1]
    seen = set()
    for layer in layers:
        prefix = f"model.layers.{layer.index}."
        assert tuple(layer.linears) == LINEAR_NAMES
        for linear, q in layer.linears.items():
            key = f"{prefix}{linear}.weight"
            assert q.dtype == state[key].dtype and q.nested and q.blocksize == 64
            _assert_same_nf4(q, quantize_nf4(state[key]).to_bnb(prefix=key), key)
            seen.add(key)
        expected_rest = {k[len(prefix):] for k in state if k.startswith(prefix)} - {
            f"{linear}.weight" for linear in LINEAR_NAMES
        }
        assert set(layer.tensors) == expected_rest
        for key, t in layer.tensors.items():
            assert t.dtype == torch.float32
            assert torch.equal(t, state[prefix + key].float()), key
            seen.add(prefix + key)

    glob = reader.global_tensors()
    tied = name == "llama-tied"
    expected_globals = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    assert set(glob) == expected_globals
    for key, t in glob.items():
        assert torch.equal(t, state[key].float()), key
    assert seen | set(glob) == set(state)  # every saved tensor came through exactly once
    if name == "qwen2-bias":
        for linear in ("q_proj", "k_proj", "v_proj"):
            assert f"self_attn.{linear}.bias" in layers[0].tensors


def test_activation_dtype_and_progress_label(checkpoints, capsys):
    reader = CheckpointReader(checkpoints["llama-fp32"]["dir"])  # default: bf16 activations
    layer = next(iter(reader.layers()))
    capsys.readouterr()
    assert layer.tensors["input_layernorm.weight"].dtype == torch.bfloat16
    assert reader.global_tensors()["lm_head.weight"].dtype == torch.bfloat16
    assert layer.linears["mlp.up_proj"].dtype == torch.float32  # quantized from the stored weight
    list(reader.layers())
    assert "quantizing" in capsys.readouterr().err


def test_layers_are_read_one_at_a_time(checkpoints, monkeypatch):
    fetched = []
    original_get = ckpt._SafetensorsFiles.get

    def recording_get(self, key):
        fetched.append(key)
        return original_get(self, key)

    monkeypatch.setattr(ckpt._SafetensorsFiles, "get", recording_get)
    reader = CheckpointReader(checkpoints["llama-sharded"]["dir"], progress=False)
    assert fetched == []  # opening reads headers only
    layers = reader.layers()
    next(layers)
    assert fetched and all(k.startswith("model.layers.0.") for k in fetched)
    assert len(fetched) == len(set(fetched))  # each tensor read once
    fetched.clear()
    next(layers)
    assert fetched and all(k.startswith("model.layers.1.") for k in fetched)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("name", ["llama-bf16", "bnb-nf4"])
def test_results_do_not_keep_the_files_mapped(checkpoints, bnb_checkpoints, name, tmp_path):
    # safetensors returns views of a memory map: a kept view would keep the whole file mapped
    # (and every page read so far resident), so everything handed out must be a copy.
    path = tmp_path / "ckpt"  # a copy nobody else has open (the fixtures hold load_file views)
    shutil.copytree(bnb_checkpoints[True] if name == "bnb-nf4" else checkpoints[name]["dir"], path)
    reader = CheckpointReader(path, dtype=torch.bfloat16, progress=False)  # bf16 source: no conversion
    kept = (list(reader.layers()), reader.global_tensors())
    reader.close()
    gc.collect()
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert len(kept[0]) == 2


# --- bitsandbytes NF4 checkpoints ----------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_checkpoint_loads_bit_exactly_without_requantizing(checkpoints, bnb_checkpoints, double_quant,
                                                               monkeypatch, capsys):
    _quantize_calls_forbidden(monkeypatch)
    path = bnb_checkpoints[double_quant]
    state = load_file(path / "model.safetensors")
    original = checkpoints["llama-bf16"]["state"]
    reader = CheckpointReader(path)
    assert reader.prequantized
    for layer in reader.layers():
        prefix = f"model.layers.{layer.index}."
        for linear, q in layer.linears.items():
            key = f"{prefix}{linear}.weight"
            assert q.nested == double_quant and q.shape == tuple(original[key].shape)
            _assert_same_nf4(q, _entries(state, key), key)
        assert set(layer.tensors) == {"input_layernorm.weight", "post_attention_layernorm.weight"}
        for key, t in layer.tensors.items():
            assert torch.equal(t, original[prefix + key]), key
    assert "loading" in capsys.readouterr().err
    for key, t in reader.global_tensors().items():
        assert torch.equal(t, original[key]), key


def test_bnb_checkpoint_with_unquantized_linears(checkpoints, tmp_path, monkeypatch):
    path = _bnb_checkpoint(checkpoints["llama-bf16"]["dir"], tmp_path / "partial", skip=["down_proj", "lm_head"])
    state = load_file(path / "model.safetensors")
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16  # left dense by transformers
    calls = []
    monkeypatch.setattr(ckpt, "quantize_nf4", lambda w, **kw: calls.append(w) or quantize_nf4(w, **kw))
    reader = CheckpointReader(path, progress=False)
    assert reader.prequantized
    for layer in reader.layers():
        key = f"model.layers.{layer.index}.mlp.down_proj.weight"
        _assert_same_nf4(layer.linears["mlp.down_proj"], quantize_nf4(state[key]).to_bnb(prefix=key), key)
        up = f"model.layers.{layer.index}.mlp.up_proj.weight"
        _assert_same_nf4(layer.linears["mlp.up_proj"], _entries(state, up), up)
    assert len(calls) == 2  # the down_proj of each layer, nothing else


def test_fp4_checkpoint_is_refused(checkpoints, tmp_path):
    path = _bnb_checkpoint(checkpoints["llama-bf16"]["dir"], tmp_path / "fp4", quant_type="fp4")
    with pytest.raises(CheckpointError, match="'fp4'"):
        CheckpointReader(path, progress=False)
    # without the config's word for it, the tensors' own quant state still gives it away
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4"
    (path / "config.json").write_text(json.dumps(config))
    reader = CheckpointReader(path, progress=False)
    with pytest.raises(CheckpointError, match="'fp4' is not supported"):
        next(reader.layers())


def test_8bit_checkpoint_is_refused(checkpoints, tmp_path):
    path = tmp_path / "int8"
    shutil.copytree(checkpoints["llama-bf16"]["dir"], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="8-bit"):
        CheckpointReader(path, progress=False)


# --- writing NF4 checkpoints ---------------------------------------------------------------


def _load_bnb(path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On AVX512-BF16 CPUs bitsandbytes repacks the weight at the first eval forward and
            # computes in bf16 whatever the compute dtype; keep its plain path (dequantize +
            # matmul in the compute dtype) so that fp32 logits can be compared closely.
            module.support_avx512bf16_for_cpu = False
    return model


def _tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def _reference_logits(src, reader_layers):
    """A dense transformers model whose linears hold our dequantized weights (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for layer in reader_layers:
        block = model.model.layers[layer.index]
        for name, q in layer.linears.items():
            block.get_submodule(name).weight.data = dequantize_nf4(q, torch.float32)
    with torch.no_grad():
        return model(_tokens()).logits


def _assert_loaded_weights_match(model, layers):
    import bitsandbytes as bnb

    count = 0
    for layer in layers:
        block = model.model.layers[layer.index]
        for name, q in layer.linears.items():
            module = block.get_submodule(name)
            assert isinstance(module, bnb.nn.Linear4bit), name
            loaded = bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state, quant_type="nf4")
            assert torch.equal(loaded, dequantize_nf4(q)), f"{layer.index}.{name}"
            count += 1
    assert count == len(layers) * len(LINEAR_NAMES)


def test_write_round_trip_loads_in_transformers(checkpoints, tmp_path):
    src = checkpoints["llama-fp32"]["dir"]
    dst = write_nf4_checkpoint(src, tmp_path / "nf4", progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    ours = list(CheckpointReader(src, progress=False).layers())

    model = _load_bnb(dst)
    _assert_loaded_weights_match(model, ours)
    assert model.model.norm.weight.dtype == torch.float32  # fp32 source stays fp32
    with torch.no_grad():
        logits = model(_tokens()).logits
    torch.testing.assert_close(logits, _reference_logits(src, ours), rtol=1e-5, atol=1e-5)

    # read back: the same NF4 weights, bit for bit, now as a pre-quantized checkpoint
    saved = load_file(dst / "model.safetensors")
    back = CheckpointReader(dst, dtype=torch.float32, progress=False)
    assert back.prequantized and back.source_dtype == torch.float32
    for layer, original in zip(back.layers(), ours, strict=True):
        for name, q in layer.linears.items():
            key = f"model.layers.{layer.index}.{name}.weight"
            _assert_same_nf4(q, original.linears[name].to_bnb(prefix=key), key)
            _assert_same_nf4(q, _entries(saved, key), key)
        for key, t in layer.tensors.items():
            assert torch.equal(t, checkpoints["llama-fp32"]["state"][f"model.layers.{layer.index}.{key}"])


def test_written_config_is_what_transformers_writes(checkpoints, bnb_checkpoints, tmp_path):
    src = checkpoints["llama-bf16"]["dir"]
    dst = write_nf4_checkpoint(src, tmp_path / "nf4", progress=False)
    ours = json.loads((dst / "config.json").read_text())
    theirs = json.loads((bnb_checkpoints[True] / "config.json").read_text())
    assert ours["quantization_config"] == theirs["quantization_config"]
    assert ours == theirs
    assert load_file(dst / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    layers = list(CheckpointReader(src, progress=False).layers())
    _assert_loaded_weights_match(_load_bnb(dst), layers)
    # our bytes are the ones transformers + bitsandbytes write for the same model
    assert _saved_tensors(dst).keys() == _saved_tensors(bnb_checkpoints[True]).keys()
    for key, t in _saved_tensors(bnb_checkpoints[True]).items():
        assert torch.equal(_saved_tensors(dst)[key], t), key


def test_write_sharded_checkpoint(checkpoints, tmp_path):
    src = checkpoints["llama-sharded"]["dir"]
    single = write_nf4_checkpoint(src, tmp_path / "single", progress=False)
    sharded = write_nf4_checkpoint(src, tmp_path / "sharded", progress=False, max_shard_bytes=20_000)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    state = _saved_tensors(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for key, t in load_file(single / "model.safetensors").items():
        assert torch.equal(state[key], t), key
    for shard in shards:  # a linear's codes and statistics share one shard
        keys = load_file(shard).keys()
        for key in keys:
            if key.endswith(".quant_state.bitsandbytes__nf4"):
                assert key.rsplit(".quant_state", 1)[0] in keys
    with torch.no_grad():
        a, b = _load_bnb(single)(_tokens()).logits, _load_bnb(sharded)(_tokens()).logits
    assert torch.equal(a, b)
    # the sharded NF4 checkpoint reads back like the single file
    for la, lb in zip(CheckpointReader(single, progress=False).layers(),
                      CheckpointReader(sharded, progress=False).layers(), strict=True):
        for name in LINEAR_NAMES:
            _assert_same_nf4(la.linears[name], lb.linears[name].to_bnb(name), name)


def test_write_from_nf4_source_copies_without_requantizing(bnb_checkpoints, tmp_path, monkeypatch):
    _quantize_calls_forbidden(monkeypatch)
    src = bnb_checkpoints[False]
    dst = write_nf4_checkpoint(src, tmp_path / "copy", progress=False)
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"] is False
    source, copied = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    assert source.keys() == copied.keys()
    for key, t in source.items():
        assert torch.equal(copied[key], t), key
    _load_bnb(dst)


def test_write_copies_tokenizer_and_tied_embeddings(checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoints["llama-tied"]["dir"], src)
    extras = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}",
              "special_tokens_map.json": "{}"}
    for name, text in extras.items():
        (src / name).write_text(text)
    (tmp_path / "empty").mkdir()
    dst = write_nf4_checkpoint(src, tmp_path / "empty", progress=False)  # an existing empty dir is fine
    for name, text in extras.items():
        assert (dst / name).read_text() == text
    assert "lm_head.weight" not in load_file(dst / "model.safetensors")
    model = _load_bnb(dst)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in CheckpointReader(dst, progress=False).global_tensors()


@pytest.mark.gpu
def test_quantizes_on_the_given_device(checkpoints, bnb_checkpoints, tmp_path):
    src = checkpoints["llama-bf16"]["dir"]
    cpu_layers = list(CheckpointReader(src, progress=False).layers())
    reader = CheckpointReader(src, device="cuda", progress=False)
    assert all(t.is_cuda for t in reader.global_tensors().values())
    for layer, expected in zip(reader.layers(), cpu_layers, strict=True):
        for name, q in layer.linears.items():
            assert q.codes.is_cuda and torch.equal(q.codes.cpu(), expected.linears[name].codes)
            torch.testing.assert_close(dequantize_nf4(q).cpu(), dequantize_nf4(expected.linears[name]))
        for key, t in layer.tensors.items():
            assert t.is_cuda and torch.equal(t.cpu(), expected.tensors[key])
    for layer in CheckpointReader(bnb_checkpoints[True], device="cuda", progress=False).layers():
        assert all(q.codes.is_cuda and q.absmax.is_cuda for q in layer.linears.values())
    dst = write_nf4_checkpoint(src, tmp_path / "nf4", progress=False, device="cuda")
    _assert_loaded_weights_match(_load_bnb(dst), list(CheckpointReader(dst, progress=False).layers()))


# --- errors --------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        CheckpointReader(tmp_path / "gpt2")


def test_bin_only_checkpoint(checkpoints, tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(checkpoints["llama-bf16"]["dir"] / "config.json", path)
    torch.save(checkpoints["llama-bf16"]["state"], path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*convert the checkpoint to safetensors"):
        CheckpointReader(path)


def test_missing_files_and_tensors(checkpoints, tmp_path):
    path = tmp_path / "broken"
    shutil.copytree(checkpoints["llama-bf16"]["dir"], path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        CheckpointReader(path)

    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        CheckpointReader(path)

    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoints["llama-sharded"]["dir"], sharded)
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing weight file {victim.name}"):
        CheckpointReader(sharded)


def test_destination_must_be_new_or_empty(checkpoints, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        write_nf4_checkpoint(checkpoints["llama-bf16"]["dir"], dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_failed_write_leaves_nothing_behind(checkpoints, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(NF4Weight, "to_bnb", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_nf4_checkpoint(checkpoints["llama-bf16"]["dir"], tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()
