"""bench/prefix_cache.py --smoke: the harness runs (cold and warm arrivals, cache off and on),
the outputs with the cache equal those without it, and the cache is hit."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import prefix_cache

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_runs_both_patterns_with_equal_outputs_and_cache_hits(tmp_path):
    out = tmp_path / "prefix_cache.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "prefix_cache.py"), "--smoke", "--device", "cpu",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "token for token identical in all 4 runs" in result.stdout and "MISMATCH" not in result.stdout
    assert "| arrival | cache |" in result.stdout

    report = json.loads(out.read_text())
    assert report["passed"] and not report["outputs"]["mismatches"] and not report["outputs"]["ties"]
    assert report["outputs"]["identical"] == report["outputs"]["streams"] == 8
    runs = report["runs"]
    assert set(runs) == {"cold_off", "cold_on", "warm_off", "warm_on"}
    for key, run in runs.items():
        assert run["output_tokens"] == 8 * 4 and len(run["ttft_ms"]) == 8
        assert 0 < run["ttft_p50_ms"] <= run["ttft_p99_ms"] and run["tok_s"] > 0
        if key.endswith("off"):
            assert run["hit_rate"] is None and run["prefill_tokens"] == report["workload"]["prompt_tokens"]
        else:
            assert run["hit_rate"] > 0 and run["prefill_tokens"] < report["workload"]["prompt_tokens"]
    # warm: every stream finds its adapter's system prompt (64 tokens, 4 whole blocks)
    assert runs["warm_on"]["cached_tokens_mean"] == 64
    assert set(report["ratios"]) == {"cold", "warm"}


def test_streams_spread_round_robin_with_base_streams_among_them():
    assert prefix_cache.stream_names(4, 2, 0) == ["a0", "a1", "a0", "a1"]
    names = prefix_cache.stream_names(64, 8, 8)
    assert names.count(None) == 8 and all(names.count(f"a{i}") == 8 for i in range(8))
    assert names[0] == "a0" and names[-1] is not None


def test_outputs_may_diverge_only_at_near_ties_within_the_tolerance():
    def run(cache, tokens, tops):
        return dict(mode="cold", cache=cache, tokens=tokens, top=tops)

    same = [(5, -0.1), (5, -0.1), (6, -0.2)]
    off = run(False, [[5, 5]], [[same, same]])
    tie = run(True, [[5, 6]], [[same, [(6, -0.15), (6, -0.15), (5, -0.2)]]])   # 0.1 and 0.05 apart
    far = run(True, [[5, 7]], [[same, [(7, -0.1), (7, -0.1), (5, -3.0)]]])     # 7 not in off's top 2
    assert prefix_cache.compare([off, off], 0.0) == dict(streams=1, identical=1, ties=[], mismatches=[],
                                                         tie_tol=0.0, passed=True)
    r = prefix_cache.compare([off, tie], 0.1)
    assert r["passed"] and r["identical"] == 0 and r["ties"][0]["position"] == 1
    assert abs(r["ties"][0]["gap"] - 0.1) < 1e-9
    assert not prefix_cache.compare([off, tie], 0.0)["passed"]  # fp32: token for token
    r = prefix_cache.compare([off, far], 1.0)
    assert not r["passed"] and r["mismatches"][0]["gap"] is None
