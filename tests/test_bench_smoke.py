"""The benchmark harnesses run end to end on CPU (`--smoke`), so they do not rot untested.

The suite sets TRITON_INTERPRET=1 without CUDA (conftest.py) and the subprocesses inherit
it: the real Triton kernels run interpreted, and every method is checked against its oracle.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_smoke(script: str, json_out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--json", str(json_out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_nf4_matmul_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    result = _run_smoke("nf4_matmul.py", out)
    assert "| smoke |" in result.stdout and "targets" in result.stdout
    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {(r["n"], r["k"], r["m"]) for r in rows} == {(256, 256, 1), (256, 256, 4), (128, 512, 1), (128, 512, 4)}
    assert all(r["us_ours"] > 0 for r in rows)


def test_lora_bench_smoke(tmp_path):
    out = tmp_path / "lora.json"
    result = _run_smoke("lora.py", out)
    assert "| smoke | qkv" in result.stdout and "| smoke | o " in result.stdout
    assert "targets" in result.stdout and "NF4 side by side" in result.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    # one adapter: uniform only (zipf would be the same batch); four adapters: both assignments
    expected = {(proj, t, d, how) for proj in ("qkv", "o") for t in (1, 16)
                for d, hows in ((1, ("uniform",)), (4, ("uniform", "zipf"))) for how in hows}
    assert {(r["proj"], r["t"], r["distinct"], r["assign"]) for r in rows} == expected
    assert all(r["us_loop"] > 0 and r["us_bmm"] > 0 and r["us_ours"] > 0 and r["us_floor"] > 0 for r in rows)
    assert all(err is not None and err <= 2e-2 for r in rows for err in r["rel_err"].values())
    assert [m["t"] for m in report["meta_build"]] == [1, 16]
    assert all(m["us_build"] > 0 for m in report["meta_build"])
    side = report["side_by_side"]
    assert side["us_nf4"] > 0 and side["us_nf4_lora"] > 0 and side["graph"] is None
    assert any(t["label"].startswith("(c)") for t in report["targets"])
    # paged kernels (smoke: at targets (d)/(e)'s points only), checked against the same oracle
    assert "paged us" in result.stdout and "paged/floor" in result.stdout
    paged = [r for r in rows if r["us_paged"] is not None]
    assert {(r["proj"], r["distinct"]) for r in paged} == {(proj, d) for proj in ("qkv", "o") for d in (1, 4)}
    assert all(r["t"] == 16 and r["assign"] == "uniform" and r["paged_over_ours"] > 0
               and r["paged_over_floor"] > 0 and r["rel_err"]["paged"] <= 2e-2 for r in paged)
    goals = {t["label"][:3] for t in report["targets"]}
    assert {"(d)", "(e)"} <= goals
    assert all(t["value"] is not None for t in report["targets"] if t["label"][:3] in ("(d)", "(e)"))
    # memory figures of the real models, page-in on the smoke shapes
    assert [m["model"] for m in report["memory"]] == ["llama2-7b", "llama3-8b"]
    [page_in] = report["page_in"]
    assert page_in["model"] == "smoke" and all(x["us"] > 0 and x["bytes"] > 0 for x in page_in["paths"])
    assert "page-in of a rank-8 q/v-only adapter" in result.stdout


def test_lora_bench_memory_figures(tmp_path):
    out = tmp_path / "memory.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "lora.py"), "--memory", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "adapter memory, 8 GiB of bf16 on llama2-7b" in result.stdout and "llama3-8b" in result.stdout
    memory = {m["model"]: m for m in json.loads(out.read_text())["memory"]}
    m = memory["llama2-7b"]
    assert (m["page_width"], m["page_bytes"]) == (256, 512) and memory["llama3-8b"]["page_width"] == 1024
    # a slot row at capacity 64: 64 * (q/k/v 3 * 4096 + 12288, o 8192, gate/up 2 * 4096 + 22016,
    # down 11008 + 4096) * 32 layers * 2 B
    slots = {s["capacity"]: s for s in m["slots"]}
    assert slots[64]["row_bytes"] == 64 * 78080 * 32 * 2
    assert slots[64]["fit"] == (8 << 30) // slots[64]["row_bytes"] == 26
    # rank 8 q/v: 8 * (4096 + 4096) * 2 per layer, in 512-B pages
    kinds = {(k["rank"], k["targets"]): k for k in m["kinds"]}
    assert kinds[8, "q/v"]["bytes"] == 8 * 16384 * 32 * 2 and len(kinds) == 10
    assert kinds[64, "all-linear"]["bytes"] == slots[64]["row_bytes"]
    for fig in memory.values():  # a mixed population fits several times the full rows
        assert fig["paged_fit"] > 3 * fig["slots"][0]["fit"] > 0
        assert fig["paged_pages_used"] <= fig["pages"]


def test_e2e_bench_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    result = _run_smoke("e2e.py", out)
    assert "ours tok/s" in result.stdout and "batch 1 decode" in result.stdout
    assert "byte floor of a decode step" in result.stdout and "targets" in result.stdout
    report = json.loads(out.read_text())
    args, runs = report["args"], report["ours"]["runs"]
    # a base-model run, then 1 adapter (uniform only: zipf would be the same batch), 4 and 8 (both)
    assert [(r["adapters"], r["dist"]) for r in runs] == [
        (0, "base"), (1, "uniform"), (4, "uniform"), (4, "zipf"), (8, "uniform"), (8, "zipf")]
    streams = args["streams"]
    assert all(r["tokens"] == streams * args["gen_len"] and r["tok_s"] > 0 for r in runs)
    assert all(r["decode_ms"] > 0 and r["floor_ms"] > 0 and r["preemptions"] == 0 for r in runs)
    assert all(0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] for r in runs)
    # round robin uses min(adapters, streams) of them; Zipf at most that many
    assert all(r["present"] == min(r["adapters"], streams) if r["dist"] != "zipf"
               else 1 <= r["present"] <= min(r["adapters"], streams) for r in runs)
    assert report["ours"]["batch1"]["ms_per_token"] > 0
    base = report["baseline"]
    assert "error" not in base, base["error"]
    if "skipped" not in base:  # bitsandbytes 4-bit and PEFT run on CPU for the tiny model
        assert [(c["adapters"], c["dist"]) for c in base["cases"]] == [
            (0, "base"), (1, "uniform"), (4, "uniform")]
        assert all(c["tok_s"] > 0 for c in base["cases"]) and base["batch1_ms_per_token"] is not None
        assert 0 <= base["first_token_agreement"] <= streams  # informative (bf16 near-ties may differ)
    assert len(report["targets"]) == 4 and all(t["verdict"] in ("PASS", "FAIL") for t in report["targets"])


def test_hotswap_bench_smoke(tmp_path):
    out = tmp_path / "hotswap.json"
    result = _run_smoke("hotswap.py", out)
    assert "ITL p99 ms" in result.stdout and "adapter load" in result.stdout
    assert "baseline: safetensors load_file" in result.stdout and "loads/s" in result.stdout
    assert "usage at the end" in result.stdout and "(clean)" in result.stdout
    report = json.loads(out.read_text())
    args, s = report["args"], report["summary"]
    # steady and churn blocks alternate; every timed step decoded every stream
    assert s["steady_steps"] == args["steps"] and s["churn_steps"] >= args["steps"]
    assert {b["phase"] for b in report["blocks"]} == {"steady", "churn"}
    assert all(b["loads"] >= 1 for b in report["blocks"] if b["phase"] == "churn")
    assert all(s[k] > 0 for k in ("itl_steady_p50_ms", "itl_steady_p99_ms", "itl_churn_p50_ms",
                                  "itl_churn_p99_ms", "itl_p99_ratio"))
    assert s["itl_steady_p50_ms"] <= s["itl_steady_p99_ms"] and s["itl_churn_p50_ms"] <= s["itl_churn_p99_ms"]
    # adapters were registered, paged into GPU slots (evicting idle ones) and unloaded
    loads = report["loads"]
    assert len(loads) == s["loads"] >= 2 and s["loads_per_s"] > 0
    assert all(x["read_ms"] > 0 and x["load_ms"] >= x["read_ms"] and x["wall_ms"] > 0 for x in loads)
    assert len({x["name"] for x in loads}) == len(loads)
    assert report["events"]["load_gpu"] >= len(loads) + args["resident"] and report["events"]["evict_gpu"] >= 1
    assert "load_failed" not in report["events"] and report["preemptions"] == 0
    assert s["load_p50_ms"] > 0 and s["wall_p99_ms"] >= s["wall_p50_ms"] > 0
    assert report["baseline"]["device_p50_ms"] > 0 and s["load_over_baseline_p50"] > 0
    # nothing left behind: no adapter, slot, host row or waiting page-in; no thread error
    usage = report["usage_end"]
    assert report["usage_clean"] and not report["churn_errors"]
    assert usage["registered"] == usage["draining"] == usage["gpu_slots_used"] == 0
    assert usage["host_adapters"] == usage["gpu_pages_used"] == usage["waiting_for_slot"] == 0
    assert report["targets"] == []  # judged on CUDA only
