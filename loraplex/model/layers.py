"""Building blocks of the decoder: NF4 linears with batched LoRA, RMSNorm, rotary embedding."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.fused import add_rms_norm
from ..kernels.lora import BatchMeta
from ..kernels.lora_paged import PagedLoRA, apply_paged_lora
from ..kernels.nf4 import NF4Weight
from ..kernels.nf4_matmul import PlanTable, nf4_matmul
from ..kernels.workspace import Workspace


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) + each token's own LoRA delta.

    W is one NF4 weight per part: a fused projection (q/k/v, gate/up) keeps its parts as the
    checkpoint quantized them (each with its own double-quant scales, so bitsandbytes
    checkpoints load without re-quantizing) and writes their outputs side by side. The LoRA
    delta of all parts is one shrink and one expand over paged adapter memory, one slice per part.
    An engine binds its plan table and workspace (`bind_kernels`); unbound, the kernels pick
    plans and scratch themselves (tests, scripts).
    """

    def __init__(self, parts: list[NF4Weight], biases: list[torch.Tensor | None], names: tuple[str, ...]):
        super().__init__()
        if len(parts) != len(names) or len(biases) != len(parts):
            raise ValueError("QuantLinear: one name and one bias (or None) per part")
        in_features = {w.shape[1] for w in parts}
        if len(in_features) != 1:
            raise ValueError(f"QuantLinear: fused parts must share in_features, got {sorted(in_features)}")
        self.parts, self.biases, self.names = parts, biases, names
        self.in_features = in_features.pop()
        self.slices = tuple(w.shape[0] for w in parts)
        self.out_features = sum(self.slices)
        self.lora: PagedLoRA | None = None
        self.plans: PlanTable | None = None
        self.workspace: Workspace | None = None

    def bind_kernels(self, plans: PlanTable | None, workspace: Workspace | None) -> None:
        self.plans, self.workspace = plans, workspace

    def forward(self, x: torch.Tensor, lora: BatchMeta | None) -> torch.Tensor:
        m = x.shape[0]
        outs = [nf4_matmul(x, w, b, self.plans(*w.shape, m) if self.plans is not None else None, self.workspace)
                for w, b in zip(self.parts, self.biases)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.lora is not None and lora is not None:
            apply_paged_lora(x, y, self.lora, lora, workspace=self.workspace)
        return y

    def resident_bytes(self) -> int:
        return sum(w.resident_bytes() for w in self.parts)


class RMSNorm(nn.Module):
    """(x + residual) / rms * weight, as transformers' Llama computes it (fp32 statistics, cast
    back, times the weight), with the residual add fused in: returns (normed, x + residual)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps)

