"""End-to-end benchmark: loraplex's engine serving many LoRA adapters on a Llama-2-7B-shaped
NF4 model, against transformers + PEFT + bitsandbytes, in one run.

Workload: Llama-2-7B's shapes with random weights (built from a LlamaConfig, no download:
each layer is drawn on the device in bf16 and quantized to NF4 there, one layer at a time),
64 concurrent streams of 128-token random prompts, 128 generated tokens each (greedy,
ignore_eos), each stream on a random rank-16 adapter (scaling 2) on all seven linears (`--targets qv`:
q and v only, PEFT's default for Llama).

1. throughput   every stream submitted at once, `engine.step()` until done: generated tokens
                over the wall time from submission to the last token, with 1, 8, 64 and 256
                distinct adapters (stream -> adapter shuffled round robin, or Zipf(1) with a fixed
                seed; with 64 streams at most 64 adapters are present, the rest only fill
                slots) and once on the base model
2. TTFT         submission to each stream's first output, p50 / p99 (prompts are prefilled
                in chunks of the engine's default 2048 tokens per step)
3. decode step  median of the steps that decode every stream and prefill nothing, beside the
                byte floor of one such step at the mid-point of generation: NF4 linears
                (resident bytes) + lm_head (bf16, read whole) + embedding rows and norms +
                present adapters' A and B + KV cache read, over the copy bandwidth of a
                1 GiB clone measured in the same run (helper of bench/nf4_matmul.py)
4. batch 1      one stream on an adapter (all loaded): median decode step, ms per token
5. baseline     transformers LlamaForCausalLM holding the very same NF4 tensors in
                bitsandbytes Linear4bit layers, PEFT with one rank-16 bf16 LoRA per stream
                loaded, `generate(input_ids, adapter_names=[...])` on the same prompts with
                --baseline-tokens new tokens (it is slow): base model, 1, 8 and 64 distinct
                adapters; batch 1: (time of n tokens - time of 1 token) / (n - 1)

Targets on an H100 (PASS/FAIL): 64 streams over 64 distinct adapters >= 3000 tok/s and >= 0.85x
our 1-adapter throughput; decode step at batch 64 <= 2x its byte floor; batch-1 decode <= 2.0
ms/token. Baseline measured earlier on an H100 (64 streams, 128 + 32 tokens): 262 tok/s with
one adapter, 105 with 8, 15.9 with 64, 520 base only; batch 1 242 ms/token, 64 adapters loaded.

Run:
    python bench/e2e.py                                  # on a CUDA GPU (full run)
    python bench/e2e.py --skip-baseline --adapters 1,64  # ours only, quicker
    python bench/e2e.py --smoke                          # anywhere (CPU): harness check only
`--smoke`: tiny model (hidden 128, 2 layers, vocab 512), 4 streams, 16 + 8 tokens, adapters
1,4,8, baseline 4 tokens; on CPU ours runs the PyTorch reference kernels (the Triton
interpreter would take minutes for whole engine runs). Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from loraplex.adapters.peft_format import ModuleLoRA  # noqa: E402
from loraplex.engine.adapters import StaticAdapters  # noqa: E402
from loraplex.engine.engine import Engine, EngineConfig  # noqa: E402
from loraplex.engine.kv_cache import kv_bytes_per_token  # noqa: E402
from loraplex.engine.request import Request  # noqa: E402
from loraplex.engine.sampling import SamplingParams  # noqa: E402
from loraplex.kernels import runtime  # noqa: E402
from loraplex.kernels.nf4 import quantize_nf4  # noqa: E402
from loraplex.kernels.nf4_matmul import tune  # noqa: E402
from loraplex.model.checkpoint import LAYER_NORM_NAMES, LINEAR_NAMES, LayerWeights  # noqa: E402
from loraplex.model.config import ModelConfig  # noqa: E402
from loraplex.model.llama import build_model  # noqa: E402

from bench import lora as lora_bench  # noqa: E402
from bench.nf4_matmul import (Target, bench_device, copy_bandwidth, environment, fmt, load_bnb,  # noqa: E402
                              loop_timer, make_bnb_linear, markdown, wall_timer)

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "e2e.json"
MODELS = {  # LlamaConfig fields
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
}
FULL = dict(model="llama2-7b", streams=64, prompt_len=128, gen_len=128, adapters="1,8,64,256",
            baseline_tokens=32)
SMOKE = dict(model="tiny", streams=4, prompt_len=16, gen_len=8, adapters="1,4,8", baseline_tokens=4)
DTYPE = torch.bfloat16
RANK, ALPHA = 16, 32.0   # scaling alpha / r = 2
SEED = 0
RESERVE_BYTES = 4 << 30  # kept free beside weights, adapter slots and KV cache: activations, graphs
TUNE_MS = (1, 16, 32, 64, 256, 2048)  # --tune: decode batches, prefill-tail and full prefill steps


# ----------------------------------------------------------------------------------------
# The synthetic model, tokenizer and adapters (no download)
# ----------------------------------------------------------------------------------------


def hf_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[name], architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


class SyntheticReader:
    """What `build_model` reads: random weights (randn * 0.02, bf16) drawn on the device, each
    layer quantized to NF4 there as it is yielded. Seeded per layer: same seed and device,
    same weights (the baseline gets exactly ours)."""

    def __init__(self, config, device: torch.device, seed: int = SEED):
        self.config, self.device, self.seed = config, device, seed
        self.shapes = ModelConfig.from_hf(config).linear_shapes

    def _randn(self, gen: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=self.device, dtype=DTYPE) * 0.02

    def _ones(self) -> torch.Tensor:
        return torch.ones(self.config.hidden_size, device=self.device, dtype=DTYPE)

    def global_tensors(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator(self.device).manual_seed(self.seed)
        v, h = self.config.vocab_size, self.config.hidden_size
        return {"model.embed_tokens.weight": self._randn(gen, v, h), "lm_head.weight": self._randn(gen, v, h),
                "model.norm.weight": self._ones()}

    def layers(self):
        for i in range(self.config.num_hidden_layers):
            gen = torch.Generator(self.device).manual_seed(self.seed + 1 + i)
            linears = {name: quantize_nf4(self._randn(gen, *self.shapes[name])) for name in LINEAR_NAMES}
            yield LayerWeights(i, linears, {name: self._ones() for name in LAYER_NORM_NAMES})


def synthetic_tokenizer(vocab_size: int):
    """WordLevel over "<unk>", "<s>", "</s>", "t3" .. "t{V-1}" (whitespace split): every id
    decodes, as the engine's streaming detokenizer needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TARGETS = {  # --targets: which linears the random adapters (ours and the baseline's) adapt
    "all": LINEAR_NAMES,
    "qv": ("self_attn.q_proj", "self_attn.v_proj"),  # PEFT's default for Llama models
}


def random_lora(num_layers: int, shapes: dict[str, tuple[int, int]], names, rank: int, scaling: float, seed: int,
                device: torch.device) -> dict[str, ModuleLoRA]:
    """Seeded random bf16 LoRA modules on linears `names` (shapes: name -> (out, in)) of every
    layer, drawn on the device; small B so the deltas stay small beside the base."""
    gen = torch.Generator(device).manual_seed(seed)
    out = {}
    for i in range(num_layers):
        for name in names:
            n, k = shapes[name]
            a = torch.randn(rank, k, generator=gen, device=device, dtype=DTYPE) / math.sqrt(k)
            b = torch.randn(n, rank, generator=gen, device=device, dtype=DTYPE) * 0.01
            out[f"layers.{i}.{name}"] = ModuleLoRA(a, b, scaling)
    return out


class RandomAdapter:
    """Rank-16 LoRA on the chosen linears of every layer. `.modules` is drawn on the device when
    read (StaticAdapters reads it once, into the adapter's slot), so only one adapter's A and B
    exist outside the slots at any time."""

    def __init__(self, config, index: int, device: torch.device, targets: tuple[str, ...] = LINEAR_NAMES):
        self.config, self.index, self.device, self.targets = config, index, device, targets

    @property
    def modules(self) -> dict[str, ModuleLoRA]:
        shapes = ModelConfig.from_hf(self.config).linear_shapes
        return random_lora(self.config.num_hidden_layers, shapes, [n for n in shapes if n in self.targets], RANK,
                           ALPHA / RANK, 10_000 + self.index, self.device)


def adapter_bytes(mc: ModelConfig, targets: tuple[str, ...] = LINEAR_NAMES) -> int:
    """A and B of one rank-16 adapter on `targets` in bf16 (what one step reads of it; a slot
    reserves room for all linears)."""
    return mc.num_layers * RANK * sum(n + k for name, (n, k) in mc.linear_shapes.items() if name in targets) * 2


def plan_slots(want: int, model, mc: ModelConfig, kv_tokens: int, device: torch.device) -> tuple[int, str]:
    """Adapter slots that fit (CUDA: free memory now, less the KV cache and RESERVE_BYTES), and
    a line saying what was planned and, if fewer than `want`, why."""
    per, kv = adapter_bytes(mc), kv_tokens * kv_bytes_per_token(mc, DTYPE)
    line = (f"memory: weights {model.resident_bytes() / 1e9:.2f} GB | {want} adapter slots x "
            f"{per / 1e6:.1f} MB = {want * per / 1e9:.2f} GB | KV cache {kv_tokens} tokens = "
            f"{kv / 1e9:.2f} GB")
    if device.type != "cuda":
        return want, line
    free = torch.cuda.mem_get_info(device)[0]
    fits = int((free - kv - RESERVE_BYTES) // per)
    line += f" | free {free / 1e9:.1f} GB, {RESERVE_BYTES / 1e9:.1f} GB kept for activations"
    if fits >= want:
        return want, line
    if fits < 1:
        raise SystemExit(line + ": not even one adapter slot fits; lower --kv-cache-tokens")
    return fits, line + f" -> only {fits} slots fit: larger adapter counts run with {fits}"


# ----------------------------------------------------------------------------------------
# Our engine
# ----------------------------------------------------------------------------------------


def prompts_for(streams: int, prompt_len: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(3, vocab, (streams, prompt_len), generator=gen).tolist()


def assign(streams: int, n: int, dist: str) -> list[int]:
    """Adapter index of each stream: every adapter equally often (round robin, shuffled), or
    Zipf(1) (P(i) ~ 1 / (i + 1)), seeded; the LoRA benchmark's assignment."""
    return lora_bench.assign(streams, n, dist, zipf_s=1.0, base_every=0, seed=SEED + n)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def run_streams(engine: Engine, prompts: list[list[int]], names: list[str | None], gen_len: int,
                sync) -> dict:
    """Submit every stream at once, step until done: wall time, TTFTs, per-step times."""
    first: dict[str, tuple[float, int]] = {}  # time and id of each stream's first token
    tokens = dict.fromkeys((f"s{i}" for i in range(len(prompts))), 0)

    def on_output(out):
        first.setdefault(out.request_id, (time.perf_counter(), out.token_ids[0]))
        tokens[out.request_id] += len(out.token_ids)

    sync()
    t0 = time.perf_counter()
    reqs = [Request(f"s{i}", p, SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True), name,
                    on_output=on_output) for i, (p, name) in enumerate(zip(prompts, names))]
    for r in reqs:
        engine.add_request(r)
    steps = []  # (seconds, prefill tokens, decodes)
    while engine.has_work():
        ts = time.perf_counter()
        engine.step()
        sync()
        sched = engine.last_step
        steps.append((time.perf_counter() - ts, sum(n for _, n in sched.prefills), len(sched.decodes)))
    wall = time.perf_counter() - t0
    if any(n != gen_len for n in tokens.values()):
        raise SystemExit(f"WRONG RUN: streams generated {sorted(set(tokens.values()))} tokens, not {gen_len}")
    full = [s for s, pre, dec in steps if pre == 0 and dec == len(prompts)]
    ttft = [first[r.request_id][0] - t0 for r in reqs]
    return dict(seconds=wall, tokens=sum(tokens.values()), tok_s=sum(tokens.values()) / wall,
                ttft_p50_ms=1e3 * percentile(ttft, 50), ttft_p99_ms=1e3 * percentile(ttft, 99),
                decode_ms=1e3 * statistics.median(full) if full else None, decode_steps=len(full),
                steps=len(steps), preemptions=sum(r.num_preemptions for r in reqs),
                step_ms=[round(1e3 * s, 3) for s, _, _ in steps],
                first_tokens=[first[r.request_id][1] for r in reqs])


def floor_bytes(model, mc: ModelConfig, present: int, streams: int, context: int,
                targets: tuple[str, ...] = LINEAR_NAMES) -> dict[str, int]:
    """Bytes one decode step of `streams` tokens moves at least (see the module docstring)."""
    h = mc.hidden_size
    return dict(nf4_linears=sum(m.resident_bytes() for m in model.linears().values()),
                lm_head=model.lm_head_weight.numel() * 2,
                embed_rows_norms=streams * h * 2 + (2 * mc.num_layers + 1) * h * 2,
                adapters=present * adapter_bytes(mc, targets),
                kv_read=streams * context * kv_bytes_per_token(mc, DTYPE))


def run_ours(args, cfg, device: torch.device, copy_bw: float, sync) -> dict:
    mc = ModelConfig.from_hf(cfg)
    started = time.perf_counter()
    model = build_model(SyntheticReader(cfg, device), DTYPE, device)
    print(f"[{time.perf_counter() - started:.0f} s] built {args.model}: {model.resident_bytes() / 1e9:.2f} "
          "GB (NF4 linears, bf16 embedding and lm_head)", flush=True)
    if args.tune_ms and device.type == "cuda":
        tune(sorted(set(mc.linear_shapes.values())), args.tune_ms, DTYPE, device)
    kv_tokens = args.kv_cache_tokens or args.streams * (args.prompt_len + args.gen_len + 16)
    slots, mem_line = plan_slots(max(args.adapters), model, mc, kv_tokens, device)
    print(mem_line, flush=True)
    counts = sorted({min(n, slots) for n in args.adapters})
    pool = {f"a{i}": RandomAdapter(cfg, i, device, TARGETS[args.targets]) for i in range(slots)}
    adapters = StaticAdapters(model, pool, slots, RANK)
    engine = Engine(model, synthetic_tokenizer(mc.vocab_size), adapters,
                    EngineConfig(max_num_seqs=args.streams, kv_cache_tokens=kv_tokens,
                                 cuda_graph_max_batch=0 if args.no_cuda_graphs else 256))
    graphs = engine.runner.graphs is not None
    print(f"[{time.perf_counter() - started:.0f} s] {slots} adapters in slots, engine ready", flush=True)
    prompts = prompts_for(args.streams, args.prompt_len, mc.vocab_size)
    # warm-up: every step shape of the workload (Triton compiles, plans, workspaces), and batch 1
    run_streams(engine, prompts, [f"a{i % max(counts)}" for i in range(args.streams)], args.gen_len, sync)
    run_streams(engine, prompts[:1], ["a0"], min(args.gen_len, 8), sync)

    runs = []
    cases = [(0, "base")] + [(n, d) for n in counts for d in args.dist
                             if not (n == 1 and d == "zipf" and "uniform" in args.dist)]  # the same batch
    for n, dist in cases:
        idx = assign(args.streams, n, dist) if n else []
        names = [f"a{i}" for i in idx] if n else [None] * args.streams
        r = run_streams(engine, prompts, names, args.gen_len, sync)
        fb = floor_bytes(model, mc, len(set(idx)), args.streams, args.prompt_len + args.gen_len // 2,
                         TARGETS[args.targets])
        floor_ms = 1e3 * sum(fb.values()) / copy_bw
        runs.append(dict(adapters=n, dist=dist, present=len(set(idx)), **r, floor_bytes=fb, floor_ms=floor_ms,
                         step_over_floor=r["decode_ms"] and r["decode_ms"] / floor_ms))
        print(f"  ours {n:>3} adapters {dist:<7} ({len(set(idx)):>3} present): {r['tok_s']:9.1f} tok/s  "
              f"TTFT p50 {r['ttft_p50_ms']:.1f} p99 {r['ttft_p99_ms']:.1f} ms  decode step "
              f"{fmt(r['decode_ms'], '.2f')} ms (floor {floor_ms:.2f})  preemptions {r['preemptions']}",
              flush=True)
    b1 = run_streams(engine, prompts[:1], ["a0"], args.gen_len, sync)
    print(f"  ours batch 1 (adapter a0, {slots} loaded): {fmt(b1['decode_ms'], '.3f')} ms/token", flush=True)
    info = dict(slots=slots, memory=mem_line, kv_cache_tokens=engine.allocator.capacity_tokens,
                cuda_graphs=graphs, max_num_batched_tokens=engine.config.max_num_batched_tokens,
                adapter_bytes=adapter_bytes(mc, TARGETS[args.targets]),
                kv_bytes_per_token=kv_bytes_per_token(mc, DTYPE))
    del engine, adapters, model
    return dict(info=info, runs=runs, batch1=dict(ms_per_token=b1["decode_ms"], step_ms=b1["step_ms"]))


# ----------------------------------------------------------------------------------------
# Baseline: transformers + PEFT + bitsandbytes
# ----------------------------------------------------------------------------------------


def hf_nf4_model(cfg, device: torch.device, bnb):
    """LlamaForCausalLM built on the meta device, then given the synthetic weights: bf16
    embedding, norms and lm_head, and bitsandbytes Linear4bit (nf4, double quant) holding the
    very NF4 tensors `quantize_nf4` made (bit-exact with bnb's own quantization). No bf16
    copy of the linears ever exists and nothing is written to disk."""
    from torch import nn
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t, requires_grad=False)

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    reader = SyntheticReader(cfg, device)
    glob = reader.global_tensors()
    model.model.embed_tokens.weight = param(glob["model.embed_tokens.weight"])
    model.lm_head.weight = param(glob["lm_head.weight"])
    model.model.norm.weight = param(glob["model.norm.weight"])
    for lw in reader.layers():
        layer = model.model.layers[lw.index]
        for name, w in lw.linears.items():
            parent, attr = name.split(".")
            setattr(getattr(layer, parent), attr, make_bnb_linear(bnb, w))
        for name, t in lw.tensors.items():
            getattr(layer, name.split(".")[0]).weight = param(t)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(device)  # its buffers, off the meta device
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"baseline model: tensors left on the meta device: {left[:5]}")
    model.is_loaded_in_4bit = True  # what PEFT checks to wrap Linear4bit layers with its bnb LoRA
    return model.eval()


def hf_generate(model, ids: torch.Tensor, names: list[str] | None, new_tokens: int,
                sync) -> tuple[float, list]:
    """Seconds of one greedy `generate` of exactly `new_tokens`, and each row's first new token."""
    kw = {} if names is None else dict(adapter_names=names)
    sync()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)
    sync()
    seconds = time.perf_counter() - t0
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"baseline generate returned {tuple(out.shape)}")
    return seconds, out[:, ids.shape[1]].tolist()


def run_baseline(args, cfg, device: torch.device, sync, result: dict) -> None:
    """Base model, then PEFT with one adapter per stream loaded: 1, 8, 64 distinct (uniform).
    Fills `result` as it goes, so what was measured survives a later failure."""
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    n_tok, loaded = args.baseline_tokens, args.streams
    cases = result.setdefault("cases", [])
    result.update(adapters_loaded=loaded, new_tokens=n_tok)
    model = hf_nf4_model(cfg, device, load_bnb()[0])
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    prompts = torch.tensor(prompts_for(args.streams, args.prompt_len, cfg.vocab_size), device=device)

    def case(m, n: int, dist: str, names: list[str] | None) -> None:
        seconds, first = hf_generate(m, prompts, names, n_tok, sync)
        tokens = args.streams * n_tok
        cases.append(dict(adapters=n, dist=dist, present=len(set(names or [])), seconds=seconds,
                          tokens=tokens, tok_s=tokens / seconds, first_tokens=first))
        print(f"  baseline {n:>3} adapters {dist:<7}: {cases[-1]['tok_s']:9.1f} tok/s", flush=True)

    hf_generate(model, prompts, None, 2, sync)  # warm-up
    case(model, 0, "base", None)
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=False,  # random A and B
                      target_modules=[n.split(".")[1] for n in TARGETS[args.targets]])
    peft_model = get_peft_model(model, lcfg, adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, loaded):
        peft_model.add_adapter(f"a{i}", lcfg)
        if i % 16 == 15:
            print(f"[{time.perf_counter() - started:.0f} s] baseline: {i + 1} adapters added", flush=True)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(DTYPE)  # bf16 like ours
    peft_model.eval()
    hf_generate(peft_model, prompts, ["a0"] * args.streams, 2, sync)  # warm-up of the mixed-batch path
    for n in sorted({n for n in args.adapters if n <= loaded}):
        case(peft_model, n, "uniform", [f"a{i}" for i in assign(args.streams, n, "uniform")])
    t_n = hf_generate(peft_model, prompts[:1], ["a0"], n_tok, sync)[0]
    t_1 = hf_generate(peft_model, prompts[:1], ["a0"], 1, sync)[0]
    result["batch1_ms_per_token"] = ms = 1e3 * (t_n - t_1) / max(1, n_tok - 1)
    print(f"  baseline batch 1 (a0, {loaded} loaded): {ms:.1f} ms/token", flush=True)


def baseline_or_skip(args, cfg, device: torch.device, sync) -> dict:
    """The baseline's numbers; or {"skipped": why} (flag, missing package, no CUDA); or what was
    measured before a failure, with {"error": what failed}."""
    if args.skip_baseline:
        return dict(skipped="--skip-baseline")
    if device.type != "cuda" and not args.smoke:
        return dict(skipped="no CUDA device (on CPU the baseline runs for --smoke only)")
    bnb, why = load_bnb()
    if bnb is None:
        return dict(skipped=f"bitsandbytes not importable ({why})")
    try:
        import peft  # noqa: F401
    except Exception as e:
        return dict(skipped=f"peft not importable ({type(e).__name__}: {e})")
    result: dict = {}
    try:
        run_baseline(args, cfg, device, sync, result)
    except Exception as e:  # keep our numbers (and the baseline's so far): report the failure
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return result


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def header_lines(env: dict[str, str], args, cfg) -> list[str]:
    mode = "SMOKE (harness check only, not performance)" if args.smoke else "full"
    return [f"# e2e benchmark, {mode}",
            f"date {env['date']} | device {env['device']}",
            (f"torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']} | peft "
             f"{env['peft']} | bitsandbytes {env['bitsandbytes']} | ours: {env['ours']}"),
            (f"model {args.model} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab "
             f"{cfg.vocab_size}, random NF4) | {args.streams} streams x {args.prompt_len} prompt + "
             f"{args.gen_len} generated (greedy, ignore_eos) | rank-{RANK} adapters on all linears")]


def engine_line(info: dict) -> str:
    return (f"engine: {info['slots']} adapter slots, KV cache {info['kv_cache_tokens']} tokens, "
            f"max_num_batched_tokens {info['max_num_batched_tokens']}, "
            f"decode CUDA graphs {'on' if info['cuda_graphs'] else 'off'}")


def baseline_line(base: dict, args) -> str:
    if "skipped" in base:
        return f"baseline: skipped ({base['skipped']})"
    line = (f"baseline: transformers + PEFT + bitsandbytes ({base.get('attn_implementation')} attention), "
            f"{base['adapters_loaded']} adapters loaded, {base['new_tokens']} new tokens per stream "
            f"(ours {args.gen_len}; 'x baseline' compares tok/s)")
    if "first_token_agreement" in base:
        line += (f"; same weights as ours: the base model's first greedy token equals ours in "
                 f"{base['first_token_agreement']}/{args.streams} streams (bf16 near-ties may differ)")
    return line + (f"\nbaseline FAILED after what is shown: {base['error']}" if "error" in base else "")


def report_table(runs: list[dict], base: dict) -> list[str]:
    head = ["adapters", "dist", "present", "ours tok/s", "vs 1 adapter", "baseline tok/s", "x baseline",
            "TTFT p50 ms", "TTFT p99 ms", "decode step ms", "floor ms", "step/floor"]
    theirs = {(c["adapters"], c["dist"]): c["tok_s"] for c in base.get("cases", [])}
    one = next((r["tok_s"] for r in runs if r["adapters"] == 1), None)
    body = []
    for r in runs:
        t = theirs.get((r["adapters"], r["dist"]))
        body.append([str(r["adapters"] or "-"), r["dist"], str(r["present"]), f"{r['tok_s']:.1f}",
                     fmt(one and r["tok_s"] / one, ".2f"), fmt(t, ".1f"), fmt(t and r["tok_s"] / t, ".1f"),
                     f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_p99_ms']:.1f}", fmt(r["decode_ms"], ".2f"),
                     f"{r['floor_ms']:.2f}", fmt(r["step_over_floor"], ".2f")])
    return markdown(head, body, numeric=set(range(2, len(head))))


def batch1_table(ours: dict, base: dict) -> list[str]:
    o, b = ours["batch1"]["ms_per_token"], base.get("batch1_ms_per_token")
    return markdown(["batch 1 decode", "ours ms/token", "baseline ms/token", "x baseline"],
                    [["1 stream on an adapter, all loaded", fmt(o, ".3f"), fmt(b, ".1f"),
                      fmt(b and o and b / o, ".1f")]], numeric={1, 2, 3})


def target_run(runs: list[dict], streams: int) -> dict | None:
    """The headline run: as many distinct adapters as streams, uniform (else the most below)."""
    fits = [r for r in runs if r["dist"] == "uniform" and 1 <= r["adapters"] <= streams]
    return max(fits, key=lambda r: r["adapters"], default=None)


def floor_line(r: dict, copy_bw: float) -> str:
    parts = " + ".join(f"{k} {v / 1e6:.1f}" for k, v in r["floor_bytes"].items())
    total = sum(r["floor_bytes"].values())
    return (f"byte floor of a decode step ({r['adapters']} adapters {r['dist']}, {r['present']} present, "
            f"KV at the generation mid-point): {parts} MB = {total / 1e6:.1f} MB over "
            f"{copy_bw / 1e12:.3f} TB/s = {r['floor_ms']:.3f} ms; measured {fmt(r['decode_ms'], '.3f')} ms "
            f"(median of {r['decode_steps']} steps)")


def targets(ours: dict, args) -> list[Target]:
    head = target_run(ours["runs"], args.streams)
    one = next((r for r in ours["runs"] if r["adapters"] == 1), None)
    tag = f"{args.streams} streams over {head['adapters'] if head else '?'} distinct adapters (uniform)"
    return [Target(f"{tag}: generated tokens/s", head and head["tok_s"], " tok/s", ">=", 3000),
            Target(f"{tag}: throughput / 1-adapter throughput",
                   head and one and head["tok_s"] / one["tok_s"], "x", ">=", 0.85),
            Target(f"{tag}: decode step at batch {args.streams} / byte floor",
                   head and head["step_over_floor"], "x", "<=", 2.0),
            Target("batch-1 decode", ours["batch1"]["ms_per_token"], " ms/token", "<=", 2.0)]


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default=None, help="llama2-7b (default) or tiny (smoke)")
    p.add_argument("--streams", type=int, default=None, help="concurrent streams (default 64; smoke 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; smoke 16)")
    p.add_argument("--gen-len", type=int, default=None, help="generated tokens (default 128; smoke 8)")
    p.add_argument("--adapters", default=None,
                   help="distinct adapter counts (default 1,8,64,256; smoke 1,4,8); a base run is added")
    p.add_argument("--dist", default="uniform,zipf",
                   help="stream -> adapter: uniform (shuffled round robin) and/or zipf")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache capacity in tokens (default streams * (prompt + gen + 16))")
    p.add_argument("--targets", choices=list(TARGETS), default="all",
                   help="linears the adapters adapt: all seven (default) or q/v only (PEFT's Llama default)")
    p.add_argument("--skip-baseline", action="store_true", help="skip transformers + PEFT + bitsandbytes")
    p.add_argument("--baseline-tokens", type=int, default=None,
                   help="tokens the (slow) baseline generates per stream (default 32; smoke 4)")
    p.add_argument("--tune", action="store_true",
                   help="tune the NF4 matmul plans of the model's shapes first (cached per GPU; "
                        "without it: cached or heuristic plans)")
    p.add_argument("--tune-ms", default=None,
                   help="with or without --tune: tune only the M buckets of these values (default with --tune: "
                        "1,16,32,64,256,2048)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the engine without decode CUDA graphs")
    p.add_argument("--device", default=None, help="torch device (default cuda; cpu for --smoke without CUDA)")
    p.add_argument("--out", "--json", dest="out", default=str(DEFAULT_OUT),
                   help="where to write every result as JSON (default bench/out/e2e.json)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model and token counts on whatever device there is (CPU): "
                        "checks the harness only")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.adapters = sorted({int(v) for v in str(args.adapters).split(",") if v.strip()})
    args.dist = [d.strip() for d in args.dist.split(",") if d.strip()]
    args.tune_ms = [int(m) for m in args.tune_ms.split(",")] if args.tune_ms else (list(TUNE_MS) if args.tune else [])
    if not args.adapters or min(args.adapters) < 1:
        p.error("--adapters takes positive counts, e.g. 1,8,64,256")
    if not args.dist or any(d not in ("uniform", "zipf") for d in args.dist):
        p.error("--dist takes a comma-separated subset of uniform,zipf")
    if min(args.streams, args.prompt_len, args.gen_len, args.baseline_tokens) < 1:
        p.error("--streams, --prompt-len, --gen-len and --baseline-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else bench_device(args.smoke, "e2e")
    if device is None:
        return 2
    started = time.perf_counter()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = hf_config(args.model)
    env = environment(device, load_bnb()[0])
    for pkg in ("transformers", "peft"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:
            env[pkg] = "not installed"
    env["ours"] = "Triton kernels" if cuda and runtime.use_triton(device) else "PyTorch reference kernels"
    header = header_lines(env, args, cfg)
    print("\n".join(header), flush=True)
    copy_bytes = (1 << 30) if cuda else (64 << 20)
    copy_bw = copy_bandwidth(device, copy_bytes, loop_timer if cuda else wall_timer)
    copy_line = f"copy bandwidth ({copy_bytes >> 20} MiB clone, read + write): {copy_bw / 1e12:.3f} TB/s"
    print(copy_line, flush=True)

    # On CPU the Triton interpreter (TRITON_INTERPRET=1, which the test suite sets) would take
    # minutes for whole engine runs: the references stand in (the kernels have their own benches).
    with runtime.reference_kernels() if not cuda else contextlib.nullcontext():
        ours = run_ours(args, cfg, device, copy_bw, sync)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    base = baseline_or_skip(args, cfg, device, sync)
    if base.get("cases"):  # a check that both ran the same model: first greedy tokens, base model
        mine, theirs = ours["runs"][0]["first_tokens"], base["cases"][0]["first_tokens"]
        base["first_token_agreement"] = sum(x == y for x, y in zip(mine, theirs))
    goals = targets(ours, args)
    head = target_run(ours["runs"], args.streams)
    elapsed = time.perf_counter() - started

    print("", *header, copy_line, ours["info"]["memory"], engine_line(ours["info"]),
          baseline_line(base, args), "", *report_table(ours["runs"], base), "",
          *batch1_table(ours, base), "", sep="\n")
    if head is not None:
        print(floor_line(head, copy_bw))
    print("targets (smoke mode: tiny model on CPU, the verdicts mean nothing):" if args.smoke else "targets:")
    print("\n".join("  " + g.line() for g in goals))
    print(f"\n{elapsed:.1f} s")

    report = dict(env=env, args=vars(args), config=cfg.to_dict(), copy_bandwidth_bytes_per_s=copy_bw,
                  ours=ours, baseline=base, seconds=elapsed,
                  targets=[dict(dataclasses.asdict(g), verdict=g.verdict()) for g in goals])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
