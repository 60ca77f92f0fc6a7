"""A tiny random checkpoint on disk (HF layout) with a real byte-level tokenizer and a ChatML
template, so pipeline, worker and job tests exercise the same loading paths as real models."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_byte_tokenizer(path: Path) -> int:
    """Byte-level BPE with no merges: 256 byte tokens + 3 specials. Returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_unicode))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None,
        "pad_token": "<|endoftext|>", "add_bos_token": False,
    }))
    return tok.get_vocab_size()


def make_tiny_checkpoint(path: Path, model_type: str = "llama", seed: int = 0,
                         max_position_embeddings: int = 16384, **extra) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(path)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=max_position_embeddings, eos_token_id=vocab - 1,
              bos_token_id=vocab - 3)
    if model_type == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen3_moe":
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if model_type == "gemma3_text":  # one local (window 16) and one global layer
        kw.update(head_dim=32, sliding_window=16, query_pre_attn_scalar=32,
                  layer_types=["sliding_attention", "full_attention"])
    kw.update(extra)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path
