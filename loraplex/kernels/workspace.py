"""Scratch buffers that kernels reuse from launch to launch, owned by whoever runs the steps.

A CUDA graph bakes in the address of every buffer its kernels touch. So an engine sizes its
workspace once, from its limits, before anything is captured, and freezes it: afterwards a
launch that needs more than was reserved raises at once, naming the buffer, instead of
quietly replacing memory that a captured graph still writes.

Kernels describe what they need as `Need`s (name, elements, dtype); the same description
sizes the engine's workspace (`reserve`) and serves the launch (`take`), so the two cannot
drift apart. Callers outside an engine (tests, benchmarks, one-off products) get a growable
workspace per device from `standalone(device)`; it refuses to serve a launch that is being
captured into a CUDA graph, because its buffers may be replaced by the next larger call.

Buffers are zeroed once when allocated: the split-K kernels leave their part clean after
every launch (see `splitk.py`), the others overwrite what they read.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch


class Need(NamedTuple):
    """One buffer a launch uses: `numel` elements of `dtype` under `name`."""

    name: str
    numel: int
    dtype: torch.dtype


class WorkspaceError(RuntimeError):
    """A launch needs more workspace than a frozen workspace holds, or a growable workspace
    was asked to serve a CUDA graph capture."""


class Workspace:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}
        self.frozen = False
        self.reallocations = 0  # buffers replaced by larger ones (growable workspaces only)

    def reserve(self, needs: Iterable[Need]) -> None:
        """Make every buffer at least as large as the largest of its `needs` (before freezing)."""
        if self.frozen:
            raise WorkspaceError("the workspace is frozen: it was sized before the first step and cannot grow")
        largest: dict[str, Need] = {}
        for need in needs:
            seen = largest.get(need.name)
            if seen is not None and seen.dtype != need.dtype:
                raise WorkspaceError(f"workspace buffer {need.name!r} asked for as {seen.dtype} and {need.dtype}")
            if seen is None or need.numel > seen.numel:
                largest[need.name] = need
        for need in largest.values():
            self._grow(need)

    def freeze(self) -> None:
        self.frozen = True

    def take(self, needs: Sequence[Need]) -> list[torch.Tensor]:
        """A 1-D view of `numel` elements of each buffer in `needs`, in order."""
        if needs and not self.frozen and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise WorkspaceError(f"workspace buffer {needs[0].name!r}: a growable workspace cannot serve a CUDA "
                                 "graph capture, since a later call may replace it (pass the engine's frozen one)")
        out = []
        for name, numel, dtype in needs:
            buf = self._buffers.get(name)
            if buf is None or buf.numel() < numel or buf.dtype != dtype:
                if self.frozen:
                    have = "none" if buf is None else f"{buf.numel()} of {buf.dtype}"
                    raise WorkspaceError(
                        f"workspace buffer {name!r} needs {numel} elements of {dtype}, but {have} were reserved "
                        "when the engine was sized from its limits: a launch outside those limits (a bug)")
                buf = self._grow(Need(name, numel, dtype))
            out.append(buf[:numel])
        return out

    def _grow(self, need: Need) -> torch.Tensor:
        buf = self._buffers.get(need.name)
        if buf is not None and buf.dtype != need.dtype:
            raise WorkspaceError(f"workspace buffer {need.name!r} holds {buf.dtype}, a launch asked for {need.dtype}")
        if buf is None or buf.numel() < need.numel:
            self.reallocations += buf is not None
            buf = self._buffers[need.name] = torch.zeros(max(need.numel, 1), dtype=need.dtype, device=self.device)
        return buf

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every buffer, whole (for inspection: kernels go through `take`)."""
        return dict(self._buffers)

    def sizes(self) -> dict[str, int]:
        """Elements held per buffer."""
        return {name: buf.numel() for name, buf in self._buffers.items()}

    def pointers(self) -> dict[str, int]:
        """Device address per buffer (what a captured graph bakes in)."""
        return {name: buf.data_ptr() for name, buf in self._buffers.items()}

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in self._buffers.values())


_standalone: dict[torch.device, Workspace] = {}


def standalone(device: torch.device) -> Workspace:
    """The growable workspace of `device` for launches outside an engine."""
    ws = _standalone.get(device)
    if ws is None:
        ws = _standalone[device] = Workspace(device)
    return ws
