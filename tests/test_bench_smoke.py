"""The benchmark harness runs end to end on CPU (`--smoke`), so it does not rot untested."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nf4_matmul_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "nf4_matmul.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| smoke |" in result.stdout and "targets" in result.stdout
    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {(r["n"], r["k"], r["m"]) for r in rows} == {(256, 256, 1), (256, 256, 4), (128, 512, 1), (128, 512, 4)}
    assert all(r["us_ours"] > 0 for r in rows)
