"""GGUF reading: dequantization, HF names and q/k row order, config, and one-line errors.

Synthetic files are written with gguf-py's `GGUFWriter` and checked against `gguf.quants`;
the embedded SmolLM2 file is checked against the weights transformers loads from it.
"""

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from models.config import ModelConfig
from models.errors import ModelLoadError
from models.gguf import load_gguf, open_gguf, read_gguf_config, read_gguf_metadata
from models.loading import build_model, load_state_dict

# 2 layers, width 64, 4 heads of 16, 2 KV heads.
NUM_LAYERS, HIDDEN, NUM_HEADS, NUM_KV_HEADS, FFN, VOCAB = 2, 64, 4, 2, 96, 32
HEAD_DIM = HIDDEN // NUM_HEADS

# HF name -> GGUF name, written out independently of models/gguf.py's table.
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    **{
        f"model.layers.{i}.{hf}": f"blk.{i}.{g}"
        for i in range(NUM_LAYERS)
        for hf, g in [
            ("input_layernorm.weight", "attn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
        ]
    },
}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's half-split rotary rows -> interleaved pairs."""
    rows = weight.shape[0]
    split = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def tiny_hf_state(tied: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        **({} if tied else {"lm_head.weight": (VOCAB, HIDDEN)}),
    }
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (NUM_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (NUM_KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (NUM_KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, NUM_HEADS * HEAD_DIM),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_gguf(path, arch: str, tensors: dict, metadata: dict | None = None) -> None:
    """tensors: name -> float32 array (stored F32), or (array, qtype): a float array is quantized
    by gguf-py, a uint8 array is taken as already-quantized blocks."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, value in tensors.items():
        data, qtype = value if isinstance(value, tuple) else (value, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        elif data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_metadata(arch: str = "llama") -> dict:
    return {
        f"{arch}.block_count": NUM_LAYERS,
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": NUM_HEADS,
        f"{arch}.attention.head_count_kv": NUM_KV_HEADS,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.dimension_count": HEAD_DIM,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def write_tiny_llama(path, hf_state, arch="llama", drop=(), extra_tensors=None, metadata=None):
    """The HF state as llama.cpp would store it: GGUF names, q/k rows permuted."""
    tensors = {}
    for name, value in hf_state.items():
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, NUM_HEADS)
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, NUM_KV_HEADS)
        if HF_TO_GGUF[name] not in drop:
            tensors[HF_TO_GGUF[name]] = value
    write_gguf(path, arch, tensors | (extra_tensors or {}), tiny_metadata(arch) | (metadata or {}))
    return path


def one_line_error(fn, *args) -> str:
    with pytest.raises(ModelLoadError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- synthetic files ------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    rng = np.random.default_rng(1)
    # Varied block scales, an all-zero block and a constant block exercise d and m.
    data = (rng.standard_normal((3, 8, 64)) * rng.uniform(0.01, 10, (3, 8, 1))).astype(np.float32)
    data[0, 0, :32] = 0.0
    data[1, 2, 32:] = 3.5
    write_gguf(tmp_path / "q.gguf", "llama", {"w": (data, qtype)})
    raw = gguf.quants.quantize(data, qtype)
    want = gguf.quants.dequantize(raw, qtype)
    got = open_gguf(tmp_path / "q.gguf").read_tensor("w")
    assert got.shape == (3, 8, 64) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_tiny_llama_names_and_rotary_rows(tmp_path):
    hf_state = tiny_hf_state(tied=False)
    config, state = load_gguf(write_tiny_llama(tmp_path / "tiny.gguf", hf_state))
    assert set(state) == set(hf_state)
    for name, want in hf_state.items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], torch.from_numpy(want), rtol=0, atol=0)
    assert config["tie_word_embeddings"] is False
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim")} == {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS, "num_key_value_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
    }


def test_tiny_llama_loads_into_docpipe_model(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", tiny_hf_state(tied=True))
    config, state = load_gguf(path, dtype=torch.bfloat16)
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in state
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    model_config = ModelConfig.from_hf_dict(config, source=str(path))
    assert model_config == ModelConfig.from_hf_dict(read_gguf_config(path), source=str(path))
    load_state_dict(build_model(model_config, torch.bfloat16, "cpu"), iter(state.items()), str(path))


def test_metadata_values(tmp_path):
    metadata = {
        "t.bool": True, "t.u32": 7, "t.f32": 0.5, "t.str": "héllo",
        "t.ints": [1, 2, 3], "t.strs": ["a", "b c", ""], "t.floats": [0.25, -1.0],
    }
    write_gguf(tmp_path / "m.gguf", "llama", {"w": np.zeros(4, np.float32)}, metadata)
    got = read_gguf_metadata(tmp_path / "m.gguf")
    assert got["general.architecture"] == "llama"
    assert {k: got[k] for k in metadata} == metadata
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    want = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert got == want


def _llama3_divisors(head_dim, theta, factor, low, high, old_ctx):
    # llama.cpp's convert_hf_to_gguf loop for rope_freqs.weight, written out per frequency.
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    theta = 500000.0
    divisors = _llama3_divisors(HEAD_DIM, theta, 8.0, 1.0, 4.0, 8192)
    path = write_tiny_llama(tmp_path / "l3.gguf", tiny_hf_state(), extra_tensors={"rope_freqs.weight": divisors},
                            metadata={"llama.rope.freq_base": theta})
    config, state = load_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in state

    odd = _llama3_divisors(HEAD_DIM, theta, 8.0, 2.0, 4.0, 4096)
    path = write_tiny_llama(tmp_path / "odd.gguf", tiny_hf_state(), extra_tensors={"rope_freqs.weight": odd},
                            metadata={"llama.rope.freq_base": theta})
    message = one_line_error(load_gguf, path)
    assert "odd.gguf" in message and "rope_freqs.weight" in message


def test_linear_rope_scaling(tmp_path):
    path = write_tiny_llama(tmp_path / "lin.gguf", tiny_hf_state(),
                            metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    assert read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.TQ2_0])
def test_unsupported_tensor_type(tmp_path, qtype):
    # gguf-py cannot quantize to these: hand-build zero blocks for one row of 256 values.
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    odd = (np.zeros((FFN, 256 // block_size * type_size), np.uint8), qtype)
    path = write_tiny_llama(tmp_path / "odd_type.gguf", tiny_hf_state(),
                            extra_tensors={"blk.1.ffn_up.weight": odd})
    message = one_line_error(load_gguf, path)
    assert "odd_type.gguf" in message and "blk.1.ffn_up.weight" in message
    assert qtype.name in message and "Q4_K" in message and "Q8_0" in message
    assert "re-quantize" in message


def test_missing_tensor(tmp_path):
    path = write_tiny_llama(tmp_path / "holey.gguf", tiny_hf_state(), drop={"blk.1.attn_v.weight"})
    message = one_line_error(load_gguf, path)
    assert "holey.gguf" in message and "blk.1.attn_v.weight" in message


def test_unknown_architecture(tmp_path):
    path = write_tiny_llama(tmp_path / "other.gguf", tiny_hf_state(), arch="gpt2")
    for fn in (load_gguf, read_gguf_config):
        message = one_line_error(fn, path)
        assert "other.gguf" in message and "'gpt2'" in message and "llama" in message


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    assert "weights.gguf" in one_line_error(load_gguf, path)
    assert "missing.gguf" in one_line_error(read_gguf_metadata, tmp_path / "missing.gguf")


def test_truncated_file(tmp_path):
    path = write_tiny_llama(tmp_path / "full.gguf", tiny_hf_state())
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) - 100])  # tensor data cut short
    assert "cut.gguf" in one_line_error(load_gguf, cut)
    cut.write_bytes(data[:200])  # header cut short
    assert "cut.gguf" in one_line_error(read_gguf_metadata, cut)


# -- the embedded SmolLM2 file against transformers ----------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.config, model.state_dict()


def test_smollm2_metadata(smollm2_gguf):
    meta = read_gguf_metadata(smollm2_gguf)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2, hf_smollm2):
    config, _ = smollm2
    hf_config, _ = hf_smollm2
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(hf_config, key), key
    assert config["rope_theta"] == hf_config.rope_parameters["rope_theta"]
    assert "rope_scaling" not in config


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 1, 14, 29])
def test_smollm2_weights_match_transformers(smollm2, hf_smollm2, layer):
    _, state = smollm2
    _, hf_state = hf_smollm2
    names = [n for n in state if n.startswith(f"model.layers.{layer}.")]
    assert len(names) == 9
    if layer == 0:
        names += ["model.embed_tokens.weight", "model.norm.weight"]
    for name in names:
        if not torch.equal(state[name], hf_state[name]):  # equal so far; assert_close is slow
            torch.testing.assert_close(state[name], hf_state[name], rtol=0, atol=1e-6, msg=name)
    assert set(state) == set(hf_state) - {"lm_head.weight"}  # tied: transformers lists its alias
