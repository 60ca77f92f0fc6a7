"""Decoder-only transformer for llama / mistral / qwen2 / qwen3 / gemma3 text (dense),
mixtral / qwen2_moe / qwen3_moe (MoE) and deepseek_v3 (MoE after `first_k_dense_replace` dense
layers; multi-head latent attention, `models.mla`).

The forward pass takes a flat batch of tokens ([N], many sequences concatenated) with their
positions and an `AttentionMetadata`, and returns hidden states [N, hidden]. Logits are computed
separately for the rows that need them (the last token of each sequence), so prefill never pays
for the [N, vocab] projection.

Gemma 3's layer differs from the llama skeleton (see `Gemma3DecoderLayer`); its model scales
the embeddings by sqrt(hidden_size) and rotates its sliding layers' q/k with a second RoPE
(base rope_local_base_freq).
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import Attention, AttentionMetadata
from models.config import ModelConfig
from models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, empty_param, linear
from models.mla import MLAttention
from models.moe import RouteStats, SparseMoeBlock

KVCache = tuple[torch.Tensor, torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = MLAttention(config, layer_id) if config.is_mla else Attention(config, layer_id)
        self.is_moe = config.is_moe_layer(layer_id)
        self.mlp: nn.Module = (
            SparseMoeBlock(config)
            if self.is_moe
            else GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        )
        offset = config.is_gemma
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)

    def forward(self, x, cos, sin, meta, kv_cache, route_stats, keep_router_logits):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        h = self.post_attention_layernorm(x)
        fixed_k = meta.batch_invariant
        if self.is_moe:
            h = self.mlp(h, route_stats, keep_router_logits, fixed_k)
        else:
            h = self.mlp(h, fixed_k)
        return x + h


class Gemma3DecoderLayer(DecoderLayer):
    """Gemma 3: every sublayer's output is normalised before the residual add, and the MLP
    has its own input norm (here post_attention_layernorm follows attention, as in HF):

        x = x + post_attention_layernorm(attn(input_layernorm(x)))
        x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))

    All four norms scale by (1 + w)."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__(config, layer_id)
        assert not self.is_moe, "gemma3 has no MoE layers"
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, True)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, True)

    def forward(self, x, cos, sin, meta, kv_cache, route_stats, keep_router_logits):
        h = self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x), meta.batch_invariant)
        return x + self.post_feedforward_layernorm(h)


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = empty_param(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        # gemma3: the sliding layers' RoPE has its own base (and no scaling)
        self.rotary_local = (
            RotaryEmbedding(config, local=True) if config.rope_local_base_freq else None
        )
        self.layer_is_local = [
            self.rotary_local is not None and kind == "sliding_attention"
            for kind in config.layer_types
        ]
        layer_cls = Gemma3DecoderLayer if config.is_gemma else DecoderLayer
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        moe_blocks = [layer.mlp for layer in self.layers if layer.is_moe]
        for i, block in enumerate(moe_blocks):
            block.moe_index = i
        self.num_moe_layers = len(moe_blocks)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.is_gemma)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
        route_stats: RouteStats | None = None,
        keep_router_logits: bool = False,
    ) -> torch.Tensor:
        x = self.embed_tokens[input_ids]
        if self.config.is_gemma:
            # sqrt(hidden_size) in fp32, then rounded to the compute dtype, as the reference
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(x.dtype)
        rope = {False: self.rotary.cos_sin(positions, x.dtype)}
        if any(self.layer_is_local):
            rope[True] = self.rotary_local.cos_sin(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            kv = kv_caches[i] if kv_caches is not None else None
            cos, sin = rope[self.layer_is_local[i]]
            x = layer(x, cos, sin, meta, kv, route_stats, keep_router_logits)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, fixed_k: bool = False) -> torch.Tensor:
        """fp32 logits, softcapped when final_logit_softcapping is set (in fp32; the
        reference caps in the compute dtype); fixed_k: batch-invariant reduction (see
        `layers.linear`)."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        logits = linear(hidden, weight, fixed_k=fixed_k).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- conveniences for tests and scoring -------------------------------------------------
    @torch.inference_mode()
    def logits_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full logits [B, T, V] for a padded-free batch [B, T] with no cache (reference use)."""
        B, T = input_ids.shape
        meta = AttentionMetadata.for_dense([T] * B)
        positions = torch.arange(T, device=input_ids.device).repeat(B)
        hidden = self.forward(input_ids.reshape(-1), positions, meta)
        return self.compute_logits(hidden).view(B, T, -1)

    def router_logits(self) -> list[torch.Tensor]:
        """Router logits kept by the last forward with keep_router_logits=True, one per MoE layer."""
        return [
            layer.mlp.last_router_logits
            for layer in self.layers
            if layer.is_moe and layer.mlp.last_router_logits is not None
        ]

    def expert_counts(self) -> torch.Tensor | None:
        """Tokens routed to each expert since load, summed over MoE layers ([E]), or None."""
        counts = [layer.mlp.expert_counts for layer in self.layers if layer.is_moe]
        return torch.stack(counts).sum(0) if counts else None

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> TransformerLM:
        gen = torch.Generator().manual_seed(seed)
        # Norm weights near their identity: 1 for w, 0 for Gemma's (1 + w).
        identity = 0.0 if self.config.is_gemma else 1.0
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(identity + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
        return self
