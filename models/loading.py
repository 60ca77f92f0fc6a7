"""Load checkpoints (HF safetensors directories, GGUF files) into `TransformerLM`.

Both formats are first read as `(hf_config, {hf_name: tensor})`; one rename table maps HF
names onto docpipe's parameters, some of which are fused:

    q_proj | k_proj | v_proj          -> self_attn.qkv_proj   (rows stacked in that order)
    gate_proj | up_proj               -> mlp.gate_up_proj
    experts.{e}.gate_proj | up_proj   -> mlp.w13[e]           (mixtral: w1 | w3)
    experts.{e}.down_proj             -> mlp.w2[e]            (mixtral: w2)

An MLA model (deepseek_v3) reads its attention tensors through `MLA_WEIGHT_RENAMES` first
(its q_proj is not the fused qkv one); its gate's `e_score_correction_bias` is set as the
block's selection bias, and the multi-token-prediction layers past num_hidden_layers are
skipped (as transformers skips them).

Every parameter element must be written exactly once, so a missing tensor is detected without
a list of expected names. Nothing is unpickled: `.bin`/`.pt` checkpoints are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from models.config import ModelConfig
from models.dtypes import resolve_dtype
from models.errors import ModelLoadError
from models.layers import param_dtype
from models.moe import EXPERT_BIAS_FILE, apply_expert_bias
from models.registry import EMBEDDED_MODELS, resolve_model_path
from models.transformer import TransformerLM

logger = logging.getLogger(__name__)

_L = r"model\.layers\.(?P<l>\d+)\."
_E = r"\.experts\.(?P<e>\d+)\."
# (HF name pattern, docpipe parameter template). A `part` group selects a row block of a
# fused parameter; an `e` group selects the expert.
WEIGHT_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), t)
    for p, t in [
        (r"model\.embed_tokens\.weight", "embed_tokens"),
        (r"model\.norm\.weight", "norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
        (_L + r"(?P<n>input_layernorm|post_attention_layernorm)\.weight", "layers.{l}.{n}.weight"),
        (_L + r"self_attn\.(?P<part>q|k|v)_proj\.(?P<w>weight|bias)", "layers.{l}.self_attn.qkv_proj.{w}"),
        (_L + r"self_attn\.o_proj\.weight", "layers.{l}.self_attn.o_proj.weight"),
        # qwen3 / gemma3: per-head q and k RMSNorms; gemma3: norms around the MLP.
        (_L + r"self_attn\.(?P<n>q_norm|k_norm)\.weight", "layers.{l}.self_attn.{n}.weight"),
        (_L + r"(?P<n>pre_feedforward_layernorm|post_feedforward_layernorm)\.weight",
         "layers.{l}.{n}.weight"),
        (_L + r"mlp\.(?P<part>gate|up)_proj\.weight", "layers.{l}.mlp.gate_up_proj.weight"),
        (_L + r"mlp\.down_proj\.weight", "layers.{l}.mlp.down_proj.weight"),
        (_L + r"(?:mlp|block_sparse_moe)\.gate\.weight", "layers.{l}.mlp.gate.weight"),
        (_L + r"mlp" + _E + r"(?P<part>gate|up)_proj\.weight", "layers.{l}.mlp.w13"),
        (_L + r"mlp" + _E + r"down_proj\.weight", "layers.{l}.mlp.w2"),
        (_L + r"block_sparse_moe" + _E + r"(?P<part>w1|w3)\.weight", "layers.{l}.mlp.w13"),
        (_L + r"block_sparse_moe" + _E + r"w2\.weight", "layers.{l}.mlp.w2"),
        (_L + r"mlp\.shared_expert\.(?P<part>gate|up)_proj\.weight",
         "layers.{l}.mlp.shared_expert.gate_up_proj.weight"),
        (_L + r"mlp\.shared_expert\.down_proj\.weight", "layers.{l}.mlp.shared_expert.down_proj.weight"),
        (_L + r"mlp\.shared_expert_gate\.weight", "layers.{l}.mlp.shared_expert_gate.weight"),
        # deepseek_v3: n_shared_experts fused into one ungated shared expert
        (_L + r"mlp\.shared_experts\.(?P<part>gate|up)_proj\.weight",
         "layers.{l}.mlp.shared_expert.gate_up_proj.weight"),
        (_L + r"mlp\.shared_experts\.down_proj\.weight",
         "layers.{l}.mlp.shared_expert.down_proj.weight"),
    ]
]
# Multi-head latent attention (models.mla): tried before WEIGHT_RENAMES for MLA models.
MLA_WEIGHT_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), t)
    for p, t in [
        (_L + r"self_attn\.(?P<n>q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
         r"\.(?P<w>weight|bias)", "layers.{l}.self_attn.{n}.{w}"),
        (_L + r"self_attn\.(?P<n>q_a_layernorm|kv_a_layernorm)\.weight",
         "layers.{l}.self_attn.{n}.weight"),
    ]
]
_SELECTION_BIAS = re.compile(_L + r"mlp\.gate\.e_score_correction_bias")
_PART_INDEX = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1, "w1": 0, "w3": 1}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(slots=True)
class LoadedModel:
    model: TransformerLM
    tokenizer: object  # models.tokenizer.Tokenizer
    config: ModelConfig
    model_id: str  # display name: embedded name or path
    weights_hash: str  # sha256 over the weight files (identity for fingerprints and caches)


def _target_view(model: TransformerLM, config: ModelConfig, target: str, e: str | None, part: str | None):
    try:
        param = model.get_parameter(target)
    except AttributeError:
        return None, None
    view = param.data
    if e is not None:
        view = view[int(e)]
    if part is not None:
        idx = _PART_INDEX[part]
        if ".qkv_proj." in target:
            q = config.num_attention_heads * config.head_dim
            kv = config.num_key_value_heads * config.head_dim
            sizes = (q, kv, kv)
        else:
            half = view.shape[0] // 2
            sizes = (half, half)
        view = view.narrow(0, sum(sizes[:idx]), sizes[idx])
    return param, view


def _rename(name: str, mla: bool = False) -> tuple[dict[str, str | None], str] | None:
    """(regex groups, docpipe parameter name) for an HF tensor name, or None if unknown;
    `mla`: the model's attention is models.mla's."""
    for pattern, template in (MLA_WEIGHT_RENAMES if mla else []) + WEIGHT_RENAMES:
        m = pattern.fullmatch(name)
        if m:
            groups = m.groupdict()
            return groups, template.format(**groups)
    return None


def load_state_dict(
    model: TransformerLM, tensors: Iterator[tuple[str, torch.Tensor]], source: str
) -> None:
    """Copy HF-named tensors into `model` (casting to its dtype); check full coverage."""
    config = model.config
    filled: dict[str, int] = {}
    for name, tensor in tensors:
        if _IGNORED.match(name):
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if config.is_mla and layer and int(layer.group(1)) >= config.num_hidden_layers:
            continue  # DeepSeek-V3's multi-token-prediction module: not used for decoding
        bias = _SELECTION_BIAS.fullmatch(name)
        if bias and config.is_moe_layer(int(bias["l"])):
            mlp = model.layers[int(bias["l"])].mlp
            if tuple(tensor.shape) != (mlp.num_experts,):
                raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"the config expects ({mlp.num_experts},)")
            mlp.set_selection_bias(tensor)
            continue
        match = _rename(name, config.is_mla)
        if match is None:
            logger.warning("%s: ignoring unknown tensor %s", source, name)
            continue
        groups, target = match
        if target == "lm_head.weight" and model.lm_head is None:
            continue  # tied embeddings: the checkpoint's copy is redundant
        param, view = _target_view(model, config, target, groups.get("e"), groups.get("part"))
        if view is None:
            raise ModelLoadError(
                f"{source}: tensor {name} does not fit a {config.model_type} model with this "
                "config.json (layer or module missing); check that config.json belongs to these weights"
            )
        if tuple(view.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(view.shape)}; check that config.json belongs to these weights"
            )
        view.copy_(tensor)
        filled[target] = filled.get(target, 0) + view.numel()
    for target, param in model.named_parameters():
        done = filled.get(target, 0)
        assert done <= param.numel(), f"{target} written twice: duplicate tensors in {source}?"
        if done < param.numel():
            raise ModelLoadError(
                f"{source}: no tensor for parameter {target} (HF name like "
                f"{_hf_name_hint(target)}); the checkpoint is incomplete or not a "
                f"{config.model_type} model"
            )


def _hf_name_hint(target: str) -> str:
    return re.sub(r"^layers\.", "model.layers.", target).replace("qkv_proj", "q_proj").replace(
        "gate_up_proj", "gate_proj"
    )


# -- formats ------------------------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: shard {f.name} is missing; download all shards")
        return _with_expert_bias(path, files)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" (found {', '.join(pickled)}: docpipe never unpickles; convert them to safetensors)"
            if pickled
            else ""
        )
        raise ModelLoadError(f"{path}: no *.safetensors weights in this directory{hint}")
    return files


# MoE selection biases written by `docpipe calibrate --balance` (models.moe): a file of its
# own beside the weights, hashed with them (it changes outputs) but set by apply_expert_bias.
def _with_expert_bias(path: Path, files: list[Path]) -> list[Path]:
    bias = path / EXPERT_BIAS_FILE
    return files + [bias] if bias.is_file() and bias not in files else files


def _weight_files(files: list[Path]) -> list[Path]:
    return [f for f in files if f.name != EXPERT_BIAS_FILE]


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as exc:  # safetensors' own error type: a damaged or cut file
            raise ModelLoadError(
                f"{f}: not a readable safetensors file ({str(exc).splitlines()[0]}); "
                f"re-download or re-save the checkpoint") from None
        with handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


@lru_cache(maxsize=16)
def _hash_files(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def weights_hash(files: list[Path]) -> str:
    paths = tuple(str(f) for f in files)
    stamps = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(paths, stamps)


def build_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> TransformerLM:
    """An empty model whose parameters are created on `device` in `dtype` (no cast after)."""
    with torch.device(device), param_dtype(dtype):
        model = TransformerLM(config)
    return model.eval()


def load_model(
    name_or_path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu",
    quantization: str = "auto",
) -> LoadedModel:
    """Load a checkpoint and its tokenizer: an embedded name, a `.gguf` file or an HF directory.
    `dtype`: a name or "auto" (see models.dtypes), resolved for `device`. `quantization`:
    "gguf" keeps a GGUF file's quantized linear weights packed (models.quant), "none"
    dequantizes them at load, "auto" chooses (models.quant.resolve_quantization)."""
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    model_id = str(name_or_path) if str(name_or_path) in EMBEDDED_MODELS else str(path)
    if path.is_file() and path.suffix == ".gguf":
        from models.gguf import iter_gguf_tensors

        hf_config, tensors = iter_gguf_tensors(path, dtype=torch_dtype)
        config = ModelConfig.from_hf_dict(hf_config, source=str(path))
        config.name = model_id
        model = build_model(config, torch_dtype, device)
        from models.quant import pack_gguf_weights, resolve_quantization

        if resolve_quantization(quantization, path, device) == "gguf":
            tensors = pack_gguf_weights(model, path, hf_config, torch_dtype)  # and the rest
        load_state_dict(model, tensors, str(path))  # one dequantized tensor at a time
        from models.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(path)
        files = [path]
    elif path.is_dir():
        if quantization == "gguf":
            raise ValueError(f"quantization='gguf' needs a .gguf file, not {path}; use 'none'")
        config = ModelConfig.from_json_file(path / "config.json")
        config.name = model_id
        files = _safetensors_files(path)
        model = build_model(config, torch_dtype, device)
        load_state_dict(model, _iter_safetensors(_weight_files(files)), str(path))
        apply_expert_bias(model, path)
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            from models.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(path)
    else:
        raise ModelLoadError(
            f"{path}: not a model; pass a .gguf file or a directory with config.json and *.safetensors"
        )
    logger.info("loaded %s (%s, %s) on %s", model_id, config.model_type, torch_dtype, device)
    return LoadedModel(model, tokenizer, config, model_id, weights_hash(files))


@dataclass(slots=True)
class ModelInfo:
    """What a driver needs to build prompts for a model, without its weights."""

    model_id: str
    config: ModelConfig
    tokenizer: object
    weights_hash: str

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings


def describe_model(name_or_path: str | Path) -> ModelInfo:
    path = resolve_model_path(name_or_path)
    model_id = str(name_or_path) if str(name_or_path) in EMBEDDED_MODELS else str(path)
    if path.is_file() and path.suffix == ".gguf":
        from models.gguf import read_gguf_config
        from models.tokenizer import Tokenizer

        config = ModelConfig.from_hf_dict(read_gguf_config(path), source=str(path))
        return ModelInfo(model_id, config, Tokenizer.from_gguf(path), weights_hash([path]))
    if path.is_dir():
        config = ModelConfig.from_json_file(path / "config.json")
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            from models.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(path)
        return ModelInfo(model_id, config, tokenizer, weights_hash(_safetensors_files(path)))
    raise ModelLoadError(
        f"{path}: not a model; pass a .gguf file or a directory with config.json and *.safetensors"
    )
