"""Tiny random models, tokenizers and PEFT adapters built in temporary directories (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "Text: loraplex serves many adapters\nOutput: loraplex serves many adapters",
    "def add(a, b):\n    return a + b\n",
    "SELECT name FROM users WHERE id = 42;",
    "0123456789 !?.,;:-_()[]{}<>/\\'\"",
]


def make_tokenizer(path: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer with <s>/</s> and a chat template, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)
    return fast


ARCHS = {
    # name: (transformers config class, extra config fields)
    "llama": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama-gqa-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),            # q/k/v bias
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
}


def make_model(path: Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
               hidden: int = 64, layers: int = 2, **overrides):
    """Save a random transformers model (and a tokenizer) to `path`; returns the HF model."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    cls_name, extra = ARCHS[arch]
    fields = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, vocab_size=len(tok), max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  initializer_range=0.1, **extra)
    fields.update(overrides)
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if arch == "qwen2":  # HF zero-initialises biases: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


ADAPTERS = {
    # name: LoraConfig fields; every adapter gets non-zero random B
    "all": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "pattern": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                    rank_pattern={"k_proj": 4, "down_proj": 2}, alpha_pattern={"v_proj": 64}, use_rslora=True),
}


def make_adapter(base_dir: Path, path: Path, name: str, seed: int = 1) -> Path:
    """A PEFT LoRA adapter for the model in `base_dir`, saved to `path`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**ADAPTERS[name]))
    gen = torch.Generator().manual_seed(seed)
    for pname, p in peft_model.named_parameters():
        if "lora_" in pname:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(path)
    return path


def random_adapter(model, seed: int, rank: int = 4):
    """A random LoRA adapter (scaling 0.5) on every linear of a loaded loraplex model."""
    from loraplex.adapters.peft_format import LoRAAdapter, ModuleLoRA

    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, linear in model.linears().items():
        layer = path.split(".")[1]
        for name, w in zip(linear.names, linear.parts):
            out_f, in_f = w.shape
            a, b = torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)
            modules[f"layers.{layer}.{name}"] = ModuleLoRA(a, b, 0.5)
    return LoRAAdapter(modules)


def hf_on_nf4(base_dir: Path, model, adapter_dir: Path | None = None):
    """transformers' model of `base_dir` (+ PEFT's adapter) on our NF4 weights, dequantized to
    fp32: the reference for `model` (a loaded loraplex model) and its adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.kernels.nf4 import dequantize_nf4

    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    for path, linear in model.linears().items():
        layer = hf.model.layers[int(path.split(".")[1])]
        for part, name in zip(linear.parts, linear.names):
            layer.get_submodule(name).weight.data = dequantize_nf4(part, torch.float32)
    if adapter_dir is not None:
        hf = PeftModel.from_pretrained(hf, adapter_dir).eval()
    return hf
