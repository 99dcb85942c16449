"""Where the kernels run: compiled Triton on CUDA, Triton's interpreter on CPU (tests), or
the PyTorch references; and `launch`, through which every Triton kernel of the project is
started, so that the variants a workload compiles can be counted. Shared by every kernel
module."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

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


def references_forced() -> bool:
    """Whether the references were asked for (reference_kernels(), LORAPLEX_KERNELS=reference)."""
    return _reference_only


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a small stand-in off CUDA, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# -- launches ---------------------------------------------------------------------------

# A Triton kernel compiles once per distinct set of compile-time arguments (constexprs, launch
# options, argument dtypes; integer arguments that vary from step to step are marked
# `do_not_specialize` in the kernels). `recording_launches` collects exactly those keys, so
# tests can check on CPU that warm-up met every variant that serving later meets.
_recording: set | None = None


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """`kernel[grid](*args, **meta)`, noting the variant when recording."""
    if _recording is not None:
        dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        _recording.add((kernel.fn.__name__, tuple(sorted(meta.items())), dtypes))
    kernel[grid](*args, **meta)


@contextmanager
def recording_launches() -> Iterator[set]:
    """Collect the variant key of every Triton launch inside the block (process-wide)."""
    global _recording
    saved, _recording = _recording, set()
    try:
        yield _recording
    finally:
        _recording = saved


def compiled_kernels() -> int:
    """Compiled Triton kernels held in the JIT caches of this package's kernels, all devices
    (0 under the interpreter, which compiles nothing): on a GPU, growth while serving means
    a compilation on the request path."""
    import importlib
    import pkgutil

    from . import __path__ as package_path

    count = 0
    for info in pkgutil.iter_modules(package_path):
        module = importlib.import_module(f"{__package__}.{info.name}")
        for obj in vars(module).values():
            for entry in getattr(obj, "device_caches", {}).values():
                count += len(entry[0])  # (kernel cache, ...) per device
    return count
