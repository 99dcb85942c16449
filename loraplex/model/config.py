"""What the model code needs from a Hugging Face config, checked once at load time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# The linears of a decoder layer, by their Hugging Face names.
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Rope variants whose frequencies do not depend on the running length (those we precompute).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not served."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_model_len: int      # positions served: max_position_embeddings, capped by a sliding window
    tie_word_embeddings: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear of a decoder layer, by HF name."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = [(self.q_size, h), (self.kv_size, h), (self.kv_size, h), (h, self.q_size), (i, h), (i, h), (h, i)]
        return dict(zip(LINEAR_NAMES, shapes))

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        arch = (getattr(hf, "architectures", None) or [_BY_MODEL_TYPE.get(getattr(hf, "model_type", None), "?")])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch} is not supported; loraplex serves {', '.join(SUPPORTED_ARCHITECTURES)}")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{arch}: hidden_act {hf.hidden_act!r} is not supported (only silu)")
        rope = rope_type(hf)
        if rope not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"{arch}: rope type {rope!r} is not supported "
                                        f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        max_len = hf.max_position_embeddings
        window = getattr(hf, "sliding_window", None)
        uses_window = getattr(hf, "use_sliding_window", True)  # Qwen2 declares a window it does not use
        if window and uses_window:
            # Attention is exact without windowing as long as no sequence outgrows the window.
            max_len = min(max_len, window)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(
            architecture=arch, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim, vocab_size=hf.vocab_size, rms_norm_eps=hf.rms_norm_eps,
            max_model_len=max_len, tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        )


def rope_type(hf) -> str:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def rope_tables(hf, max_len: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] in fp32, computed as transformers does (its rotary module
    gives the inverse frequencies and attention scaling of every supported rope type)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config=hf)
    inv_freq = rotary.inv_freq.float().to(device)
    freqs = torch.arange(max_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
