"""The Triton kernels compile for Hopper (sm_90) without spilling, even where no GPU is.

CPU tests run the kernels in Triton's interpreter, which accepts programs the compiler may
reject; compiling ahead of time with Triton's bundled ptxas catches that on CPU-only CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_report.py"), "--check"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| gemv " in result.stdout and "| gemm " in result.stdout and "| dequant " in result.stdout
    # the LoRA kernels over slots and over pages (page width 256, rank bound 256)
    assert "| lora_shrink " in result.stdout and "| paged_shrink " in result.stdout
    assert "| lora_expand " in result.stdout and "| paged_expand " in result.stdout
    # paged prefill attention, Llama-7B/8B: G = 1 (Hkv 32) and G = 4 (Hkv 8), D 128, bf16
    assert "| prefill_attention G1 " in result.stdout and "| prefill_attention G4 " in result.stdout
