"""Where the kernels run: compiled Triton on CUDA, Triton's interpreter on CPU (tests), or
the PyTorch references. Shared by every kernel module."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # no Triton (e.g. macOS): the references still work on CPU
    triton = None

# Read once: `triton.jit` picks the interpreter at decoration time from the same variable.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(device: torch.device) -> bool:
    """True where the Triton kernels run: on CUDA, or on CPU under TRITON_INTERPRET=1."""
    return triton is not None and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a small stand-in off CUDA, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
