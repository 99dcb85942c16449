"""Where the kernels run: compiled Triton on CUDA, Triton's interpreter on CPU (tests), or
the PyTorch references. Shared by every kernel module."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

try:
    import triton
except ImportError:  # no Triton (e.g. macOS): the references still work on CPU
    triton = None

# Read once: `triton.jit` picks the interpreter at decoration time from the same variable.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# LORAPLEX_KERNELS=reference runs the PyTorch references everywhere (debugging, fp32 models).
_reference_only = os.environ.get("LORAPLEX_KERNELS", "auto") == "reference"


def use_triton(device: torch.device) -> bool:
    """True where the Triton kernels run: on CUDA, or on CPU under TRITON_INTERPRET=1, unless
    the references were asked for."""
    if _reference_only or triton is None:
        return False
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


@contextmanager
def reference_kernels():
    """Run the PyTorch references inside the block (process-wide: tests of whole models in
    fp32, which the interpreter would run far too slowly)."""
    global _reference_only
    saved, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = saved


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a small stand-in off CUDA, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
