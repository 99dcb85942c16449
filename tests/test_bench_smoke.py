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
