"""loraplex: many LoRA adapters of one NF4-quantized Llama-family model, served from one GPU."""

__version__ = "0.1.0"
