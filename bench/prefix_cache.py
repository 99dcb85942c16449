"""Prefix-cache benchmark: time to first token and throughput of many streams that share one
long system prompt over several adapters, with the engine's prefix cache on and off, in one run.

Workload: a system prompt of --system-tokens random tokens (default 1,000), the same for every
stream, then a user part of its own per stream (--user-tokens, default 16-64 tokens, seeded),
--streams streams (default 64) on --adapters random rank-16 adapters (default 8; stream i on
adapter i % A, so 8 streams each, in that interleaved arrival order), --base-streams more on
the base model spread evenly among them (default 0: all on adapters), greedy, ignore_eos, --max-tokens tokens
each (default 32). KV blocks are shared only between requests on the same adapter version (or
between base requests), so the cache holds one copy of the system prompt per adapter; of
1,000 tokens the 62 full blocks of 16 (992 tokens) can be reused, the last partial block is
computed by every stream.

Two arrival patterns, each with the cache off and on (same model, same engine settings, a
fresh Engine per run; only `enable_prefix_caching` differs):
  cold   every stream submitted at once into an empty cache: only streams admitted after the
         first prefill chunk of their adapter's system prompt was launched can hit
  warm   first one earlier request per adapter (and one on the base model when there are base
         streams: the system prompt and a user part of its own, 2 tokens) runs to the end, as in
         steady serving, then every stream is submitted at once; the earlier requests are not
         counted
Per run: TTFT (submission -> the host holds the stream's first token, time.monotonic() after
each engine.step()) mean, p50, p99; wall time (submission -> last token); output tokens/s
over it; prompt tokens prefilled (sum of StepStats.prefill_tokens); cache hit rate (tokens
found / tokens looked up over the streams' admissions, StepStats.cache_lookups); and the
on / off ratios of TTFT and throughput of each pattern. Every stream's greedy tokens must be
the same in all four runs; the run fails (exit 1) if not. In fp32 (CPU) they must be equal
token for token; in bf16 a stream may diverge only where the two runs' top two tokens are
within --tie-tol nats of each other (a near-tie that rounding differences between step
compositions can flip; chosen token and top 2 logprobs are requested for this in every run).

Before the runs an untimed warm-up engine runs `Engine.warm_up()` (every kernel variant
compiled and run) and a short version of the workload; each measured engine first runs one
tiny request (decode CUDA graphs are captured in its first step), also untimed.

Model: CPU (default without CUDA): a small random Llama (hidden 256, 4 layers, 4 heads of 64,
2 kv heads, vocab 4096) in fp32, NF4 linears, on the PyTorch reference kernels (as
bench/e2e.py on CPU). CUDA (default with one): Llama-2-7B's shapes (--model llama3-8b:
Llama-3-8B's, GQA), random NF4 drawn on the device (bench/e2e.py's SyntheticReader), bf16,
the Triton kernels, decode CUDA graphs.

Run:
    python bench/prefix_cache.py                     # CUDA when there is one, else CPU (small model)
    python bench/prefix_cache.py --device cuda --max-tokens 16   # the gpu_check stage
    python bench/prefix_cache.py --smoke             # anywhere, seconds: harness check only
`--smoke`: tiny model (hidden 128, 2 layers, vocab 512), a 64-token system prompt, 8 streams
on 2 adapters, 8-16 user tokens, 4 generated, 96 tokens per step (so that cold arrivals can
hit too). Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from loraplex.engine.adapters import StaticAdapters  # noqa: E402
from loraplex.engine.engine import Engine, EngineConfig  # noqa: E402
from loraplex.engine.kv_cache import kv_bytes_per_token  # noqa: E402
from loraplex.engine.request import Request  # noqa: E402
from loraplex.engine.sampling import SamplingParams  # noqa: E402
from loraplex.kernels import runtime  # noqa: E402
from loraplex.model.config import ModelConfig  # noqa: E402
from loraplex.model.llama import build_model  # noqa: E402

from bench.e2e import RANK, RandomAdapter, SyntheticReader, percentile, synthetic_tokenizer  # noqa: E402
from bench.nf4_matmul import environment, fmt, markdown  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "prefix_cache.json"
MODELS = {  # LlamaConfig fields
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
}
FULL = dict(system_tokens=1000, user_tokens="16-64", streams=64, adapters=8, max_tokens=32,
            max_num_batched_tokens=2048)
SMOKE = dict(model="tiny", system_tokens=64, user_tokens="8-16", streams=8, adapters=2, max_tokens=4,
             max_num_batched_tokens=96)
BLOCK_SIZE = 16   # the engine's default
SEED = 0
LOGPROBS = 2      # chosen token's logprob and the top 2: enough to tell a near-tie
TIE_TOL_BF16 = 0.1
MODES = ("cold", "warm")


# ----------------------------------------------------------------------------------------
# Model, adapters, workload
# ----------------------------------------------------------------------------------------


def hf_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[name], architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


class Reader(SyntheticReader):
    """bench/e2e.py's synthetic reader (random weights, each layer quantized to NF4 on the
    device) in a dtype of choice: fp32 on CPU, bf16 (e2e's very weights) on CUDA."""

    def __init__(self, config, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device)
        self.dtype = dtype

    def _randn(self, gen: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=self.device, dtype=self.dtype) * 0.02

    def _ones(self) -> torch.Tensor:
        return torch.ones(self.config.hidden_size, device=self.device, dtype=self.dtype)


def user_range(text: str) -> tuple[int, int]:
    lo, _, hi = str(text).partition("-")
    lo, hi = int(lo), int(hi or lo)
    return min(lo, hi), max(lo, hi)


def stream_names(streams: int, adapters: int, base: int) -> list[str | None]:
    """Adapter of each stream in arrival order: round robin over the adapters, the base-model
    streams spread evenly among them."""
    total = streams + base
    at = {int((j + 0.5) * total / base) for j in range(base)} if base else set()
    names: list[str | None] = []
    for pos in range(total):
        names.append(None if pos in at else f"a{(pos - len([q for q in at if q < pos])) % adapters}")
    return names


class Workload:
    """The system prompt, each stream's prompt and adapter, and the warm pattern's earlier
    requests (one per adapter, and one on the base model if any stream is)."""

    def __init__(self, args, vocab: int):
        gen = torch.Generator().manual_seed(SEED)
        lo, hi = args.user_range
        self.system = torch.randint(3, vocab, (args.system_tokens,), generator=gen).tolist()
        self.names = stream_names(args.streams, args.adapters, args.base_streams)
        lengths = torch.randint(lo, hi + 1, (len(self.names),), generator=gen).tolist()
        self.prompts = [self.system + torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
        groups = list(dict.fromkeys(self.names))
        self.earlier = [(name, self.system + torch.randint(3, vocab, (lo,), generator=gen).tolist())
                        for name in groups]
        self.reusable = args.system_tokens // BLOCK_SIZE * BLOCK_SIZE  # full blocks of the system prompt
        self.prompt_tokens = sum(len(p) for p in self.prompts)


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=LOGPROBS)


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------


def engine_config(args, cache: bool, cuda: bool) -> EngineConfig:
    return EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        block_size=BLOCK_SIZE, kv_cache_tokens=args.kv_cache_tokens,
                        cuda_graph_max_batch=0 if (args.no_cuda_graphs or not cuda) else 256,
                        enable_prefix_caching=cache)


def warm_up(model, tokenizer, adapters, args, work: Workload, cuda: bool) -> float:
    """Untimed: every kernel variant (Engine.warm_up), then a short version of the workload
    with the cache on (the prefill-after-a-hit path included); no CUDA graphs captured."""
    started = time.perf_counter()
    config = engine_config(args, True, cuda)
    config.cuda_graph_max_batch = 0
    engine = Engine(model, tokenizer, adapters, config)
    engine.warm_up(adapters.names())
    p = params(2)
    for rnd in range(2):
        for i, (name, prompt) in enumerate(work.earlier):
            engine.add_request(Request(f"warm-{rnd}-{i}", prompt[:-1] + [3 + rnd], p, name))
        engine.run_until_done()
    retire(engine)
    del engine
    release(cuda)  # the engine's KV cache and graphs go now, not at some later collection
    return time.perf_counter() - started


def keep_freed_memory() -> bool:
    """glibc: serve large allocations from the heap and never give freed memory back to the
    system. The CPU reference kernels allocate tens of MB of temporaries per layer and step
    (decode attention gathers every sequence's blocks); with glibc's defaults each is a fresh
    mmap and page-faults afresh, which made decode steps vary 2x from run to run."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) & bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def retire(engine: Engine) -> None:
    """Unbind a used engine's KV cache and kernel workspace from the model (it holds them
    until the next engine binds its own), so that one engine's KV cache at a time exists."""
    model = engine.model
    model.bind_kernels(None, None)
    model.bind_kv_cache([None] * len(model.layers), [None] * len(model.layers))


def release(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run_streams(engine: Engine, work: Workload, max_tokens: int) -> dict:
    """Submit every stream at once, step until done; timings on the host after each step."""
    rids = [f"s{i}" for i in range(len(work.prompts))]
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    top: dict[str, list[list[tuple[int, float]]]] = {r: [] for r in rids}
    cached: dict[str, int] = {}
    first: dict[str, float] = {}
    fresh: list[str] = []
    stats = []

    def sink(out):
        rid = out.request_id
        if out.token_ids and not tokens[rid]:
            fresh.append(rid)
        tokens[rid].extend(out.token_ids)
        top[rid].extend([(lp.token_id, lp.logprob)] + [tuple(t) for t in lp.top] for lp in out.logprobs or [])
        cached[rid] = out.cached_tokens

    engine.on_step = stats.append
    p = params(max_tokens)
    reqs = [Request(rid, list(prompt), p, name, on_output=sink, detokenize=False)
            for rid, prompt, name in zip(rids, work.prompts, work.names)]
    t0 = time.monotonic()
    for r in reqs:
        engine.add_request(r)
    steps = 0
    while engine.has_work():
        engine.step()
        now = time.monotonic()
        steps += 1
        for rid in fresh:
            first[rid] = now - t0
        fresh.clear()
    wall = time.monotonic() - t0
    engine.on_step = None
    if any(len(t) != max_tokens for t in tokens.values()):
        raise SystemExit(f"WRONG RUN: streams generated {sorted({len(t) for t in tokens.values()})} tokens, "
                         f"not {max_tokens}")
    ttft = [1e3 * first[r] for r in rids]
    looked = sum(n for s in stats for _, n, _ in s.cache_lookups)
    found = sum(f for s in stats for _, _, f in s.cache_lookups)
    out_tokens = sum(len(t) for t in tokens.values())
    return dict(ttft_mean_ms=statistics.fmean(ttft), ttft_p50_ms=percentile(ttft, 50),
                ttft_p99_ms=percentile(ttft, 99), seconds=wall, output_tokens=out_tokens, tok_s=out_tokens / wall,
                prefill_tokens=sum(s.prefill_tokens for s in stats), looked_up=looked, found=found,
                hit_rate=found / looked if looked else None,
                cached_tokens_mean=statistics.fmean(cached[r] for r in rids), steps=steps,
                preemptions=sum(r.num_preemptions for r in reqs), ttft_ms=[round(t, 3) for t in ttft],
                step_ms=[round(1e3 * s.seconds, 3) for s in stats], step_prefill=[s.prefill_tokens for s in stats],
                step_decodes=[s.decode_tokens for s in stats],
                tokens=[tokens[r] for r in rids], top=[top[r] for r in rids])


def measure(model, tokenizer, adapters, args, work: Workload, mode: str, cache: bool, cuda: bool) -> dict:
    """One fresh engine: the graph-capturing tiny request, the earlier requests (warm), the streams."""
    engine = Engine(model, tokenizer, adapters, engine_config(args, cache, cuda))
    engine.add_request(Request("capture", [1, 2] * 4, SamplingParams(max_tokens=2, ignore_eos=True)))
    engine.run_until_done()  # prompt ids 1, 2 are never drawn for the workload: nothing shared
    if mode == "warm":
        p = params(2)
        for i, (name, prompt) in enumerate(work.earlier):
            engine.add_request(Request(f"earlier-{i}", list(prompt), p, name, detokenize=False))
        engine.run_until_done()
    run = run_streams(engine, work, args.max_tokens)
    info = dict(kv_cache_tokens=engine.allocator.capacity_tokens, cuda_graphs=engine.runner.graphs is not None,
                async_scheduling=engine.async_scheduling)
    retire(engine)
    del engine
    release(cuda)
    return dict(mode=mode, cache=cache, **run, engine=info)


# ----------------------------------------------------------------------------------------
# Same outputs, cache on and off
# ----------------------------------------------------------------------------------------


def tie_gap(top_a: list[tuple[int, float]], top_b: list[tuple[int, float]]) -> float | None:
    """At a position where runs a and b chose different tokens: how far apart the two tokens
    are in each run's distribution (the larger), or None when one run's token is not in the
    other's top LOGPROBS."""
    (tok_a, lp_a), (tok_b, lp_b) = top_a[0], top_b[0]
    other_in_a = dict(top_a[1:]).get(tok_b)
    other_in_b = dict(top_b[1:]).get(tok_a)
    if other_in_a is None or other_in_b is None:
        return None
    return max(lp_a - other_in_a, lp_b - other_in_b)


def compare(runs: list[dict], tol: float) -> dict:
    """Every run's tokens against the first run's, per stream: identical, a divergence at a
    near-tie (gap <= tol; tol 0 allows none), or a mismatch."""
    ref = runs[0]
    identical, ties, mismatches = 0, [], []
    for i, want in enumerate(ref["tokens"]):
        ok = True
        for run in runs[1:]:
            got = run["tokens"][i]
            if got == want:
                continue
            ok = False
            j = next(k for k, (x, y) in enumerate(zip(want, got)) if x != y)
            gap = tie_gap(ref["top"][i][j], run["top"][i][j])
            what = dict(stream=i, run=f"{run['mode']} cache {'on' if run['cache'] else 'off'}", position=j,
                        want=want[j], got=got[j], gap=gap)
            (ties if gap is not None and gap <= tol else mismatches).append(what)
        identical += ok
    return dict(streams=len(ref["tokens"]), identical=identical, ties=ties, mismatches=mismatches,
                tie_tol=tol, passed=not mismatches)


def outputs_line(cmp: dict, runs: int) -> str:
    line = (f"outputs: {cmp['identical']}/{cmp['streams']} streams token for token identical in all {runs} runs "
            f"(greedy, cache on vs off, cold vs warm)")
    if cmp["ties"]:
        line += (f"; {len(cmp['ties'])} divergences at near-ties (top-2 gap <= {cmp['tie_tol']:g} nats, "
                 "bf16 rounding across step compositions)")
    if cmp["mismatches"]:
        m = cmp["mismatches"][0]
        line += (f"; MISMATCH in {len(cmp['mismatches'])} (first: stream {m['stream']} {m['run']} at token "
                 f"{m['position']}: {m['got']} instead of {m['want']}, gap {fmt(m['gap'], '.3g')})")
    return line


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def ratios(runs: list[dict]) -> dict:
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        on = next((r for r in runs if r["mode"] == mode and r["cache"]), None)
        off = next((r for r in runs if r["mode"] == mode and not r["cache"]), None)
        if on and off:
            out[mode] = {k: on[k] / off[k] if off[k] else None
                         for k in ("ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tok_s", "prefill_tokens", "seconds")}
    return out


def report_table(runs: list[dict], rat: dict) -> list[str]:
    head = ["arrival", "cache", "TTFT mean ms", "TTFT p50 ms", "TTFT p99 ms", "wall s", "out tok/s",
            "prefilled tokens", "hit rate", "TTFT mean on/off", "TTFT p99 on/off", "tok/s on/off"]
    body = []
    for r in runs:
        x = rat.get(r["mode"], {}) if r["cache"] else {}
        body.append([r["mode"], "on" if r["cache"] else "off", f"{r['ttft_mean_ms']:.1f}", f"{r['ttft_p50_ms']:.1f}",
                     f"{r['ttft_p99_ms']:.1f}", f"{r['seconds']:.2f}", f"{r['tok_s']:.1f}", str(r["prefill_tokens"]),
                     fmt(r["hit_rate"] and 100 * r["hit_rate"], ".1f") + ("%" if r["hit_rate"] else ""),
                     fmt(x.get("ttft_mean_ms"), ".2f"), fmt(x.get("ttft_p99_ms"), ".2f"), fmt(x.get("tok_s"), ".2f")])
    return markdown(head, body, numeric=set(range(2, len(head))))


def header_lines(env: dict, args, cfg, work: Workload) -> list[str]:
    mode = "SMOKE (harness check only, not performance)" if args.smoke else "full"
    lo, hi = args.user_range
    groups = f"{args.adapters} adapters" + (f" + {args.base_streams} base-model streams" if args.base_streams else "")
    return [f"# prefix cache benchmark, {mode}",
            f"date {env['date']} | device {env['device']} | torch {env['torch']} | triton {env['triton']} | "
            f"ours: {env['ours']}",
            (f"model {args.model} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, heads "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, vocab {cfg.vocab_size}, random NF4, "
             f"{str(args.dtype).removeprefix('torch.')}) | rank-{RANK} adapters on all linears"),
            (f"workload: {len(work.names)} streams over {groups} (round robin), system prompt {args.system_tokens} "
             f"tokens ({work.reusable} reusable: full blocks of {BLOCK_SIZE}) + user {lo}-{hi} tokens "
             f"({work.prompt_tokens} prompt tokens in all), {args.max_tokens} generated each (greedy, ignore_eos)")]


def engine_line(args, info: dict) -> str:
    return (f"engine (every run): max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
            f"{args.max_num_batched_tokens}, KV cache {info['kv_cache_tokens']} tokens, block size {BLOCK_SIZE}, "
            f"decode CUDA graphs {'on' if info['cuda_graphs'] else 'off'}, async scheduling "
            f"{'on' if info['async_scheduling'] else 'off'}; a fresh engine per run, cache off / on the only difference")


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--model", choices=list(MODELS), default=None,
                   help="default llama2-7b on CUDA, small on CPU, tiny with --smoke")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="activations (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--system-tokens", type=int, default=None, help="shared system prompt tokens (default 1000)")
    p.add_argument("--user-tokens", default=None, help="user part per stream, LO-HI tokens (default 16-64)")
    p.add_argument("--streams", type=int, default=None, help="streams on adapters (default 64)")
    p.add_argument("--adapters", type=int, default=None, help="distinct adapters, round robin (default 8)")
    p.add_argument("--base-streams", type=int, default=0, help="more streams on the base model (default 0)")
    p.add_argument("--max-tokens", type=int, default=None, help="generated tokens per stream (default 32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engine tokens per step (default 2048, the engine's; smoke 96)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache capacity (default: every stream and earlier request without sharing, "
                        "plus a block each)")
    p.add_argument("--modes", default=",".join(MODES), help="arrival patterns: cold,warm")
    p.add_argument("--tie-tol", type=float, default=None,
                   help=f"nats within which a divergence counts as a near-tie (default {TIE_TOL_BF16} in bf16, "
                        "0 in fp32: token for token)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the engines without decode CUDA graphs")
    p.add_argument("--out", "--json", dest="out", default=str(DEFAULT_OUT),
                   help="where to write every figure as JSON (default bench/out/prefix_cache.json)")
    p.add_argument("--smoke", action="store_true", help="tiny model and workload (seconds, CPU): the harness only")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    for key, value in {**FULL, **(SMOKE if args.smoke else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model is None:
        args.model = "llama2-7b" if cuda else "small"
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if args.tie_tol is None:
        args.tie_tol = 0.0 if args.dtype == torch.float32 else TIE_TOL_BF16
    args.user_range = user_range(args.user_tokens)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error("--modes takes a comma-separated subset of cold,warm")
    if min(args.system_tokens, args.user_range[0], args.streams, args.adapters, args.max_tokens) < 1 \
            or args.base_streams < 0:
        p.error("--system-tokens, --user-tokens, --streams, --adapters and --max-tokens must be >= 1")
    longest = args.system_tokens + args.user_range[1] + args.max_tokens
    if longest > MODELS[args.model]["max_position_embeddings"]:
        p.error(f"{longest} tokens per stream exceed {args.model}'s context "
                f"({MODELS[args.model]['max_position_embeddings']})")
    total = args.streams + args.base_streams
    args.max_num_seqs = total
    if args.kv_cache_tokens is None:
        per = -(-longest // BLOCK_SIZE) * BLOCK_SIZE + BLOCK_SIZE
        args.kv_cache_tokens = (total + args.adapters + 1) * per
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, cuda = args.device, args.device.type == "cuda"
    started = time.perf_counter()
    cfg = hf_config(args.model)
    env = environment(device, None)
    env.pop("bitsandbytes", None)
    env["ours"] = "Triton kernels" if cuda and runtime.use_triton(device) else "PyTorch reference kernels"
    if not cuda:
        env["ours"] += (", glibc told to keep freed memory (mallopt)" if keep_freed_memory()
                        else ", glibc mallopt not available")
    work = Workload(args, cfg.vocab_size)
    header = header_lines(env, args, cfg, work)
    print("\n".join(header), flush=True)

    # On CPU the Triton interpreter (TRITON_INTERPRET=1, which the test suite sets) would take
    # minutes for whole engine runs: the references stand in, as in bench/e2e.py.
    runs: list[dict] = []
    with runtime.reference_kernels() if not cuda else contextlib.nullcontext():
        model = build_model(Reader(cfg, device, args.dtype), args.dtype, device)
        mc = ModelConfig.from_hf(cfg)
        kv_line = (f"memory: weights {model.resident_bytes() / 1e9:.2f} GB | KV cache {args.kv_cache_tokens} tokens "
                   f"x {kv_bytes_per_token(mc, args.dtype) / 1e3:.1f} kB = "
                   f"{args.kv_cache_tokens * kv_bytes_per_token(mc, args.dtype) / 1e9:.2f} GB per engine")
        print(f"[{time.perf_counter() - started:.0f} s] built {args.model}; {kv_line}", flush=True)
        pool = {f"a{i}": RandomAdapter(cfg, i, device) for i in range(args.adapters)}
        adapters = StaticAdapters(model, pool, args.adapters, RANK)
        tokenizer = synthetic_tokenizer(cfg.vocab_size)
        warm_s = warm_up(model, tokenizer, adapters, args, work, cuda)
        print(f"[{time.perf_counter() - started:.0f} s] warm-up engine done ({warm_s:.1f} s, untimed)", flush=True)
        for mode in args.modes:
            for cache in (False, True):
                r = measure(model, tokenizer, adapters, args, work, mode, cache, cuda)
                runs.append(r)
                print(f"[{time.perf_counter() - started:.0f} s] {mode:<4} cache {'on ' if cache else 'off'}: "
                      f"TTFT mean {r['ttft_mean_ms']:.1f} p50 {r['ttft_p50_ms']:.1f} p99 {r['ttft_p99_ms']:.1f} ms, "
                      f"{r['seconds']:.2f} s, {r['tok_s']:.1f} tok/s, prefilled {r['prefill_tokens']}, hit rate "
                      f"{fmt(r['hit_rate'], '.3f')}, {r['steps']} steps, preemptions {r['preemptions']}", flush=True)
        del model, adapters
    release(cuda)

    rat = ratios(runs)
    cmp = compare(runs, args.tie_tol)
    elapsed = time.perf_counter() - started
    lines = ["", *header, kv_line, engine_line(args, runs[0]["engine"]), "", *report_table(runs, rat), ""]
    for mode, x in rat.items():
        lines.append(f"{mode}: cache on / off: TTFT mean {x['ttft_mean_ms']:.3f}, p50 {x['ttft_p50_ms']:.3f}, "
                     f"p99 {x['ttft_p99_ms']:.3f}; throughput {x['tok_s']:.2f}x; prompt tokens prefilled "
                     f"{x['prefill_tokens']:.3f}")
    lines.append(outputs_line(cmp, len(runs)))
    lines.append(f"\n{elapsed:.1f} s (warm-up {warm_s:.1f} s)")
    print("\n".join(lines))

    summary = {f"{r['mode']}_{'on' if r['cache'] else 'off'}": {k: v for k, v in r.items() if k not in ("tokens", "top")}
               for r in runs}
    report = dict(env=env, args={k: str(v) if isinstance(v, (torch.device, torch.dtype)) else v
                                 for k, v in vars(args).items()},
                  config=cfg.to_dict(), workload=dict(streams=len(work.names), names=work.names,
                                                      prompt_lens=[len(p) for p in work.prompts],
                                                      reusable_tokens=work.reusable, prompt_tokens=work.prompt_tokens),
                  runs=summary, ratios=rat, outputs=cmp, passed=cmp["passed"], warm_up_seconds=warm_s,
                  seconds=elapsed, lines=[x for x in lines if x.strip()])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    if not cmp["passed"]:
        print("FAIL: greedy outputs with the prefix cache differ from those without it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
