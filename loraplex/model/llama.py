"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) on NF4 weights with per-token LoRA.

Every step runs one flat batch of T tokens from many sequences (`StepMeta`); each linear adds
the LoRA delta of each token's own adapter slot (`BatchMeta`). Keys and values go to a paged
cache bound once with `bind_kv_cache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fused import rope_write_kv, silu_mul
from ..kernels.lora import BatchMeta
from ..kernels.lora_pool import LoRAPagePool, Projection, full_adapter_pages
from ..kernels.nf4_matmul import PlanTable
from ..kernels.workspace import Workspace
from .attention import paged_attention
from .config import ModelConfig
from .layers import QuantLinear, RMSNorm
from .step import StepMeta

# Fused projections: module name in the model -> the HF linears it holds, in output order.
FUSED_LINEARS = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}


def _fused(weights, name: str) -> QuantLinear:
    hf_names = FUSED_LINEARS[name]
    parts = [weights.linears[n] for n in hf_names]
    biases = [weights.tensors.get(f"{n}.bias") for n in hf_names]
    return QuantLinear(parts, biases, hf_names)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, weights):
        super().__init__()
        self.config = config
        self.qkv_proj = _fused(weights, "qkv_proj")
        self.o_proj = _fused(weights, "o_proj")
        self.scale = config.head_dim ** -0.5
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, Hkv, D]
        self.v_cache: torch.Tensor | None = None
        self.workspace: Workspace | None = None   # split-KV partials (bound by the engine)

    def forward(self, x: torch.Tensor, step: StepMeta) -> torch.Tensor:
        c = self.config
        t = x.shape[0]
        q, k, v = self.qkv_proj(x, step.lora).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        # rotate q and k, store k and v in the cache: one launch
        q = rope_write_kv(q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim),
                          v.view(t, c.num_kv_heads, c.head_dim), step.cos, step.sin,
                          self.k_cache, self.v_cache, step.slot_mapping)
        out = paged_attention(q, self.k_cache, self.v_cache, step, self.scale, self.workspace)
        return self.o_proj(out.view(t, c.q_size), step.lora)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, weights):
        super().__init__()
        self.gate_up_proj = _fused(weights, "gate_up_proj")
        self.down_proj = _fused(weights, "down_proj")

    def forward(self, x: torch.Tensor, lora: BatchMeta | None) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x, lora)), lora)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, weights):
        super().__init__()
        self.input_layernorm = RMSNorm(weights.tensors["input_layernorm.weight"], config.rms_norm_eps)
        self.self_attn = Attention(config, weights)
        self.post_attention_layernorm = RMSNorm(weights.tensors["post_attention_layernorm.weight"],
                                                config.rms_norm_eps)
        self.mlp = MLP(config, weights)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step: StepMeta
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried separately so that each residual add is fused into
        the following norm: returns (this layer's MLP output, the stream before adding it)."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, step), residual)
        return self.mlp(h, step.lora), residual


class CausalLM(nn.Module):
    """The whole decoder. `forward(input_ids [T], step) -> logits [len(step.logits_rows), V]` fp32."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, norm: torch.Tensor,
                 lm_head: torch.Tensor | None, layers: list[DecoderLayer], cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(norm, config.rms_norm_eps)
        self.lm_head_weight = embed if lm_head is None else lm_head  # tied: the embedding itself
        self.dtype, self.device = embed.dtype, embed.device
        self.cos_table, self.sin_table = cos, sin  # [max_model_len, head_dim] fp32
        self.lora_slots = 0
        self.lora_pool: LoRAPagePool | None = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, step: StepMeta) -> torch.Tensor:
        return self.logits(*self.hidden_states(input_ids, step), step.logits_rows)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, step: StepMeta
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last layer's output [T, H] and the residual stream before it (not yet added)."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, step)
        return x, residual

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, residual: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits [len(rows), V] of rows `rows` of `hidden_states`' result (final norm, lm_head)."""
        x, _ = self.norm(x[rows], None if residual is None else residual[rows])
        return F.linear(x, self.lm_head_weight).float()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] at `positions`, in the activation dtype."""
        return self.cos_table[positions].to(self.dtype), self.sin_table[positions].to(self.dtype)

    # -- KV cache and adapter slots (long-lived state, bound once) --------------------------

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        for layer, k, v in zip(self.layers, k_caches, v_caches, strict=True):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v

    def bind_kernels(self, plans: PlanTable | None, workspace: Workspace | None) -> None:
        """The NF4 plans and the scratch every kernel of a step uses (the engine's, fixed
        before its first step: CUDA graphs bake both in); None, None unbinds."""
        for linear in self.linears().values():
            linear.bind_kernels(plans, workspace)
        for layer in self.layers:
            layer.self_attn.workspace = workspace

    def linear_shapes(self) -> set[tuple[int, int]]:
        """(N, K) of every NF4 weight part."""
        return {tuple(w.shape) for linear in self.linears().values() for w in linear.parts}

    def linears(self) -> dict[str, QuantLinear]:
        """Every NF4 linear by module path, e.g. "layers.3.self_attn.qkv_proj"."""
        return {name: m for name, m in self.named_modules() if isinstance(m, QuantLinear)}

    def lora_projections(self) -> list[tuple[QuantLinear, Projection]]:
        """Each linear with its adapter slices' module keys ("layers.0.self_attn.q_proj", ...)."""
        out = []
        for i, layer in enumerate(self.layers):
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                           layer.mlp.gate_up_proj, layer.mlp.down_proj):
                keys = tuple(f"layers.{i}.{n}" for n in linear.names)
                out.append((linear, Projection(keys, linear.in_features, linear.slices)))
        return out

    def allocate_lora(self, slots: int, max_rank: int, num_pages: int | None = None) -> LoRAPagePool:
        """Pre-allocate paged adapter memory: `num_pages` pages (default: room for `slots`
        adapters of rank `max_rank` on every linear), `slots` slot records, ranks up to
        `max_rank` (see `LoRAPagePool`). Allocate before capturing CUDA graphs: they bake it in."""
        projections = [p for _, p in self.lora_projections()]
        if num_pages is None:
            num_pages = slots * full_adapter_pages(projections, max_rank)
        self.lora_pool = LoRAPagePool(projections, slots, max_rank, num_pages, self.dtype, self.device)
        for (linear, _), stack in zip(self.lora_projections(), self.lora_pool.stacks):
            linear.lora = stack
        self.lora_slots = slots
        return self.lora_pool

    def set_lora_slot(self, slot: int, modules: dict) -> None:
        """Put one adapter into `slot`. `modules` maps "layers.{i}.{hf linear}" (e.g.
        "layers.0.self_attn.q_proj") to an object with `.a` [r, in], `.b` [out, r], `.scaling`;
        linears missing from it are not targeted."""
        self.lora_pool.write(slot, modules)

    def resident_bytes(self) -> int:
        quant = sum(m.resident_bytes() for m in self.linears().values())
        dense = {id(t): t.numel() * t.element_size() for t in
                 [self.embed_tokens.weight, self.lm_head_weight, *self.buffers(), *self.parameters()]}
        return quant + sum(dense.values())


def build_model(reader, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """Assemble the model from a `CheckpointReader` (layer by layer, NF4 as it streams in)."""
    from .config import rope_tables

    config = ModelConfig.from_hf(reader.config)
    glob = reader.global_tensors()
    layers = [DecoderLayer(config, weights) for weights in reader.layers()]
    if len(layers) != config.num_layers:
        raise ValueError(f"checkpoint has {len(layers)} layers, config says {config.num_layers}")
    lm_head = None if config.tie_word_embeddings else glob.get("lm_head.weight")
    if lm_head is None and not config.tie_word_embeddings:
        raise ValueError("checkpoint has no lm_head.weight and the config does not tie embeddings")
    cos, sin = rope_tables(reader.config, config.max_model_len, device)
    return CausalLM(config, glob["model.embed_tokens.weight"], glob["model.norm.weight"], lm_head,
                    layers, cos, sin)
