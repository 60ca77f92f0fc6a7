"""Tiny random checkpoints made and saved by transformers (the reference), for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

# name -> (model_type, extra config fields)
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_mqa": ("llama", dict(num_key_value_heads=1)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral_window": ("mistral", dict(sliding_window=16)),
    "qwen2_window": ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1],
        norm_topk_prob=False,
    )),
    "qwen2_moe_norm": ("qwen2_moe", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=True, num_key_value_heads=1,
    )),
}


def make_hf_checkpoint(variant: str, path: Path, seed: int = 0):
    """Save a random transformers model of `variant` to `path`; return the HF model (fp32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = VARIANTS[variant]
    config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves norms at 1 and small weights; perturb everything so parity means something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    model.eval()
    model.save_pretrained(path)
    return model
