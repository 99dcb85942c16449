"""bench/attention.py runs end to end on CPU (`--smoke`): the prefill kernel (interpreted,
TRITON_INTERPRET=1 from conftest.py, inherited by the subprocess) and the gather + SDPA
reference agree with the fp32 reference; OOM rows and the byte and FLOP counts on their own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import attention as bench

ROOT = Path(__file__).resolve().parents[1]


def test_prefill_attention_bench_smoke(tmp_path):
    out = tmp_path / "attention.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "bench" / "attention.py"), "--smoke", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "agreement: 6 of 6 rows checked" in result.stdout and "| gather+SDPA |" in result.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["context"], r["method"]) for r in rows} == {
        (c, m) for c in (0, 37, 130) for m in ("ours", "gather+SDPA")}
    assert all(r["error"] is None and r["rel_err"] <= 2e-2 for r in rows)
    if not torch.cuda.is_available():
        assert "not measured: no GPU" in result.stdout and all(r["us"] is None for r in rows)
        assert report["env"]["ours"] == "Triton (interpreted)"


def _point(context=2, chunk=3):
    args = bench.parse_args(["--smoke", "--chunk", str(chunk), "--hq", "2", "--hkv", "1", "--d", "16"])
    return bench.Point(context, args, torch.device("cpu")), args


def test_bytes_and_flops():
    point, _ = _point(context=2, chunk=3)
    # K and V of 5 positions, q and out of 3 rows, all bf16; pairs: 3 rows see 3, 4, 5 keys
    assert point.bytes == 2 * 5 * 1 * 16 * 2 + 2 * 3 * 2 * 16 * 2
    assert point.pairs == 12 and point.flops == 4 * 2 * 16 * 12


def test_oom_becomes_a_row():
    point, args = _point()
    rows = point.check_rows(args.check_rows)
    expected = bench.reference_rows(point, rows, torch.float32)

    def oom(point, i):
        def run():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.6 GiB")
        return run

    row = bench.measure("gather+SDPA", oom, point, expected, rows, torch.device("cpu"), args)
    assert row["error"] == "OOM" and row["us"] is None and row["rel_err"] is None
    row["ours_over_this"] = None
    assert bench.cells(row)[3] == "OOM"
    assert "n/a (OOM)" in bench.summary_lines([dict(row, method="ours"), row])[0]


def test_flash_mode():
    def paged(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, block_table=None):
        pass

    def plain(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        pass

    assert bench.flash_modes(paged, 256) == "paged"
    assert bench.flash_modes(paged, 16) == "contiguous"  # FlashAttention-2 pages are multiples of 256
    assert bench.flash_modes(plain, 256) == "contiguous"
