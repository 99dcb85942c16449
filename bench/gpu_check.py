"""One command for a lent GPU machine: check and measure everything in one short call.

On one H200 (or H100), within a budget it enforces itself (default 540 s: the device tool
runs a command for at most 10 minutes), in this order, each stage a subprocess with its own
time cap (min(its cap, what is left of the budget less a 10 s reserve for the summary)),
its output in a log, going on past a stage that fails or runs out of time:

  1 env          device, driver, torch/triton/CUDA versions, copy bandwidth (1 GiB clone,
                 bytes read + written, CUDA events, median of 30); first installs .whl/
                 (scripts/gpu_wheels.sh) into --site, which goes first on every stage's PYTHONPATH
  2 pytest       `pytest -m gpu`, the whole suite's GPU tests (its own plan cache)
  3 correctness  bench/gpu_correctness.py: a small random Llama with three PEFT adapters in mixed
                 batches, loraplex bf16 with CUDA graphs on and off, chunked prefill, and
                 `loraplex serve --enforce-eager`, against transformers + PEFT on the dequantized
                 NF4 weights (greedy agreement, |dlogp| per adapter)
  4 nf4          bench/nf4_matmul.py, Llama-2-7B shapes, M = 1, 16, 64, 2048; tunes the M buckets
                 of --tune-ms (default 1: tuning compiles ~45 GEMV and ~25-50 GEMM variants per
                 bucket, about a second each); plans go to OUT/nf4_plans.json (LORAPLEX_TUNE_CACHE
                 of every stage but pytest), which --plans seeds on a later call, so buckets tuned
                 before cost nothing and a later call can add others
  5 lora         bench/lora.py at its target points: T = 1, 64, 1024 x 1 and 64 distinct rank-16
                 adapters (uniform; target a is T = 64 x 64), the NF4 side by side (b, eager and
                 CUDA graph); (c) over these points only; the paged kernels at T = 64 x 64 and
                 x 1 only (targets d, e: paged vs the slot kernels and the byte floor); page-in of
                 a rank-8 q/v adapter vs a slot row copy (pinned -> GPU); 15 timing samples (not 30:
                 room for the paged points in the cap); --no-tune (plans from stage 4)
  6 attention    bench/attention.py at its defaults: paged prefill attention, a 2,048-token chunk
                 at contexts 4k, 32k, 128k (Llama-3.1-8B heads: 32 / 8 kv, D 128, bf16, block 16),
                 ours against gather + SDPA (and flash-attn where importable): time, TB/s, TFLOP/s
  7 e2e          bench/e2e.py reduced: 7B-shaped random NF4 model, 64 streams, 128 + 128 tokens,
                 1 and 64 distinct rank-16 adapters (uniform) and the base model, batch-1 decode,
                 the byte floor beside each, the transformers + PEFT + bitsandbytes baseline at 6
                 new tokens; its own shapes tuned at --tune-ms (kernels compiled in stage 4)
  8 prefix       bench/prefix_cache.py --device cuda --max-tokens 16: the same 7B-shaped model,
                 a shared 1,000-token system prompt over 64 streams on 8 adapters, cold and warm
                 arrivals, prefix cache off and on: TTFT and throughput on / off, hit rate, the
                 same greedy tokens with and without the cache (after stage 7: kernels compiled)
  9 hotswap      bench/hotswap.py short: 60 steps per phase in 2 blocks, 8 churn files

A stage is PASS when its command exits 0 (the benchmarks abort on a wrong result; their
performance targets are key figures, "targets 3/7 met", not the status), FAIL otherwise,
TIMEOUT at its cap (its process group is ended), SKIP when not run. Written under --out
(at most 8 files come back from the device tool; these are 5): summary.txt (the table and
each stage's figures and targets), summary.json, logs.txt (every stage's log), results.tar.gz
(logs, each benchmark's JSON, the pytest junit XML), nf4_plans.json (tuned plans). They are
rewritten after every stage, so a call cut short still brings back what ran.

Exit status 0 when every stage passed, 1 otherwise. `--dry-run` (CPU, CI): the same plumbing
on whatever device there is: stages 1-4, 6 and 8 for real (pytest -m gpu skips everything
without CUDA, stage 3 on a tiny model with the PyTorch references, stages 4, 6 and 8
--smoke), stage 5 forced to fail and stage 9 forced past a 2 s cap, stage 7 skipped (its
--smoke runs in tests/test_bench_smoke.py); exits 0 when every stage ended as planned.

Run:
    bash scripts/gpu_wheels.sh                  # on this machine: the wheels into .whl/
    device tool: carry [".whl"], timeout_s 600, command: python3 bench/gpu_check.py --out $OUT
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check      # CPU: the plumbing only
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo

BUDGET_S = 540.0
RESERVE_S = 10.0    # kept for the summary at the end
MIN_CAP_S = 5.0     # a stage with less time than this left is skipped
FORCED_TIMEOUT_CAP_S = 2.0
WHEELS = ROOT / ".whl"
DEFAULT_SITE = "/tmp/loraplex-gpu-site"
PLANS = "nf4_plans.json"
LOG_TAIL_BYTES = 2 << 20  # of each stage in logs.txt (the whole log is in results.tar.gz)

DEVICE_COMMAND = """\
device tool: `bash scripts/gpu_wheels.sh` here first, then run with
  carry ["{whl}"], timeout_s 600, command: PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT
again with the tuned plans: copy the returned nf4_plans.json to bench/out/ here, then
  carry ["{whl}", "bench/out"], command: PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT \\
      --plans bench/out/nf4_plans.json --tune-ms 16,64"""


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    cap: float       # seconds on an H200
    dry_cap: float   # seconds in --dry-run (2-core CPU)


# Caps are estimates (no stage has been timed on a GPU yet), rebalanced for nine stages within
# BUDGET_S - RESERVE_S = 530 s: the seven older stages lost 5-15 s each (env, whose pip install
# and probe are short, and hotswap the most), attention and prefix got lean caps.
STAGES = (
    Stage("env", "device, versions, copy bandwidth", 30, 60),
    Stage("pytest", "pytest -m gpu", 85, 120),
    Stage("correctness", "loraplex vs transformers + PEFT", 90, 120),
    Stage("nf4", "bench/nf4_matmul.py", 85, 120),
    Stage("lora", "bench/lora.py", 40, 60),
    Stage("attention", "bench/attention.py", 30, 60),
    Stage("e2e", "bench/e2e.py", 85, 120),
    Stage("prefix", "bench/prefix_cache.py", 45, 60),
    Stage("hotswap", "bench/hotswap.py", 40, 60),
)
DRY_FORCED = {"lora": "fail", "hotswap": "timeout"}
DRY_SKIPPED = {"e2e": "dry run: its --smoke runs in tests/test_bench_smoke.py"}


@dataclass
class Result:
    n: int
    key: str
    title: str
    status: str = "SKIP"     # PASS, FAIL, TIMEOUT, SKIP
    seconds: float = 0.0
    cap: float = 0.0
    rc: int | None = None
    reason: str = ""         # why skipped, forced, or failed beyond the exit status
    figures: str = ""        # one line for the table
    details: list[str] = field(default_factory=list)  # lines for summary.txt
    command: str = ""
    log: str = ""
    expected: str = "PASS"   # what --dry-run plans for this stage


# ----------------------------------------------------------------------------------------
# Stage 1's probe (a subprocess of its own: the parent never touches the GPU)
# ----------------------------------------------------------------------------------------


def probe_env(path: Path) -> int:
    """Versions, device and copy bandwidth as JSON; exit 1 when something needed is missing."""
    import importlib

    import torch

    from bench.nf4_matmul import copy_bandwidth, loop_timer, wall_timer

    cuda = torch.cuda.is_available()
    info: dict = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), python=sys.version.split()[0],
                      executable=sys.executable, torch=torch.__version__, cuda_runtime=torch.version.cuda,
                      cuda_available=cuda, packages={})
    problems = []
    for name in ("triton", "transformers", "peft", "safetensors", "bitsandbytes", "fastapi", "starlette",
                 "uvicorn", "pydantic", "openai", "httpx", "prometheus_client"):
        try:
            module = importlib.import_module(name)
            info["packages"][name] = f"{getattr(module, '__version__', '?')} ({Path(module.__file__).parent.parent})"
        except Exception as e:  # missing, or a broken native library
            info["packages"][name] = f"NOT IMPORTABLE: {type(e).__name__}: {e}".splitlines()[0]
            problems.append(name)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                  "clocks.max.sm,temperature.gpu,power.draw", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            info["driver"] = smi.stdout.split(",")[1].strip() if smi.returncode == 0 else "?"
        except (OSError, subprocess.TimeoutExpired, IndexError) as e:
            info["driver"] = f"? (nvidia-smi: {e})"
    else:
        info.update(device="cpu (no CUDA)", driver="-")
    device = torch.device("cuda" if cuda else "cpu")
    nbytes = (1 << 30) if cuda else (64 << 20)
    info["copy_bytes"] = nbytes
    info["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device, nbytes, loop_timer if cuda else wall_timer)
    print(json.dumps(info, indent=1))
    path.write_text(json.dumps(info, indent=1))
    if problems:
        print(f"not importable: {', '.join(problems)}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------
# What each stage runs, and the figures it reports
# ----------------------------------------------------------------------------------------


class Context:
    def __init__(self, args, out: Path, work: Path):
        self.args, self.out, self.work = args, out, work
        self.py = sys.executable
        self.site: str | None = None  # where the wheels went, once installed
        self.plans = out / PLANS

    def env(self, key: str) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        path = [p for p in (self.site, str(ROOT), env.get("PYTHONPATH")) if p]
        env["PYTHONPATH"] = os.pathsep.join(path)
        # pytest's own plan cache: the tests' shapes stay out of the benchmarks' plans
        env["LORAPLEX_TUNE_CACHE"] = str(self.work / "test_plans.json" if key == "pytest" else self.plans)
        if self.args.dry_run:
            env.pop("TRITON_INTERPRET", None)  # the plumbing, not the kernels: PyTorch references are quicker
        return env

    def json_path(self, key: str) -> Path:
        return self.work / f"{key}.json"


def stage_command(key: str, ctx: Context) -> list[str]:
    py, a, dry = ctx.py, ctx.args, ctx.args.dry_run
    out = str(ctx.json_path(key))
    if key == "env":
        return [py, str(ROOT / "bench" / "gpu_check.py"), "--probe-env", out]
    if key == "pytest":
        return [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={ctx.work / 'pytest_gpu.xml'}"]
    if key == "correctness":
        return [py, "bench/gpu_correctness.py", "--json", out] + (["--device", "cpu"] if dry else [])
    if key == "nf4":
        if dry:
            return [py, "bench/nf4_matmul.py", "--smoke", "--json", out]
        tune = ["--no-tune"] if a.tune_ms == "none" else ["--tune-ms", a.tune_ms]
        return [py, "bench/nf4_matmul.py", "--models", "llama2-7b", "--ms", "1,16,64,2048", *tune, "--json", out]
    if key == "lora":
        if dry:
            return [py, "bench/lora.py", "--smoke", "--json", out]
        return [py, "bench/lora.py", "--ts", "1,64,1024", "--distinct", "1,64", "--ranks", "16", "--assign", "uniform",
                "--paged", "targets", "--samples", "15", "--no-tune", "--json", out]
    if key == "attention":
        return [py, "bench/attention.py", *(["--smoke"] if dry else []), "--json", out]
    if key == "prefix":
        if dry:
            return [py, "bench/prefix_cache.py", "--smoke", "--out", out]
        return [py, "bench/prefix_cache.py", "--device", "cuda", "--max-tokens", "16", "--out", out]
    if key == "e2e":
        if dry:
            return [py, "bench/e2e.py", "--smoke", "--out", out]
        tune = [] if a.tune_ms == "none" else ["--tune-ms", a.tune_ms]
        return [py, "bench/e2e.py", "--adapters", "1,64", "--dist", "uniform", "--baseline-tokens", "6", *tune,
                "--out", out]
    if key == "hotswap":
        if dry:
            return [py, "bench/hotswap.py", "--smoke", "--out", out]
        return [py, "bench/hotswap.py", "--steps", "60", "--blocks", "2", "--files", "8", "--warmup-steps", "8",
                "--out", out]
    raise KeyError(key)


def forced_command(py: str, how: str) -> list[str]:
    if how == "fail":
        return [py, "-c", "import sys; print('forced failure (--dry-run)'); sys.exit(3)"]
    return [py, "-c", "import time; print('forced timeout (--dry-run): sleeping past the cap', flush=True); "
                      "time.sleep(600)"]


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bandwidth(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "-"
    return f"{bytes_per_s / 1e12:.2f} TB/s" if bytes_per_s >= 1e11 else f"{bytes_per_s / 1e9:.1f} GB/s"


def target_lines(report: dict) -> list[str]:
    lines = []
    for t in report.get("targets", []):
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        lines.append(f"{t['verdict']:<4}  {t['label']}: {value} (target {t['op']} {t['goal']:g}{t['unit']})")
    return lines


def targets_met(report: dict) -> str:
    ts = report.get("targets", [])
    return f"targets {sum(t['verdict'] == 'PASS' for t in ts)}/{len(ts)} met" if ts else "no targets judged"


def pytest_counts(xml: Path) -> dict | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def context_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens and tokens % 1024 == 0 else str(tokens)


def attention_figures(report: dict) -> tuple[str, list[str]]:
    """Ours' time over gather + SDPA's per context (< 1: ours faster), ours' effective TB/s."""
    rows = report["rows"]
    ours = [row for row in rows if row["method"] == "ours"]
    gather = {row["context"]: row for row in rows if row["method"] == "gather+SDPA"}
    ratios = []
    for row in ours:
        g = gather.get(row["context"], {})
        ratios.append(f"{context_label(row['context'])} "
                      + (g["error"] if g.get("error") else fmt(g.get("ours_over_this"), ".2f")))
    measured = [row for row in ours if row["us"] is not None]
    speed = ("ours " + ", ".join(bandwidth(row["gb_s"] * 1e9) for row in measured) + " ("
             + ", ".join(f"{row['tflop_s']:.0f}" for row in measured) + " TFLOP/s)"
             if measured else "ours not timed (no GPU)")
    errs = [row["rel_err"] for row in rows if row["rel_err"] is not None]
    line = (f"ours/gather+SDPA time {', '.join(ratios)}; {speed}; max rel err {fmt(max(errs, default=None), '.2g')}"
            + ("" if report.get("flash_mode") else "; no flash-attn"))
    details = [f"context {row['context']} chunk {row['chunk']} {row['method']}: "
               + (row["error"] or f"{fmt(row['us'], '.1f')} us, {fmt(row['gb_s'], '.0f')} GB/s, "
                  f"{fmt(row['tflop_s'], '.1f')} TFLOP/s, ours/this {fmt(row.get('ours_over_this'), '.2f')}, "
                  f"rel err {fmt(row['rel_err'], '.2g')}") for row in rows]
    if report.get("flash_missing"):
        details.append(f"flash-attn: not run ({report['flash_missing']})")
    return line, details


def prefix_figures(report: dict) -> tuple[str, list[str]]:
    """TTFT and throughput with the cache on over off, per arrival pattern; hit rates; outputs."""
    rat, runs, outs = report["ratios"], report["runs"], report["outputs"]
    modes = list(rat)
    hit = [runs.get(f"{m}_on", {}).get("hit_rate") for m in modes]
    line = (f"on/off {'/'.join(modes)}: TTFT mean "
            + ", ".join(fmt(rat[m]["ttft_mean_ms"], ".2f") for m in modes)
            + ", p99 " + ", ".join(fmt(rat[m]["ttft_p99_ms"], ".2f") for m in modes)
            + ", tok/s " + ", ".join(fmt(rat[m]["tok_s"], ".2f") for m in modes)
            + "; hit rate " + ", ".join(fmt(h and 100 * h, ".0f") + "%" for h in hit)
            + f"; outputs {outs['identical']}/{outs['streams']} identical"
            + (f", {len(outs['ties'])} near-ties" if outs["ties"] else "")
            + (f", {len(outs['mismatches'])} MISMATCHED" if outs["mismatches"] else ""))
    return line, list(report.get("lines", []))


def lora_paged_figures(report: dict) -> str:
    """The paged kernels over the slot kernels at their worst (targets d), and the page-in."""
    paged = [row["paged_over_ours"] for row in report["rows"] if row.get("paged_over_ours") is not None]
    line = f"; paged/slots <= {max(paged):.2f}" if paged else ""
    for p in report.get("page_in", []):
        names = ["paged" if x["capacity"] is None else f"row@{x['capacity']}" for x in p["paths"]]
        line += f"; page-in r{p['rank']} q/v: " + ", ".join(
            f"{name} {x['us']:.0f} us" for name, x in zip(names, p["paths"]))
    return line


def figures(r: Result, ctx: Context) -> None:
    """Fill r.figures (one line) and r.details from what the stage wrote."""
    report = load_json(ctx.json_path(r.key))
    if r.key == "env" and report:
        bw = report.get("copy_bandwidth_bytes_per_s")
        r.figures = (f"{report.get('device')}"
                     + (f" (sm {report['capability']}, {report['sms']} SMs, {report['memory_gib']} GiB)"
                        if "capability" in report else "")
                     + f", driver {report.get('driver')}, torch {report.get('torch')}, "
                       f"triton {report['packages'].get('triton', '?').split()[0]}; copy {bandwidth(bw)}")
        r.details = [f"{k}: {v}" for k, v in report["packages"].items()] + [f"nvidia-smi: {report.get('nvidia_smi', '-')}"]
    elif r.key == "pytest":
        c = pytest_counts(ctx.work / "pytest_gpu.xml")
        if c:
            r.figures = f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
            if not ctx.args.dry_run and r.status == "PASS" and c["tests"] and c["skipped"] == c["tests"]:
                r.status, r.reason = "FAIL", "every GPU test skipped: CUDA not visible to pytest"
    elif r.key == "correctness" and report:
        parts = []
        for name, run in report["runs"].items():
            if "positions" in run:
                parts.append(f"{name} {'ok' if run['passed'] else 'FAIL'} {run['agree']}/{run['positions']} "
                             f"{run['max_lp_diff']:.2g}/{run['mean_lp_diff']:.2g}")
            else:
                parts.append(f"{name} FAIL ({'; '.join(run.get('errors', []))[:80]})")
        r.figures = f"{report['dtype']}: " + ", ".join(parts) + " (agreement, max/mean dlogp)"
        r.details = report.get("lines", [])
    elif r.key == "nf4" and report:
        bw = report.get("copy_bandwidth_bytes_per_s")
        r.figures = f"{targets_met(report)}; copy {bandwidth(bw)}; {len(report['rows'])} rows"
        r.details = target_lines(report) + [
            f"{row['model']} {row['layer']} M={row['m']}: ours {row['us_ours']:.1f} us, cuBLAS {row['us_cublas']:.1f}, "
            f"bnb {fmt(row['us_bnb'], '.1f')} [{row['plan']}]" for row in report["rows"]]
    elif r.key == "lora" and report:
        a = [row for row in report["rows"] if (row["t"], row["distinct"]) == (64, 64)]
        r.figures = (f"{targets_met(report)}; {len(report['rows'])} points"
                     + (f"; T=64 x 64 adapters: x{min(row['us_loop'] / row['us_ours'] for row in a):.0f} "
                        f"over the loop at worst" if a else "") + lora_paged_figures(report))
        r.details = target_lines(report) + [f"(c) violation: {v}" for v in report.get("violations", [])]
    elif r.key == "e2e" and report:
        from bench.e2e import target_run

        head = target_run(report["ours"]["runs"], report["args"]["streams"])  # the run its targets judge
        b1 = report["ours"]["batch1"]["ms_per_token"]
        base = {c["adapters"]: c["tok_s"] for c in report["baseline"].get("cases", [])}
        r.figures = targets_met(report)
        if head:
            r.figures += (f"; {head['adapters']} adapters {head['tok_s']:.0f} tok/s (baseline "
                          f"{fmt(base.get(head['adapters']), '.1f')}), step/floor {fmt(head['step_over_floor'], '.2f')}")
        r.figures += f"; batch 1 {fmt(b1, '.2f')} ms/token"
        r.details = target_lines(report) + [
            f"{x['adapters']} adapters {x['dist']}: {x['tok_s']:.1f} tok/s, decode step {fmt(x['decode_ms'], '.2f')} ms, "
            f"floor {x['floor_ms']:.2f} ms" for x in report["ours"]["runs"]]
        if "skipped" in report["baseline"] or "error" in report["baseline"]:
            r.details.append(f"baseline: {report['baseline'].get('skipped') or report['baseline'].get('error')}")
    elif r.key == "attention" and report:
        r.figures, r.details = attention_figures(report)
    elif r.key == "prefix" and report:
        r.figures, r.details = prefix_figures(report)
    elif r.key == "hotswap" and report:
        s = report["summary"]
        r.figures = (f"{targets_met(report)}; ITL p99 churn/steady {fmt(s['itl_p99_ratio'], '.2f')}, load p99 "
                     f"{fmt(s['load_p99_ms'], '.1f')} ms, register->slot p99 {fmt(s['wall_p99_ms'], '.1f')} ms")
        r.details = target_lines(report)


# ----------------------------------------------------------------------------------------
# Running a stage
# ----------------------------------------------------------------------------------------


def run_capped(cmd: list[str], env: dict, cap: float, log_path: Path, mode: str = "w") -> tuple[str, int | None]:
    """Run `cmd` in its own process group, output to `log_path`; end the whole group at `cap`."""
    with open(log_path, mode) as log:
        log.write(f"$ {shlex.join(cmd)}\n# cap {cap:.0f} s, started {datetime.datetime.now():%H:%M:%S}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return ("PASS" if proc.wait(timeout=cap) == 0 else "FAIL"), proc.returncode
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.write(f"\n# TIMEOUT: ended after the {cap:.0f} s cap\n")
            return "TIMEOUT", None


def install_wheels(ctx: Context, log_path: Path, cap: float) -> tuple[bool, str]:
    """pip install .whl/*.whl into --site (no index, no deps): (ok, a line saying what happened)."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return True, f"no {WHEELS.name}/ wheels: fastapi, uvicorn, bitsandbytes, openai ... must be importable already"
    if ctx.args.dry_run:
        return True, (f"{len(wheels)} wheels in {WHEELS.name}/, not installed (dry run: they are for CPython 3.12 on "
                      "the GPU machine)")
    site = ctx.args.site
    shutil.rmtree(site, ignore_errors=True)
    cmd = [ctx.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", site, *map(str, wheels)]
    status, rc = run_capped(cmd, dict(os.environ), cap, log_path)
    if status != "PASS":
        return False, f"pip install of {len(wheels)} wheels into {site}: {status} (rc {rc}, see 0_pip_install.log)"
    ctx.site = site
    return True, f"installed {len(wheels)} wheels into {site} (first on every stage's PYTHONPATH)"


def run_stage(n: int, stage: Stage, ctx: Context, deadline: float) -> Result:
    a = ctx.args
    r = Result(n, stage.key, stage.title, log=f"{n}_{stage.key}.log")
    log_path = ctx.work / r.log
    if stage.key not in a.only or stage.key in a.skip:
        r.reason = "not selected (--only/--skip)"
        r.expected = "SKIP"
        return r
    if a.dry_run and stage.key in DRY_SKIPPED:
        r.reason, r.expected = DRY_SKIPPED[stage.key], "SKIP"
        return r
    forced = a.force.get(stage.key)
    own = a.caps.get(stage.key, stage.dry_cap if a.dry_run else stage.cap)
    if forced == "timeout":
        own = min(own, FORCED_TIMEOUT_CAP_S)
    started = time.monotonic()
    r.cap = round(min(own, deadline - started - RESERVE_S), 1)
    if r.cap < MIN_CAP_S and forced != "timeout":
        r.reason = f"no time left ({r.cap:.0f} s of the budget)"
        r.expected = "SKIP"
        return r
    notes, installed = [], True
    if stage.key == "env":
        installed, note = install_wheels(ctx, ctx.work / "0_pip_install.log", r.cap)
        notes.append(note)
    cmd = forced_command(ctx.py, forced) if forced else stage_command(stage.key, ctx)
    r.command = shlex.join(cmd)
    r.status, r.rc = run_capped(cmd, ctx.env(stage.key), r.cap - (time.monotonic() - started), log_path)
    if not installed and r.status == "PASS":
        r.status = "FAIL"
    r.seconds = round(time.monotonic() - started, 1)
    if forced:
        notes.append(f"forced {forced} (--dry-run)")
        r.expected = {"fail": "FAIL", "timeout": "TIMEOUT"}[forced]
    try:
        figures(r, ctx)
    except Exception as e:  # a report of an unexpected shape: say so, keep going
        notes.append(f"figures unreadable ({type(e).__name__}: {e})")
    if r.status == "FAIL" and r.rc not in (None, 0) and not r.reason:
        r.reason = f"exit status {r.rc}"
    r.reason = "; ".join(x for x in [r.reason, *notes] if x)
    return r


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------


def table(results: list[Result]) -> list[str]:
    from bench.nf4_matmul import markdown

    body = [[f"{r.n} {r.key}", r.status, f"{r.seconds:.1f}", f"{r.cap:.0f}",
             "; ".join(x for x in (r.figures, r.reason) if x)] for r in results]
    return markdown(["stage", "status", "seconds", "cap", "key figures"], body, numeric={2, 3})


def write_outputs(results: list[Result], ctx: Context, started: float, header: list[str]) -> list[str]:
    """summary.txt, summary.json, logs.txt, results.tar.gz (and nf4_plans.json, written by the stages)."""
    out, work = ctx.out, ctx.work
    lines = [*header, "", *table(results), ""]
    for r in results:
        if r.details:
            lines += [f"## {r.n} {r.key}: {r.title}", *r.details, ""]
    lines.append(f"plans: {ctx.plans.name} {'written' if ctx.plans.exists() else 'none (nothing tuned)'}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    summary = dict(header=header, dry_run=ctx.args.dry_run, budget_s=ctx.args.budget,
                   elapsed_s=round(time.monotonic() - started, 1), stages=[asdict(r) for r in results],
                   passed=all(r.status == "PASS" for r in results),
                   as_planned=all(r.status == r.expected for r in results), plans=ctx.plans.exists())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "logs.txt", "w") as f:
        for log in sorted(work.glob("*.log")):
            data = log.read_bytes()
            cut = len(data) > LOG_TAIL_BYTES
            f.write(f"\n===== {log.name}{' (last 2 MiB)' if cut else ''} =====\n")
            f.write(data[-LOG_TAIL_BYTES:].decode(errors="replace"))
    tmp = out / "results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.iterdir()):
            tar.add(path, arcname=f"results/{path.name}")
        readme = "\n".join(lines).encode()
        info = tarfile.TarInfo("results/summary.txt")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    tmp.replace(out / "results.tar.gz")
    return lines


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = [s.key for s in STAGES]
    p.add_argument("--out", type=Path, help="output folder (created; on the device machine: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU: the plumbing, one forced failure and one forced timeout")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S:.0f})")
    p.add_argument("--plans", type=Path, help="a previous run's nf4_plans.json: seeds the plan cache")
    p.add_argument("--tune-ms", default="1",
                   help="M buckets to tune in stages 4 and 7 (default 1; e.g. 16,64 on a call with --plans; "
                        "'none' = --no-tune); buckets already in the plans cost nothing")
    p.add_argument("--only", default=",".join(keys), help=f"stages to run, of {','.join(keys)}")
    p.add_argument("--skip", default="", help="stages not to run")
    p.add_argument("--caps", default="", help="per-stage caps in seconds, e.g. nf4=200,e2e=60")
    p.add_argument("--site", default=DEFAULT_SITE, help=f"where .whl/ is installed (default {DEFAULT_SITE})")
    p.add_argument("--probe-env", type=Path, help=argparse.SUPPRESS)  # stage 1's subprocess
    p.add_argument("--force", action="append", default=None, help=argparse.SUPPRESS)  # STAGE=fail|timeout
    args = p.parse_args(argv)
    if args.probe_env is None and args.out is None:
        p.error("--out is required")

    def stage_set(text: str) -> set[str]:
        names = {x.strip() for x in text.split(",") if x.strip()}
        if names - set(keys):
            p.error(f"unknown stage(s) {sorted(names - set(keys))}; choose from {', '.join(keys)}")
        return names

    args.only, args.skip = stage_set(args.only), stage_set(args.skip)
    try:
        args.caps = {k: float(v) for k, v in (x.split("=") for x in args.caps.split(",") if x.strip())}
        forced = dict(x.split("=") for x in args.force) if args.force is not None else (DRY_FORCED if args.dry_run else {})
    except ValueError:
        p.error("--caps takes STAGE=SECONDS,...")
    stage_set(",".join(args.caps))
    stage_set(",".join(forced))
    if any(v not in ("fail", "timeout") for v in forced.values()):
        p.error("--force takes STAGE=fail or STAGE=timeout")
    args.force = forced
    if args.tune_ms != "none" and not all(x.strip().isdigit() for x in args.tune_ms.split(",")):
        p.error("--tune-ms takes M values like 1,16 or 'none'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_env is not None:
        return probe_env(args.probe_env)
    started = time.monotonic()
    deadline = started + args.budget
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loraplex-gpu-check-"))  # outside --out: at most 8 files come back
    ctx = Context(args, out, work)
    device_line = DEVICE_COMMAND.format(whl=WHEELS.name)
    header = [f"# gpu_check {'DRY RUN (CPU plumbing; figures mean nothing)' if args.dry_run else ''}".rstrip()
              + f", {datetime.datetime.now().isoformat(timespec='seconds')}, budget {args.budget:.0f} s",
              *device_line.splitlines()]
    print("\n".join(header), flush=True)
    if args.plans is not None:
        if not args.plans.exists():
            print(f"--plans {args.plans}: no such file; tuning from scratch", flush=True)
        elif args.plans.resolve() != ctx.plans:
            shutil.copyfile(args.plans, ctx.plans)
            print(f"plan cache seeded from {args.plans}", flush=True)
    results: list[Result] = []
    try:
        for n, stage in enumerate(STAGES, 1):
            print(f"[{time.monotonic() - started:5.0f} s] stage {n} {stage.key}: {stage.title} ...", flush=True)
            r = run_stage(n, stage, ctx, deadline)
            results.append(r)
            print(f"[{time.monotonic() - started:5.0f} s]   {r.status} in {r.seconds:.1f} s (cap {r.cap:.0f}) "
                  f"{r.figures} {r.reason}".rstrip(), flush=True)
            write_outputs(results, ctx, started, header)
        lines = write_outputs(results, ctx, started, header)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    print("\n" + "\n".join(lines))
    ok = all(r.status == r.expected for r in results) if args.dry_run else all(r.status == "PASS" for r in results)
    print(f"\n{'dry run ' if args.dry_run else ''}{'as planned' if args.dry_run and ok else 'PASS' if ok else 'FAIL'}"
          f" in {elapsed:.0f} s of {args.budget:.0f}; wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
