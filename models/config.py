"""Model configuration, in Hugging Face `config.json` field names.

One dataclass covers the five decoder-only families docpipe serves (llama, mistral, qwen2,
mixtral, qwen2_moe): they share the skeleton (RMSNorm, RoPE, GQA attention, SwiGLU) and differ
in a handful of fields, so loading a checkpoint is a direct mapping of its `config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")


@dataclass(slots=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head (= num_attention_heads); 1: MQA
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (qwen2 always has it)
    # Sliding-window attention: the window applies to the layers that `layer_types` marks
    # "sliding_attention" (mistral: all layers; qwen2: layers >= max_window_layers).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # Mixture of experts (mixtral: num_local_experts; qwen2_moe: num_experts).
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # None: intermediate_size
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = ""  # free-form model id, used in fingerprints and prefix-cache keys

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; only 'silu'")
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries; "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"1..num_local_experts={self.num_local_experts}"
            )
        if self.rope_scaling and self.rope_scaling.get("rope_type", "default") not in (
            "default",
            "llama3",
            "linear",
        ):
            raise ValueError(
                f"rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported; "
                "supported: default, linear, llama3"
            )

    # -- derived ---------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def layer_window(self, layer_id: int) -> int | None:
        """Sliding window (in tokens, the query's own position included) of a layer, or None."""
        if self.layer_types[layer_id] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def layer_windows(self) -> list[int | None]:
        return [self.layer_window(i) for i in range(self.num_hidden_layers)]

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.is_moe
            and layer_id not in self.mlp_only_layers
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    @property
    def eos_token_ids(self) -> frozenset[int]:
        if self.eos_token_id is None:
            return frozenset()
        if isinstance(self.eos_token_id, int):
            return frozenset([self.eos_token_id])
        return frozenset(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Map an HF config dict onto this dataclass; unknown architectures raise."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported; docpipe loads "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints"
            )
        kwargs: dict[str, Any] = {
            k: raw[k] for k in cls.__dataclass_fields__ if k in raw and raw[k] is not None
        }
        # transformers >= 5 nests rope settings in rope_parameters.
        rope = raw.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = dict(rope)
        elif raw.get("rope_scaling"):
            scaling = dict(raw["rope_scaling"])
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            kwargs["rope_scaling"] = scaling
        if model_type == "qwen2_moe":
            kwargs["num_local_experts"] = raw.get("num_experts", 0)
            kwargs["attention_bias"] = raw.get("qkv_bias", True)
        if model_type == "qwen2":
            kwargs["attention_bias"] = True
        if model_type == "mixtral":
            kwargs["norm_topk_prob"] = True  # mixtral always renormalises the top-k weights
        if model_type in ("qwen2", "qwen2_moe"):
            window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
            kwargs["sliding_window"] = window
            if raw.get("layer_types") is None:
                first = raw.get("max_window_layers", 0)
                kwargs["layer_types"] = [
                    "sliding_attention" if window and i >= first else "full_attention"
                    for i in range(raw["num_hidden_layers"])
                ]
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: cannot read model config ({exc}); "
                                 "a checkpoint directory needs a valid config.json") from None
        return cls.from_hf_dict(raw, source=str(path))


def tiny_config(model_type: str = "llama", **overrides: Any) -> ModelConfig:
    """Presets for tests: 2 layers, width 64, 4 experts, window 16."""
    base: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        eos_token_id=1,
        bos_token_id=0,
        name=f"tiny-{model_type}",
    )
    if model_type == "mistral":
        base.update(sliding_window=16)
    if model_type == "qwen2":
        base.update(
            sliding_window=16, attention_bias=True,
            layer_types=["full_attention", "sliding_attention"],
        )
    if model_type == "mixtral":
        base.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        base.update(
            num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, norm_topk_prob=False, attention_bias=True,
        )
    base.update(overrides)
    return ModelConfig(**base)
