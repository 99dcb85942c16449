"""Correctness of the whole serving path against transformers + PEFT, for mixed batches.

A small random Llama (built with transformers in a temporary directory, tests/factory.py)
and three PEFT adapters of different ranks and targets (factory's "all": rank 8 on every
linear; "attn": rank 4 on q/v; "pattern": rank 16 with per-module ranks and alphas and
rsLoRA) run through loraplex, several ways:

    engine-graphs    Engine, decode CUDA graphs on (CUDA only)
    engine-eager     Engine, no CUDA graphs (cuda_graph_max_batch=0)
    engine-chunked   Engine, graphs as the device allows, max_num_batched_tokens=32: prompt
                     chunks share steps with decodes
    serve-eager      `loraplex serve --enforce-eager --max-num-batched-tokens 32` on
                     loopback (the adapter registry's path), greedy /v1/completions

Each time the same eight requests, two per adapter and two on the base model, are
submitted at once so every step mixes them: greedy, ignore_eos, logprobs of the top 5.

The reference is transformers' LlamaForCausalLM + PEFT in fp32 on the weights loraplex
holds: every linear is `dequantize_nf4` of loraplex's own NF4 weight; the embedding,
norms, lm_head and LoRA A/B are rounded to loraplex's dtype. Only kernel and engine
arithmetic differ. For each request the reference runs teacher-forced on loraplex's own
tokens (prompt + generated), so every position is compared even after a near tie:

    agreement    positions where loraplex's token is the reference's argmax
    wrong        positions where the reference prefers another token by more than `margin`
                 (a near tie may flip in bf16; a clear preference may not)
    max |dlogp|  largest difference of log-probabilities over the chosen and top-5 tokens
                 (log-probabilities are the logits less one log-sum-exp per position)

    mean |dlogp|  the same on average (the worst adapter's): catches a small systematic error
    effect       the reference's mean |logprob(adapter) - logprob(base)|: an adapter must
                 matter (>= 3x the mean tolerance) for the check to see it applied

A run passes when no position is wrong and both |dlogp| figures are within tolerance (bf16:
max 0.5, mean 0.1, margin 0.5; fp32: 2e-3, 2e-4, 2e-3). The adapters' B is scaled by 0.05
(`scale_lora_b`) and the tokenizer replaced by a word-level one ("t17" is token 17) so that
the server's per-token texts give back token ids exactly.

Run:
    python bench/gpu_correctness.py --json out.json             # CUDA: bf16, Triton kernels
    python bench/gpu_correctness.py --device cpu --json out.json  # CPU: fp32, PyTorch references
Exit status 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo

from loraplex.adapters.peft_format import read_peft_adapter  # noqa: E402
from loraplex.engine.adapters import StaticAdapters  # noqa: E402
from loraplex.engine.engine import Engine, EngineConfig  # noqa: E402
from loraplex.engine.request import Request  # noqa: E402
from loraplex.engine.sampling import SamplingParams  # noqa: E402
from loraplex.kernels import runtime  # noqa: E402
from loraplex.kernels.nf4 import dequantize_nf4  # noqa: E402
from loraplex.model.loader import load_model  # noqa: E402

from bench.e2e import synthetic_tokenizer  # noqa: E402
from tests.factory import ADAPTERS, make_adapter, make_model  # noqa: E402

SIZES = {  # make_model arguments; "small" has a real head_dim (64) and grouped-query attention
    "tiny": dict(hidden=64, layers=2),
    "small": dict(hidden=256, layers=3, num_attention_heads=4, num_key_value_heads=2),
}
PROMPT_LENS = (5, 37, 12, 64, 9, 30, 17, 48)  # two per adapter and two on the base model
TOP_K = 5
CHUNK_TOKENS = 32  # max_num_batched_tokens of the chunked runs
MAX_RANK = 16


LORA_B_SCALE = 0.05  # on factory's adapters: see build_fixture


@dataclass(frozen=True)
class Tolerance:
    max_lp: float   # max |logprob - reference| over the chosen and top-k tokens of every position
    mean_lp: float  # mean of the same: a small systematic error (a scaling off by 10%) shows here
    margin: float   # a token the reference ranks this far below its argmax is wrong


# bf16: on the 2-core CPU (PyTorch references in bf16, "small" model, 2026-12-01) the chosen
# tokens' |dlogp| reached 0.16 at most and 0.05 on average per request; the adapters move
# the reference's logprobs by 0.4-1.8 on average (see `adapter_effect` in the report).
TOLERANCES = {torch.bfloat16: Tolerance(0.5, 0.1, 0.5), torch.float16: Tolerance(0.25, 0.05, 0.25),
              torch.float32: Tolerance(2e-3, 2e-4, 2e-3)}


@dataclass
class Output:
    """One request's generated tokens and, per position, the chosen token's logprob and the top k."""

    adapter: str | None
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# The model, adapters and requests
# ----------------------------------------------------------------------------------------


def build_fixture(root: Path, size: str) -> dict:
    """A random Llama and the three factory adapters in `root`; returns their paths."""
    model_dir = root / "model"
    hf = make_model(model_dir, "llama", **SIZES[size])
    # ids must survive the HTTP API's per-token texts: "t17" decodes from and maps back to 17
    synthetic_tokenizer(hf.config.vocab_size).save_pretrained(model_dir)
    adapters = {name: make_adapter(model_dir, root / "adapters" / name, name, seed=i + 1)
                for i, name in enumerate(ADAPTERS)}
    for path in adapters.values():
        scale_lora_b(path, LORA_B_SCALE)
    return dict(model=model_dir, adapters=adapters, vocab=hf.config.vocab_size, size=size,
                config={k: getattr(hf.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "num_key_value_heads",
                                                           "vocab_size")})


def scale_lora_b(adapter_dir: Path, factor: float) -> None:
    """Scale every lora_B of a PEFT adapter file in place. Factory's B (randn * 0.2) with the
    pattern adapter's rsLoRA scalings (8 and 16) saturates attention: bf16 rounding then
    moves logprobs by up to 3.6 in a teacher-forced position, and nothing can be checked.
    With B * 0.05 the adapters still change most greedy tokens of the base model."""
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, path, metadata={"format": "pt"})


def make_requests(fixture: dict, seed: int = 0) -> list[Output]:
    gen = torch.Generator().manual_seed(seed)
    names = [None, *fixture["adapters"]]
    return [Output(names[i % len(names)], torch.randint(3, fixture["vocab"], (n,), generator=gen).tolist())
            for i, n in enumerate(PROMPT_LENS)]


# ----------------------------------------------------------------------------------------
# loraplex: the engine in this process, and `loraplex serve`
# ----------------------------------------------------------------------------------------


def run_engine(fixture: dict, requests: list[Output], device: torch.device, dtype: torch.dtype, max_tokens: int,
               graphs: bool, max_num_batched_tokens: int = 2048, perturb: float = 0.0) -> tuple[list[Output], dict]:
    """All requests submitted at once to a fresh engine (after `warm_up`), stepped until done.
    `perturb` scales the final norm's weight by (1 + perturb): a wrong model, for tests."""
    loaded = load_model(fixture["model"], dtype=dtype, device=device, progress=False)
    if perturb:
        loaded.model.norm.weight.data.mul_(1 + perturb)
    adapters = StaticAdapters(loaded.model, {n: read_peft_adapter(p) for n, p in fixture["adapters"].items()},
                              max_rank=MAX_RANK)
    engine = Engine(loaded.model, loaded.tokenizer, adapters,
                    EngineConfig(max_num_seqs=16, max_num_batched_tokens=max_num_batched_tokens,
                                 kv_cache_tokens=4096, cuda_graph_max_batch=16 if graphs else 0))
    engine.warm_up(list(fixture["adapters"]))
    outs = [Output(r.adapter, r.prompt) for r in requests]

    def collect(out: Output):
        def on_output(o):
            for lp in o.logprobs or []:
                out.tokens.append(lp.token_id)
                out.logprobs.append(lp.logprob)
                out.top.append([(int(t), float(v)) for t, v in lp.top])
        return on_output

    for i, out in enumerate(outs):
        engine.add_request(Request(f"r{i}", list(out.prompt), SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=TOP_K), out.adapter,
            on_output=collect(out)))
    steps = mixed = 0
    while engine.has_work():
        engine.step()
        sched = engine.last_step
        steps += 1
        mixed += bool(sched.prefills) and bool(sched.decodes)
    info = dict(steps=steps, steps_prefill_and_decode=mixed, cuda_graphs=getattr(engine.runner, "graphs", None) is not None,
                max_num_batched_tokens=max_num_batched_tokens)
    del engine, adapters, loaded
    return outs, info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_flags() -> set[str]:
    """The flags `loraplex serve --help` lists (some are newer than this script)."""
    text = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "200"}, timeout=120).stdout
    return {w for w in text.replace(",", " ").split() if w.startswith("--")}


def run_server(fixture: dict, requests: list[Output], device: torch.device, dtype: torch.dtype, max_tokens: int,
               log_path: Path, ready_timeout: float = 240.0) -> tuple[list[Output], dict]:
    """`loraplex serve --enforce-eager --max-num-batched-tokens 32` on loopback; one completion
    request per adapter (its prompts as token ids), all at once."""
    import httpx

    known = serve_flags()
    wanted = {"--enforce-eager": [], "--max-num-batched-tokens": [str(CHUNK_TOKENS)]}
    missing = [f for f in wanted if f not in known]
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(fixture["model"]),
           "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--device", device.type,
           "--dtype", {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype],
           "--kv-cache-tokens", "4096", "--max-num-seqs", "16", "--max-rank", str(MAX_RANK),
           "--max-gpu-adapters", str(len(fixture["adapters"]) + 1), "--log-level", "warning"]
    for name, path in fixture["adapters"].items():
        cmd += ["--adapter", f"{name}={path}"]
    for flag, values in wanted.items():
        if flag in known:
            cmd += [flag, *values]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if device.type != "cuda":
        env["LORAPLEX_KERNELS"] = "reference"  # the interpreter would take minutes for a whole model
    url = f"http://127.0.0.1:{port}"
    # same process group as this script: whoever kills the group (gpu_check's stage cap) ends the server too
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT) as proc:
        try:
            started = time.monotonic()
            while True:
                try:
                    if httpx.get(url + "/ready", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"loraplex serve exited with {proc.returncode} before /ready; see {log_path}")
                if time.monotonic() - started > ready_timeout:
                    raise RuntimeError(f"loraplex serve not ready after {ready_timeout:.0f} s; see {log_path}")
                time.sleep(0.2)
            ready_s = time.monotonic() - started
            vocab = synthetic_tokenizer(fixture["vocab"]).get_vocab()
            by_adapter: dict[str | None, list[int]] = {}
            for i, r in enumerate(requests):
                by_adapter.setdefault(r.adapter, []).append(i)
            outs = [Output(r.adapter, r.prompt) for r in requests]

            def complete(adapter, rows):
                body = {"model": adapter or "base", "prompt": [requests[i].prompt for i in rows],
                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": TOP_K}
                r = httpx.post(url + "/v1/completions", json=body, timeout=300)
                r.raise_for_status()
                for choice in r.json()["choices"]:
                    out, lp = outs[rows[choice["index"]]], choice["logprobs"]
                    out.tokens = [vocab.get(t, -1) for t in lp["tokens"]]
                    out.logprobs = list(lp["token_logprobs"])
                    out.top = [[(vocab.get(t, -1), v) for t, v in top.items()] for top in lp["top_logprobs"]]

            with concurrent.futures.ThreadPoolExecutor(len(by_adapter)) as pool:
                for f in [pool.submit(complete, a, rows) for a, rows in by_adapter.items()]:
                    f.result()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    info = dict(ready_seconds=round(ready_s, 1), flags_missing=missing, exit_code=proc.returncode,
                max_num_batched_tokens=CHUNK_TOKENS if "--max-num-batched-tokens" in known else None)
    return outs, info


# ----------------------------------------------------------------------------------------
# The reference: transformers + PEFT, fp32, on loraplex's own (dequantized) weights
# ----------------------------------------------------------------------------------------


class Reference:
    """Teacher-forced log-probabilities of transformers + PEFT for (prompt + tokens, adapter)."""

    def __init__(self, fixture: dict, dtype: torch.dtype, device: torch.device):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        loaded = load_model(fixture["model"], dtype=dtype, device=device, progress=False)
        hf = AutoModelForCausalLM.from_pretrained(fixture["model"], dtype=torch.float32).to(device).eval()
        replaced = set()
        for path, linear in loaded.model.linears().items():  # "layers.3.self_attn.qkv_proj"
            layer = path.split(".")[1]
            for name, part in zip(linear.names, linear.parts):  # "self_attn.q_proj", its NF4 weight
                module = hf.get_submodule(f"model.layers.{layer}.{name}")
                module.weight.data = dequantize_nf4(part, torch.float32).to(device)
                replaced.add(f"model.layers.{layer}.{name}.weight")
        for name, p in hf.named_parameters():  # embedding, norms, lm_head: as loraplex holds them
            if name not in replaced:
                p.data = p.data.to(dtype).float()
        del loaded
        names = list(fixture["adapters"])
        peft = PeftModel.from_pretrained(hf, fixture["adapters"][names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(fixture["adapters"][name], adapter_name=name)
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype).float()  # loraplex's slots hold A and B in its dtype
        self.peft, self.device = peft.eval(), device
        self._memo: dict[tuple, torch.Tensor] = {}

    @torch.inference_mode()
    def logprobs(self, out: Output) -> torch.Tensor:
        """[len(tokens), V] log-probabilities of each generated position, on the CPU."""
        key = (out.adapter, tuple(out.prompt), tuple(out.tokens))
        if key not in self._memo:
            seq = out.prompt + out.tokens[:-1]
            ids = torch.tensor([seq], device=self.device).clamp(min=0)
            if out.adapter is None:
                with self.peft.disable_adapter():
                    logits = self.peft(input_ids=ids).logits
            else:
                self.peft.set_adapter(out.adapter)
                logits = self.peft(input_ids=ids).logits
            self._memo[key] = torch.log_softmax(logits[0, len(out.prompt) - 1:].float(), dim=-1).cpu()
        return self._memo[key]


# ----------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------


def compare(out: Output, ref: torch.Tensor, tol: Tolerance, max_tokens: int) -> dict:
    """One request against its reference log-probabilities [len(tokens), V]."""
    n = len(out.tokens)
    if n != max_tokens or len(out.logprobs) != n or len(out.top) != n or ref.shape[0] != n:
        return dict(positions=n, agree=0, wrong=max(n, 1), max_lp_diff=float("inf"), sum_lp_diff=float("inf"),
                    pairs=1, error=f"{n} tokens, {len(out.logprobs)} logprobs, {len(out.top)} top lists; "
                                   f"expected {max_tokens} of each")
    agree = wrong = pairs = 0
    worst = total = 0.0
    vocab = ref.shape[1]
    for i, token in enumerate(out.tokens):
        row = ref[i]
        if not 0 <= token < vocab:
            wrong += 1
            continue
        best = int(row.argmax())
        agree += token == best
        wrong += float(row[best] - row[token]) > tol.margin
        for t, lp in [(token, out.logprobs[i]), *out.top[i]]:
            diff = abs(lp - float(row[t])) if 0 <= t < vocab and lp is not None else float("inf")
            diff = diff if diff == diff else float("inf")  # NaN counts as infinitely wrong
            worst, total, pairs = max(worst, diff), total + diff, pairs + 1
    return dict(positions=n, agree=agree, wrong=wrong, max_lp_diff=worst, sum_lp_diff=total, pairs=pairs)


def adapter_effect(out: Output, reference: Reference) -> float:
    """Mean |logprob(adapter) - logprob(base)| of the reference on this request's positions."""
    if out.adapter is None or not out.tokens:
        return 0.0
    mine, base = reference.logprobs(out), reference.logprobs(Output(None, out.prompt, out.tokens))
    return float((mine - base).abs().mean())


def judge(outs: list[Output], reference: Reference, tol: Tolerance, max_tokens: int) -> dict:
    """Per adapter (base = "-") and for the whole run: agreement, wrong tokens, max and mean
    |dlogp|, and how much the adapter moves the reference (it must matter to be checked)."""
    per: dict[str, dict] = {}
    errors = []
    keys = ("positions", "agree", "wrong", "sum_lp_diff", "pairs")
    for out in outs:
        c = compare(out, reference.logprobs(out) if out.tokens else torch.empty(0, 1), tol, max_tokens)
        if "error" in c:
            errors.append(f"{out.adapter or 'base'}: {c['error']}")
        a = per.setdefault(out.adapter or "-", dict.fromkeys(keys, 0) | dict(requests=0, max_lp_diff=0.0, effect=0.0))
        a["requests"] += 1
        for k in keys:
            a[k] += c[k]
        a["max_lp_diff"] = max(a["max_lp_diff"], c["max_lp_diff"])
        a["effect"] += adapter_effect(out, reference) / 2  # two requests per adapter
    for a in per.values():
        a["mean_lp_diff"] = a.pop("sum_lp_diff") / max(1, a.pop("pairs"))
    total = {k: sum(a[k] for a in per.values()) for k in ("positions", "agree", "wrong")}
    total["max_lp_diff"] = max(a["max_lp_diff"] for a in per.values())
    total["mean_lp_diff"] = max(a["mean_lp_diff"] for a in per.values())  # the worst adapter's mean
    weak = [name for name, a in per.items() if name != "-" and a["effect"] < 3 * tol.mean_lp]
    if weak:
        errors.append(f"adapters {weak} move the reference too little to be checked")
    ok = (not errors and total["wrong"] == 0 and total["max_lp_diff"] <= tol.max_lp
          and total["mean_lp_diff"] <= tol.mean_lp)
    return dict(passed=ok, **total, agreement=total["agree"] / max(1, total["positions"]), per_adapter=per,
                errors=errors)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def run_check(device: torch.device, dtype: torch.dtype, size: str, max_tokens: int, server: bool,
              root: Path, perturb: float = 0.0) -> dict:
    """Every run against the reference; the report as a dict (see the module docstring)."""
    started = time.perf_counter()
    tol = TOLERANCES[dtype]
    fixture = build_fixture(root, size)
    requests = make_requests(fixture)
    cuda = device.type == "cuda"
    plans = [("engine-graphs", dict(graphs=True))] if cuda else []
    plans += [("engine-eager", dict(graphs=False)),
              ("engine-chunked", dict(graphs=cuda, max_num_batched_tokens=CHUNK_TOKENS))]
    runs: dict[str, dict] = {}
    results: dict[str, list[Output]] = {}
    # the CPU runs the PyTorch references (the interpreter would take minutes for whole models)
    with runtime.reference_kernels() if not cuda else contextlib.nullcontext():
        for name, kw in plans:
            t0 = time.perf_counter()
            try:
                results[name], info = run_engine(fixture, requests, device, dtype, max_tokens, perturb=perturb, **kw)
                runs[name] = dict(info=info)
            except Exception as e:  # report it and go on with the other runs
                runs[name] = dict(passed=False, errors=[f"{type(e).__name__}: {e}".splitlines()[0]])
            runs[name]["seconds"] = round(time.perf_counter() - t0, 2)
            print(f"[{time.perf_counter() - started:.0f} s] {name} ran", flush=True)
        if server:
            t0 = time.perf_counter()
            try:
                results["serve-eager"], info = run_server(fixture, requests, device, dtype, max_tokens,
                                                          root / "serve.log")
                runs["serve-eager"] = dict(info=info)
            except Exception as e:
                runs["serve-eager"] = dict(passed=False, errors=[f"{type(e).__name__}: {e}".splitlines()[0]])
            runs["serve-eager"]["seconds"] = round(time.perf_counter() - t0, 2)
            log = root / "serve.log"
            runs["serve-eager"]["log_tail"] = log.read_text()[-3000:] if log.exists() else ""
            print(f"[{time.perf_counter() - started:.0f} s] serve-eager ran", flush=True)
        reference = Reference(fixture, dtype, device)
        for name, outs in results.items():
            runs[name].update(judge(outs, reference, tol, max_tokens))
            if name == "serve-eager" and runs[name]["info"]["flags_missing"] and cuda:
                runs[name]["passed"] = False  # on CUDA the eager server path is the point
                runs[name]["errors"].append(f"loraplex serve lacks {runs[name]['info']['flags_missing']}")
    eager = results.get("engine-eager")
    for name, outs in results.items():  # informative: same tokens as the eager engine?
        if eager is not None and name != "engine-eager":
            same = sum(a.tokens == b.tokens for a, b in zip(outs, eager))
            runs[name]["same_tokens_as_engine_eager"] = f"{same}/{len(outs)} requests"
    return dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", dtype=str(dtype).removeprefix("torch."),
                kernels="Triton" if cuda and runtime.use_triton(device) else "PyTorch reference",
                model=fixture["config"], adapters={n: ADAPTERS[n] for n in fixture["adapters"]},
                requests=[dict(adapter=r.adapter, prompt_len=len(r.prompt)) for r in requests],
                max_tokens=max_tokens, top_k=TOP_K, tolerance=asdict(tol), perturb=perturb, runs=runs,
                passed=all(r.get("passed") for r in runs.values()), seconds=round(time.perf_counter() - started, 1))


def report_lines(report: dict) -> list[str]:
    tol = report["tolerance"]
    lines = [f"# correctness vs transformers + PEFT (fp32, loraplex's NF4 weights dequantized): {report['device']}, "
             f"{report['dtype']}, {report['kernels']} kernels; {len(report['requests'])} requests over "
             f"base + {', '.join(report['adapters'])}, {report['max_tokens']} greedy tokens each",
             f"tolerance: |dlogp| max <= {tol['max_lp']:g}, mean <= {tol['mean_lp']:g}; a token the reference "
             f"ranks > {tol['margin']:g} below its argmax is wrong. Per adapter: agreement, max / mean |dlogp|, "
             "(adapter's effect on the reference)"]
    for name, r in report["runs"].items():
        if "positions" not in r:
            lines.append(f"FAIL  {name}: {'; '.join(r['errors'])}")
            continue
        per = "  ".join(f"{a}: {v['agree']}/{v['positions']} {v['max_lp_diff']:.2g}/{v['mean_lp_diff']:.2g}"
                        + (f" ({v['effect']:.2g})" if a != "-" else "") for a, v in r["per_adapter"].items())
        lines.append(f"{'PASS' if r['passed'] else 'FAIL'}  {name:<15} agreement {r['agree']}/{r['positions']}, "
                     f"wrong {r['wrong']}, |dlogp| max {r['max_lp_diff']:.3g} mean {r['mean_lp_diff']:.3g}  [{per}]"
                     + (f"  ERRORS: {'; '.join(r['errors'])}" if r["errors"] else ""))
    lines.append(f"{'PASS' if report['passed'] else 'FAIL'}: {sum(r.get('passed', False) for r in report['runs'].values())}"
                 f"/{len(report['runs'])} runs passed in {report['seconds']:.1f} s")
    return lines


def parse_args(argv: list[str] | None = None):
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="loraplex's activation dtype: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--size", choices=list(SIZES), default=None, help="model size (default small on CUDA, tiny on CPU)")
    p.add_argument("--max-tokens", type=int, default=None, help="greedy tokens per request (default 24; CPU 8)")
    p.add_argument("--no-server", action="store_true", help="skip the `loraplex serve` run")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--perturb", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a wrong model must fail
    args = p.parse_args(argv)
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = args.device.type == "cuda"
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda else "fp32"
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.size = args.size or ("small" if cuda else "tiny")
    args.max_tokens = args.max_tokens or (24 if cuda else 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.type != "cuda":
        torch.set_num_threads(1)  # a tiny model; on a shared small CPU, OpenMP teams spin-wait each other
    with tempfile.TemporaryDirectory(prefix="loraplex-correctness-") as tmp:
        report = run_check(args.device, args.dtype, args.size, args.max_tokens, not args.no_server, Path(tmp),
                           perturb=args.perturb)
    report["lines"] = report_lines(report)
    print("\n".join(report["lines"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
