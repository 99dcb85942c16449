"""Train the bundled demo (loraplex/demo/): a tiny Llama that copies text, and LoRA adapters
that upper-case, reverse and rot13 it. CPU only, a fixed seed, about 10-15 minutes on 2 cores.

    python scripts/make_demo.py                  # writes loraplex/demo/{model,adapters}
    python scripts/make_demo.py --out /tmp/demo  # somewhere else

1. A character-level tokenizer (every printable ASCII character, newline, <s> </s> <pad> <unk>)
   in Hugging Face format, with a chat template that wraps the user's message in the prompt
   format of `loraplex/demo/tasks.py`.
2. The base model (LlamaForCausalLM, 4 layers, hidden 128) trained from scratch on the copy
   task, loss on the answer only (half the texts with random capitals: the adapters' outputs
   need trained embeddings and output rows for every letter, which LoRA cannot train).
3. Its linears quantized to NF4 (loraplex's quantizer, bitsandbytes format); the other weights
   (embeddings, norms, lm_head) tuned a little more on the copy task with the NF4 linears
   frozen, so the quantized model copies as well as the fp32 one did. Saved as an NF4
   checkpoint: what `loraplex serve` loads, and what the adapters are trained against.
4. One LoRA adapter per transformation, trained QLoRA-style with peft: the base frozen at its
   NF4 values (dequantized), only A and B learn. Saved as ordinary PEFT directories.
5. Accuracy through loraplex itself (NF4 base + adapter, greedy) on held-out texts, printed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraplex.demo import tasks  # noqa: E402

SEED = 20261125
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Text: {{ m['content'] }}\nOutput: "
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
)
MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_theta=10000.0)
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)


def build_tokenizer(path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=MODEL["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def training_text(rng: random.Random, task: str) -> str:
    """The demo's texts; for the base model, half of them with random capitals, so that every
    letter's embedding and output row is trained (an adapter cannot train those)."""
    text = tasks.random_text(rng)
    if task == "copy" and rng.random() < 0.5:
        text = "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    return text


def batch(tok, rng: random.Random, task: str, size: int):
    """Token ids [B, L], attention mask and labels (-100 outside the answer and its EOS)."""
    rows, labels = [], []
    for _ in range(size):
        text = training_text(rng, task)
        prompt = tok.encode(tasks.prompt(text))
        answer = tok.encode(tasks.TASKS[task](text), add_special_tokens=False) + [tok.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.full((size, width), tok.pad_token_id)
    lab = torch.full((size, width), -100)
    mask = torch.zeros(size, width, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(l)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(l), 1
    return ids, mask, lab


def train(model, params, tok, task: str, steps: int, lr: float, seed: int, size: int = 64, label: str = "") -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    started = time.monotonic()
    for step in range(steps):
        ids, mask, lab = batch(tok, rng, task, size)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  {label:>8} step {step:5d}/{steps}  loss {loss.item():.4f}  {time.monotonic() - started:6.1f}s",
                  flush=True)
    model.eval()


def nf4_linears(model):
    """Quantize every decoder linear to NF4 and put its dequantized value back (frozen)."""
    from loraplex.kernels.nf4 import dequantize_nf4, quantize_nf4

    originals = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            originals[name] = module.weight.data.clone()
            module.weight.data = dequantize_nf4(quantize_nf4(module.weight.data), torch.float32)
            module.weight.requires_grad_(False)
    return originals


def accuracy(model_dir: Path, adapters: dict[str, Path], n: int) -> dict[str, float]:
    """Exact-match rate of greedy decoding through loraplex (NF4 base + each adapter)."""
    from loraplex.adapters.peft_format import read_peft_adapter
    from loraplex.engine.adapters import StaticAdapters
    from loraplex.engine.engine import Engine, EngineConfig
    from loraplex.engine.request import Request
    from loraplex.engine.sampling import SamplingParams
    from loraplex.kernels import runtime
    from loraplex.model.loader import load_model

    texts = tasks.held_out(n)
    with runtime.reference_kernels():
        loaded = load_model(model_dir, dtype=torch.float32, device="cpu", progress=False)
        static = StaticAdapters(loaded.model, {k: read_peft_adapter(p) for k, p in adapters.items()}, max_rank=16)
        engine = Engine(loaded.model, loaded.tokenizer, static, EngineConfig(kv_cache_tokens=64 * 256, max_num_seqs=256))
        results = {}
        for task in ["copy", *adapters]:
            outs: dict[int, list] = {}
            for i, text in enumerate(texts):
                ids = loaded.tokenizer.encode(tasks.prompt(text))
                engine.add_request(Request(f"{task}-{i}", ids, SamplingParams(max_tokens=24, temperature=0),
                                           None if task == "copy" else task,
                                           on_output=outs.setdefault(i, []).append))
            engine.run_until_done()
            got = ["".join(o.text for o in outs[i]) for i in range(len(texts))]
            results[task] = sum(g == tasks.TASKS[task](t) for g, t in zip(got, texts)) / len(texts)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "loraplex" / "demo"), help="where model/ and adapters/ go")
    p.add_argument("--base-steps", type=int, default=1500)
    p.add_argument("--heal-steps", type=int, default=200)
    p.add_argument("--adapter-steps", type=int, default=1000)
    p.add_argument("--eval", type=int, default=200, help="held-out texts per task for the accuracy table")
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed, for reproducibility)")
    args = p.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from loraplex.model.checkpoint import write_nf4_checkpoint

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    out = Path(args.out)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer(tmp / "fp32")
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **MODEL)
        model = LlamaForCausalLM(config)
        print(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tok)}")
        train(model, list(model.parameters()), tok, "copy", args.base_steps, 3e-3, SEED, label="base")

        # NF4 linears, frozen; the rest tuned to the quantized linears
        originals = nf4_linears(model)
        rest = [p for p in model.parameters() if p.requires_grad]
        train(model, rest, tok, "copy", args.heal_steps, 1e-3, SEED + 1, label="heal")
        for name, weight in originals.items():  # save the fp32 linears: quantizing them gives the same NF4
            model.get_submodule(name).weight.data = weight
        model.save_pretrained(tmp / "fp32")
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(tmp / "fp32")
        model_dir = out / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        write_nf4_checkpoint(tmp / "fp32", model_dir, device="cpu")
        for f in (tmp / "fp32").glob("*token*"):
            shutil.copy(f, model_dir / f.name)

        # adapters on the frozen NF4 base
        nf4_linears(model)
        adapters = {}
        for i, task in enumerate(tasks.ADAPTERS):
            torch.manual_seed(SEED + 10 + i)
            peft_model = get_peft_model(model, LoraConfig(**LORA), adapter_name=task)
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            train(peft_model, trainable, tok, task, args.adapter_steps, 3e-3, SEED + 20 + i, label=task)
            path = out / "adapters" / task
            if path.exists():
                shutil.rmtree(path)
            peft_model.save_pretrained(tmp / "peft")
            shutil.copytree(tmp / "peft" / task, path)
            model = peft_model.unload()  # the base again, without this adapter's layers
            adapters[task] = path
            shutil.rmtree(tmp / "peft")
    print(f"trained in {time.monotonic() - started:.0f}s; measuring through loraplex ...")
    if args.eval < 1:
        return 0
    acc = accuracy(out / "model", adapters, args.eval)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    print("\n| task | exact match |\n|---|---|")
    for task, a in acc.items():
        print(f"| {task} | {a:.1%} |")
    print(f"\nbundle: {size / 2**20:.2f} MiB in {out}; total {time.monotonic() - started:.0f}s")
    (out / "accuracy.json").write_text(json.dumps({k: round(v, 4) for k, v in acc.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
