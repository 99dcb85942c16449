"""bench/gpu_check.py's plumbing on CPU (--dry-run), and the correctness stage's comparison.

The dry run exercises what the GPU call will do (stage order, caps, a forced failure and a
forced timeout that do not stop later stages, the files under --out, the summary table);
the correctness module is checked to pass on a right model and to fail on wrong outputs.
"""

import copy
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from bench import gpu_check
from bench import gpu_correctness as gc
from loraplex.kernels import runtime

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["env", "pytest", "correctness", "nf4", "lora", "attention", "e2e", "prefix", "hotswap"]


def test_stage_caps_fit_the_budget():
    assert [s.key for s in gpu_check.STAGES] == STAGES
    assert sum(s.cap for s in gpu_check.STAGES) + gpu_check.RESERVE_S <= gpu_check.BUDGET_S <= 570  # device: 600 s


def test_dry_run_runs_every_stage_in_order_past_a_failure_and_a_timeout(tmp_path):
    seed = tmp_path / "previous_plans.json"  # a previous call's tuned plans, handed back with --plans
    seed.write_text(json.dumps({"NVIDIA H200|triton-3.6.0|bfloat16|4096x4096|m1": {"kind": "gemv", "block_n": 16}}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
                             "--plans", str(seed)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert [s["key"] for s in stages] == STAGES and [s["n"] for s in stages] == list(range(1, 10))
    status = {s["key"]: s["status"] for s in stages}
    assert status == dict(env="PASS", pytest="PASS", correctness="PASS", nf4="PASS", lora="FAIL", attention="PASS",
                          e2e="SKIP", prefix="PASS", hotswap="TIMEOUT")
    assert summary["as_planned"] and not summary["passed"] and summary["dry_run"]
    by_key = {s["key"]: s for s in stages}
    assert by_key["hotswap"]["cap"] == 2 and 2 <= by_key["hotswap"]["seconds"] < 15  # ended at its cap
    assert by_key["lora"]["rc"] == 3 and "forced fail" in by_key["lora"]["reason"]
    assert all(0 < s["cap"] <= summary["budget_s"] for s in stages if s["status"] != "SKIP")
    assert "skipped" in by_key["pytest"]["figures"]  # no CUDA: every gpu test skips
    for run in ("engine-eager", "engine-chunked", "serve-eager"):
        assert f"{run} ok" in by_key["correctness"]["figures"]
    # the new stages' one-line figures: smoke contexts 0, 37, 130 (untimed on CPU); cache on/off
    assert "ours/gather+SDPA time 0 " in by_key["attention"]["figures"]
    assert "ours not timed (no GPU)" in by_key["attention"]["figures"]
    assert "on/off cold/warm: TTFT mean " in by_key["prefix"]["figures"]
    assert "outputs 8/8 identical" in by_key["prefix"]["figures"]
    assert "--smoke" in by_key["attention"]["command"] and "--smoke" in by_key["prefix"]["command"]

    # what comes back from the device tool: a few files (8 at most), the plans carried through
    assert sorted(p.name for p in out.iterdir()) == ["logs.txt", "nf4_plans.json", "results.tar.gz", "summary.json",
                                                     "summary.txt"]
    assert json.loads((out / "nf4_plans.json").read_text()) == json.loads(seed.read_text())
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {f"{i}_{k}.log" for i, k in enumerate(STAGES, 1) if k != "e2e"} <= names
    assert {"env.json", "correctness.json", "nf4.json", "attention.json", "prefix.json", "pytest_gpu.xml",
            "summary.txt"} <= names
    logs = (out / "logs.txt").read_text()
    assert "forced failure" in logs and "TIMEOUT: ended after the 2 s cap" in logs

    # the summary table comes last, after the device tool's command line
    text = (out / "summary.txt").read_text()
    assert 'carry [".whl"]' in text and "python3 bench/gpu_check.py --out $OUT" in text
    tail = result.stdout[result.stdout.rindex("| stage"):]
    assert [line.split("|")[1].split()[1] for line in tail.splitlines()[2:11]] == STAGES
    assert "dry run as planned" in result.stdout.splitlines()[-1]


def test_correctness_comparison_passes_a_right_model_and_flags_wrong_outputs(tmp_path):
    torch.set_num_threads(1)
    fixture = gc.build_fixture(tmp_path, "tiny")
    requests = gc.make_requests(fixture)
    tol, n = gc.TOLERANCES[torch.float32], 4
    cpu = torch.device("cpu")
    with runtime.reference_kernels():
        outs, info = gc.run_engine(fixture, requests, cpu, torch.float32, n, graphs=False,
                                   max_num_batched_tokens=gc.CHUNK_TOKENS)
        reference = gc.Reference(fixture, torch.float32, cpu)
        ok = gc.judge(outs, reference, tol, n)
        assert ok["passed"] and ok["wrong"] == 0 and ok["positions"] == n * len(requests), ok
        assert info["steps_prefill_and_decode"] > 0  # prompt chunks shared steps with decodes
        assert set(ok["per_adapter"]) == {"-", *fixture["adapters"]}
        assert all(a["effect"] > 10 * tol.mean_lp for name, a in ok["per_adapter"].items() if name != "-")

        def judged(change):
            bad = copy.deepcopy(outs)
            change(bad)
            return gc.judge(bad, reference, tol, n)

        def least_likely(bad):  # the reference's least likely token in place of one greedy token
            out = bad[3]
            out.tokens[1] = int(reference.logprobs(out)[1].argmin())

        r = judged(least_likely)
        assert not r["passed"] and r["wrong"] >= 1
        r = judged(lambda bad: bad[2].logprobs.__setitem__(0, bad[2].logprobs[0] + 0.01))
        assert not r["passed"] and r["wrong"] == 0 and r["max_lp_diff"] > tol.max_lp
        r = judged(lambda bad: bad[5].top[2].__setitem__(0, (bad[5].top[2][0][0], float("nan"))))
        assert not r["passed"] and r["max_lp_diff"] == float("inf")
        r = judged(lambda bad: bad[1].tokens.pop())
        assert not r["passed"] and r["errors"]

        # a wrong model (final norm scaled by 1.02) fails as a whole run
        wrong, _ = gc.run_engine(fixture, requests, cpu, torch.float32, n, graphs=False, perturb=0.02)
        r = gc.judge(wrong, reference, tol, n)
        assert not r["passed"] and r["mean_lp_diff"] > tol.mean_lp
