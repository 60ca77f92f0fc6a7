"""Mixtral GGUF files: llama.cpp writes Mixtral as a `llama` file with `llama.expert_count`.

A tiny random Mixtral from transformers (2 layers, width 64, 4 experts, top-2) is written as
GGUF the way llama.cpp's converter lays it out: q/k rows permuted as for every llama file, the
router as `blk.N.ffn_gate_inp`, the experts w1/w3/w2 stacked into `ffn_gate_exps` /
`ffn_up_exps` / `ffn_down_exps` ([E, rows, cols]), or, as in files converted before the merged
tensors existed, one `blk.N.ffn_gate.E.weight` per expert. docpipe reads it back as `mixtral`:
the config and the HF tensors equal the checkpoint's, and the logits are transformers' (F32).
A Q8_0 file (norms and router left F32, as llama.cpp leaves them) gives exactly the
dequantized weights, and the logits of transformers running those weights, dequantized at
load or kept packed (the experts too: per-expert PackedWeights).

transformers 5.24's own GGUF loader is no second reference here: it reads `llama` files as
LlamaForCausalLM whatever `llama.expert_count` says (its TENSOR_PROCESSORS and config mapping
know no mixtral), so the expert tensors find no home and the dense MLP it builds is random.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from models.config import ModelConfig
from models.gguf import iter_gguf_tensors, load_gguf, read_gguf_config
from models.loading import build_model, load_model, load_state_dict
from models.quant import PackedLinear, PackedWeight, pack_gguf_weights
from tests.models.test_gguf import llama_cpp_permute, one_line_error, write_gguf
from tests.tiny_checkpoint import make_tiny_checkpoint

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, NUM_EXPERTS, TOP_K = 2, 4, 2, 4, 2
SEQ_LEN = 24

# HF name (after `model.layers.{i}.`) -> GGUF name (after `blk.{i}.`), written out here
# independently of models/gguf.py's table.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
EXPERT_PROJ = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def hf_state_of(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def mixtral_gguf_tensors(hf: dict[str, np.ndarray], per_expert: bool) -> dict[str, np.ndarray]:
    out = {gguf_name: hf[name] for name, gguf_name in TOP_NAMES.items()}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        for name, gguf_name in LAYER_NAMES.items():
            value = hf[p + name]
            if name == "self_attn.q_proj.weight":
                value = llama_cpp_permute(value, NUM_HEADS)
            elif name == "self_attn.k_proj.weight":
                value = llama_cpp_permute(value, NUM_KV_HEADS)
            out[f"blk.{i}.{gguf_name}"] = np.ascontiguousarray(value)
        for w, proj in EXPERT_PROJ.items():
            experts = [hf[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] for e in range(NUM_EXPERTS)]
            if per_expert:
                out |= {f"blk.{i}.{proj}.{e}.weight": x for e, x in enumerate(experts)}
            else:
                out[f"blk.{i}.{proj}_exps.weight"] = np.stack(experts)
    return out


def mixtral_metadata(config: dict) -> dict:
    a = "llama"
    return {
        "general.name": "tiny-mixtral",
        f"{a}.block_count": NUM_LAYERS, f"{a}.context_length": config["max_position_embeddings"],
        f"{a}.embedding_length": config["hidden_size"],
        f"{a}.feed_forward_length": config["intermediate_size"],
        f"{a}.attention.head_count": NUM_HEADS, f"{a}.attention.head_count_kv": NUM_KV_HEADS,
        f"{a}.rope.freq_base": float(config["rope_parameters"]["rope_theta"]),
        f"{a}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        f"{a}.rope.dimension_count": config["hidden_size"] // NUM_HEADS,
        f"{a}.expert_count": NUM_EXPERTS, f"{a}.expert_used_count": TOP_K,
        "tokenizer.ggml.bos_token_id": config["bos_token_id"],
        "tokenizer.ggml.eos_token_id": config["eos_token_id"],
    }


def quantized(tensors: dict[str, np.ndarray], qtype) -> dict:
    """llama.cpp's choice: 1-D tensors (norms) and the router stay F32, the rest `qtype`."""
    return {n: v if v.ndim == 1 or "ffn_gate_inp" in n else (v, qtype) for n, v in tensors.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("mixtral-hf"), "mixtral", seed=1)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return path, hf_state_of(path), json.loads((path / "config.json").read_text()), ref


@pytest.fixture(scope="module")
def gguf_files(checkpoint, tmp_path_factory):
    _, hf, config, _ = checkpoint
    out = tmp_path_factory.mktemp("mixtral-gguf")
    files = {}
    for layout in ("merged", "per_expert"):
        files[layout] = out / f"tiny-mixtral-{layout}.gguf"
        write_gguf(files[layout], "llama", mixtral_gguf_tensors(hf, layout == "per_expert"),
                   mixtral_metadata(config))
    for layout in ("merged", "per_expert"):  # Q8_0 blocks are per row: the same either way
        files[f"q8_0_{layout}"] = out / f"tiny-mixtral-q8_0-{layout}.gguf"
        write_gguf(files[f"q8_0_{layout}"], "llama",
                   quantized(mixtral_gguf_tensors(hf, layout == "per_expert"), Q.Q8_0),
                   mixtral_metadata(config))
    return files


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))


def docpipe_model(path: Path, packed: bool = False):
    """As models.loading.load_model builds a GGUF model (the tiny file has no vocabulary)."""
    hf_config, tensors = iter_gguf_tensors(path)
    model = build_model(ModelConfig.from_hf_dict(hf_config, source=str(path)), torch.float32, "cpu")
    if packed:
        tensors = pack_gguf_weights(model, path, hf_config, torch.float32)
    load_state_dict(model, tensors, str(path))
    return model


@pytest.mark.parametrize("layout", ["merged", "per_expert"])
def test_config_and_tensors_equal_the_checkpoint(checkpoint, gguf_files, layout):
    _, hf, hf_config, _ = checkpoint
    config, state = load_gguf(gguf_files[layout])
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "num_local_experts",
                "num_experts_per_tok", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "sliding_window"):
        assert config[key] == hf_config[key], key
    assert config["rope_theta"] == hf_config["rope_parameters"]["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"])
    ours = ModelConfig.from_hf_dict(config | {"rms_norm_eps": hf_config["rms_norm_eps"]})
    assert ours == ModelConfig.from_hf_dict(hf_config)  # the eps is stored as an f32
    assert set(state) == set(hf)  # the Hub's names: block_sparse_moe.experts.{e}.w1 ...
    for name, want in hf.items():
        assert torch.equal(state[name], torch.from_numpy(want)), name


@pytest.mark.parametrize("layout", ["merged", "per_expert"])
def test_logits_match_transformers(checkpoint, gguf_files, layout):
    path, _, _, ref = checkpoint
    with torch.no_grad():
        want = ref(ids()).logits
    ours = docpipe_model(gguf_files[layout])
    torch.testing.assert_close(ours.logits_dense(ids()), want, atol=1e-4, rtol=1e-4)
    from_hf = load_model(path, dtype="float32").model  # the same model from the safetensors
    torch.testing.assert_close(ours.logits_dense(ids()), from_hf.logits_dense(ids()),
                               atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def dequantized_reference(checkpoint, gguf_files, tmp_path_factory):
    """transformers running the Q8_0 file's dequantized weights (gguf-py's dequantizer)."""
    import gguf
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    path, hf, _, _ = checkpoint
    reader = gguf.GGUFReader(str(gguf_files["q8_0_merged"]))
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    merged = mixtral_gguf_tensors(hf, per_expert=False)
    inverse = {}  # GGUF name -> HF name(s), undoing the permutation on the dequantized rows
    for name in hf:
        inverse.setdefault(_gguf_name_of(name), []).append(name)
    state = {}
    for gguf_name, hf_names in inverse.items():
        value = stored[gguf_name].reshape(merged[gguf_name].shape).astype(np.float32)
        if gguf_name.endswith("attn_q.weight"):
            value = _unpermute(value, NUM_HEADS)
        elif gguf_name.endswith("attn_k.weight"):
            value = _unpermute(value, NUM_KV_HEADS)
        for hf_name in hf_names:
            e = hf_name.split(".experts.")[1].split(".")[0] if ".experts." in hf_name else None
            state[hf_name] = np.ascontiguousarray(value[int(e)] if e is not None else value)
    out = tmp_path_factory.mktemp("mixtral-dequantized")
    shutil.copy(path / "config.json", out / "config.json")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    return state, ref


def _gguf_name_of(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    if rest.startswith("block_sparse_moe.experts."):
        return f"blk.{i}.{EXPERT_PROJ[rest.split('.')[3]]}_exps.weight"
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of llama_cpp_permute, written out: per head, pairs back to halves."""
    rows = weight.shape[0]
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, weight.shape[1])
    return pairs.transpose(0, 2, 1, 3).reshape(weight.shape)


@pytest.mark.parametrize("layout", ["merged", "per_expert"])
def test_q8_0_file_is_its_dequantized_weights(checkpoint, gguf_files, dequantized_reference, layout):
    _, hf, _, _ = checkpoint
    want_state, ref = dequantized_reference
    path = gguf_files[f"q8_0_{layout}"]
    _, state = load_gguf(path)
    assert set(state) == set(want_state)
    for name, want in want_state.items():
        assert torch.equal(state[name], torch.from_numpy(want)), name
    assert not np.array_equal(want_state["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                              hf["model.layers.0.block_sparse_moe.experts.1.w2.weight"])
    with torch.no_grad():
        want = ref(ids()).logits
    torch.testing.assert_close(docpipe_model(path).logits_dense(ids()), want,
                               atol=1e-4, rtol=1e-4)
    packed = docpipe_model(path, packed=True)
    assert isinstance(packed.layers[0].self_attn.qkv_proj, PackedLinear)
    for layer in packed.layers:  # every expert kept as the file's blocks
        for weights, rows in ((layer.mlp.w13, 2 * 96), (layer.mlp.w2, 64)):
            assert len(weights) == NUM_EXPERTS and all(
                isinstance(w, PackedWeight) and w.shape[0] == rows for w in weights)
    assert packed.layers[0].mlp.w13[0].numel() == 2 * 96 * 64  # as the dense [2I, H] slice's
    w1 = torch.from_numpy(want_state["model.layers.1.block_sparse_moe.experts.2.w1.weight"])
    assert torch.equal(packed.layers[1].mlp.w13[2].dequantize()[:96], w1)
    torch.testing.assert_close(packed.logits_dense(ids()), want, atol=1e-4, rtol=1e-4)
    short = ids()[:1, :6]  # at most 16 rows per matmul: the native decode kernel's path
    with torch.no_grad():
        want_short = ref(short).logits
    torch.testing.assert_close(packed.logits_dense(short), want_short, atol=1e-4, rtol=1e-4)


def test_expert_count_mismatch_and_missing_expert(checkpoint, gguf_files, tmp_path):
    _, hf, config, _ = checkpoint
    bad = tmp_path / "three-experts.gguf"
    write_gguf(bad, "llama", mixtral_gguf_tensors(hf, False),
               mixtral_metadata(config) | {"llama.expert_count": 3})
    message = one_line_error(load_gguf, bad)
    assert "three-experts.gguf" in message and "blk.0.ffn_" in message
    assert "expert_count 3" in message and "re-convert" in message

    tensors = mixtral_gguf_tensors(hf, per_expert=True)
    del tensors["blk.1.ffn_up.2.weight"]
    cut = tmp_path / "missing-expert.gguf"
    write_gguf(cut, "llama", tensors, mixtral_metadata(config))
    assert read_gguf_config(cut)["model_type"] == "mixtral"
    message = one_line_error(load_gguf, cut)
    assert "missing-expert.gguf" in message and "blk.1.ffn_up_exps.weight" in message


def test_dense_llama_files_stay_llama(tmp_path):
    from tests.models.test_gguf import tiny_hf_state, write_tiny_llama

    path = write_tiny_llama(tmp_path / "dense.gguf", tiny_hf_state())
    assert read_gguf_config(path)["model_type"] == "llama"
    bad = write_tiny_llama(tmp_path / "no-experts.gguf", tiny_hf_state(),
                           metadata={"llama.expert_count": 4, "llama.expert_used_count": 2})
    message = one_line_error(load_gguf, bad)  # experts announced, none stored
    assert "no-experts.gguf" in message and "blk.0.ffn_gate_inp.weight" in message
