"""Bad checkpoints give one-line ModelLoadErrors that name the file and the fix."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.errors import ModelLoadError
from models.loading import load_model
from tests.models.hf_reference import make_hf_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_hf_checkpoint("llama", path)
    return path


def _copy_with(tmp_path, src, mutate_config=None, mutate_tensors=None):
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    if mutate_config:
        mutate_config(config)
    if mutate_tensors:
        mutate_tensors(tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def _one_line_error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path, dtype="float32")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_architecture(tmp_path, llama_dir):
    path = _copy_with(tmp_path, llama_dir, mutate_config=lambda c: c.update(model_type="gpt_neox"))
    message = _one_line_error(path)
    assert "config.json" in message and "gpt_neox" in message and "llama" in message


def test_missing_tensor(tmp_path, llama_dir):
    path = _copy_with(
        tmp_path, llama_dir,
        mutate_tensors=lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"),
    )
    message = _one_line_error(path)
    assert str(path) in message and "layers.1.self_attn.qkv_proj" in message


def test_shape_mismatch(tmp_path, llama_dir):
    def grow(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(97, 64)

    path = _copy_with(tmp_path, llama_dir, mutate_tensors=grow)
    message = _one_line_error(path)
    assert "model.layers.0.mlp.up_proj.weight" in message and "(97, 64)" in message
    assert "(96, 64)" in message


def test_directory_without_weights(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    message = _one_line_error(tmp_path)
    assert "no *.safetensors" in message and "never unpickles" in message


def test_missing_path_names_embedded_models(tmp_path):
    message = _one_line_error(tmp_path / "nope")
    assert "smollm2-135m-instruct" in message


def test_sharded_checkpoint_loads(tmp_path, llama_dir):
    tensors = load_file(str(llama_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    a = load_model(tmp_path, dtype="float32").model
    b = load_model(llama_dir, dtype="float32").model
    ids = torch.arange(20).unsqueeze(0)
    torch.testing.assert_close(a.logits_dense(ids), b.logits_dense(ids), atol=0, rtol=0)


def test_import_models_does_not_import_ray():
    code = "import sys, models, models.loading, models.transformer; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
