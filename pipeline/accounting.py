"""What a request costs in model FLOPs: the active parameters per token against the dense
equivalent (an MoE with every expert active), the pay-per-expert view of an MoE run.

    FLOPs of a request = 2 x params per token x tokens computed
    tokens computed    = prompt tokens not served from the prefix cache + generated tokens

Parameters per token count the matmul weights a token passes through (attention projections,
FFN or the selected experts, the router, the LM head); embeddings are a lookup and norms
are negligible. Attention over the context (QK^T, PV) is left out: it is the same for the
dense equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenParams:
    active: int  # weights a token multiplies through
    dense: int  # the same with every expert active (= active for dense models)


def attention_params(config) -> int:
    """Projection weights of one attention layer: GQA's q/k/v/o, or MLA's (DeepSeek-V3:
    the q LoRA or q projection, the joint kv down-projection with the rope key, the kv
    up-projection, o), as the plain (prefill) form multiplies through them."""
    h = config.hidden_size
    if getattr(config, "is_mla", False):
        heads = config.num_attention_heads
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        q = (h * config.q_lora_rank + config.q_lora_rank * heads * qk if config.q_lora_rank
             else h * heads * qk)
        kv_down = h * (config.kv_lora_rank + config.qk_rope_head_dim)
        kv_up = config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
        return q + kv_down + kv_up + heads * config.v_head_dim * h
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return h * q + 2 * h * kv + q * h


def params_per_token(config) -> TokenParams:
    """From a models.config.ModelConfig (HF field names)."""
    h = config.hidden_size
    attention = attention_params(config)
    ffn_mult = 3  # gate, up, down (SwiGLU / GeGLU)
    active = dense = h * config.vocab_size  # LM head
    for layer in range(config.num_hidden_layers):
        active += attention
        dense += attention
        if config.is_moe_layer(layer):
            expert = ffn_mult * h * config.moe_intermediate_size
            shared = ffn_mult * h * config.shared_expert_intermediate_size
            router = h * config.num_local_experts
            active += router + config.num_experts_per_tok * expert + shared
            dense += router + config.num_local_experts * expert + shared
        else:
            ffn = ffn_mult * h * config.intermediate_size
            active += ffn
            dense += ffn
    return TokenParams(active, dense)


def request_flops(params: TokenParams, num_prompt_tokens: int, num_cached_tokens: int,
                  num_generated_tokens: int) -> tuple[int, int]:
    """(active, dense-equivalent) FLOPs of one request."""
    tokens = max(0, num_prompt_tokens - num_cached_tokens) + num_generated_tokens
    return 2 * params.active * tokens, 2 * params.dense * tokens
