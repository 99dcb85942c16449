"""Load a Hugging Face model directory into an NF4 `CausalLM`, plus its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointReader
from .llama import CausalLM, build_model

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: object          # transformers tokenizer (with the chat template, when there is one)
    hf_config: object
    path: Path
    prequantized: bool         # the checkpoint was NF4 already


def load_model(model_dir: str | Path, dtype: torch.dtype | str = torch.bfloat16,
               device: torch.device | str = "cpu", progress: bool = True) -> LoadedModel:
    """Quantize (or read NF4) layer by layer onto `device`; tokenizer from the same directory."""
    from transformers import AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    device = torch.device(device)
    reader = CheckpointReader(model_dir, dtype=dtype, device=device, progress=progress)
    model = build_model(reader, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LoadedModel(model, tokenizer, reader.config, Path(model_dir), reader.prequantized)
