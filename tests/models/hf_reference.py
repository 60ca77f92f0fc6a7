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


_GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    # not the default 10000, so a lost local base shows
    "sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0},
}
# Architectures added with issue 11, kept apart from VARIANTS (which test_parity.py runs):
# head_dim differs from hidden_size / num_attention_heads in all of them.
NEW_ARCH_VARIANTS: dict[str, tuple[str, dict]] = {
    "qwen3": ("qwen3", dict(head_dim=32)),
    "qwen3_window": ("qwen3", dict(
        head_dim=32, num_hidden_layers=3, use_sliding_window=True, sliding_window=16,
        max_window_layers=1,
    )),
    "qwen3_moe": ("qwen3_moe", dict(
        head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, mlp_only_layers=[1],
    )),
    "qwen3_moe_sparse": ("qwen3_moe", dict(
        head_dim=64, num_hidden_layers=4, num_key_value_heads=1, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
        decoder_sparse_step=2,
    )),
    # every layer windowed: the engine drops blocks behind the window
    "qwen3_moe_window": ("qwen3_moe", dict(
        head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        use_sliding_window=True, sliding_window=16,
    )),
    # 6 layers, default interleave from the pattern (here 3: layers 2 and 5 global), linear
    # RoPE scaling on the global layers, a window shorter than the test sequences.
    "gemma3": ("gemma3_text", dict(
        head_dim=64, num_hidden_layers=6, sliding_window=16, sliding_window_pattern=3,
        query_pre_attn_scalar=48, rope_parameters=_GEMMA3_ROPE,
    )),
    # explicit layer_types, final logit softcapping, untied lm_head, MQA
    "gemma3_capped": ("gemma3_text", dict(
        head_dim=32, num_hidden_layers=3, num_key_value_heads=1, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=2.0, tie_word_embeddings=False,
    )),
}


def make_new_arch_checkpoint(variant: str, path: Path, seed: int = 0):
    """As `make_hf_checkpoint`, for NEW_ARCH_VARIANTS; no EOS token (greedy runs go on to
    max_new_tokens in transformers and docpipe alike)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = NEW_ARCH_VARIANTS[variant]
    fields = {**TINY, "eos_token_id": None, "bos_token_id": None, "pad_token_id": None, **extra}
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.eval()
    model.save_pretrained(path)
    return model


def assert_chat_like_transformers(ours, hf, conversations) -> None:
    """Our chat template renders each conversation (with and without the generation prompt)
    to the same text and token ids as the transformers tokenizer `hf`."""
    for messages in conversations:
        for add in (True, False):
            want = hf.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=add, tokenize=False) == want
            want_ids = hf(want, add_special_tokens=False)["input_ids"]
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == want_ids


def assert_breakage_moves_logits(path: Path, ref, breakage, seq_len: int) -> None:
    """docpipe's model at `path` equals the transformers reference `ref` (1e-4, fp32), and
    `breakage(model)` (one feature switched off) moves the logits by more than 1e-3: the
    parity tests would catch that feature going missing."""
    from models.loading import load_model

    model = load_model(path, dtype="float32").model
    ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(model.logits_dense(ids), want, atol=1e-4, rtol=1e-4)
    breakage(model)
    assert (model.logits_dense(ids) - want).abs().max() > 1e-3
