"""bench/serve.py's plumbing in CI (--smoke): the real server with the stand-in forward, the
engine alone, client processes, every response checked for its tokens. Its numbers mean nothing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serve_bench_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "server tok/s" in out.stdout and "nonstream" in out.stdout
    assert (tmp_path / "results.json").is_file()
