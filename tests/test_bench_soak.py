"""bench/soak.py --smoke in CI: the real server under mixed traffic while adapters come and go
(about 30 s), every completed request exact, nothing lost, nothing held afterwards."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def counts(stdout: str) -> dict[str, int]:
    """The table's rows: '  <what>   <count>'."""
    return {m[1].strip(): int(m[2]) for m in re.finditer(r"^  (\S.*?)\s+(\d+)$", stdout, re.M)}


def test_soak_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--smoke"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "soak: PASS" in out.stdout
    n = counts(out.stdout)
    assert n["exact"] > 0 and n["failures (all)"] == 0
    assert n["cut"] >= 1
    assert n["unload (forced)"] >= 1 and n["merge"] >= 1
    assert n["sent"] == n["exact"] + n["cut"] + n["refused: unloaded"] + n["aborted"]
