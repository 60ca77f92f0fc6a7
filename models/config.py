"""Model configuration, in Hugging Face `config.json` field names.

One dataclass covers the decoder-only families docpipe serves (llama, mistral, qwen2, qwen3,
gemma3 text; mixtral, qwen2_moe, qwen3_moe; deepseek_v3, whose multi-head latent attention
is `models/mla.py`): they share the skeleton (RMSNorm, RoPE, attention, gated MLP) and
differ in a handful of fields, so loading a checkpoint is a direct
mapping of its `config.json`. Where an HF config class has defaults of its own that its
`config.json` may leave out (Gemma 3's nested `text_config` lists only what differs), they are
filled in from `HF_DEFAULTS` first.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe",
    "docpipe_moe", "deepseek_v3",
)
# docpipe_moe: what `docpipe moefy --gate hard` writes (models/moefy.py): the llama skeleton
# with MoE FFNs whose chosen experts weigh 1 and an always-on (ungated) shared expert; only
# docpipe loads it.
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "noaux_tc")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# Families with per-head RMSNorm on q and k (before RoPE).
QK_NORM_ARCHITECTURES = ("qwen3", "qwen3_moe", "gemma3_text")
# Defaults of the transformers config classes for fields a config.json may omit, where they
# differ from this dataclass's.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=128),
    "qwen3_moe": dict(norm_topk_prob=False),
    "gemma3_text": dict(
        vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256,
        sliding_window=4096, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        eos_token_id=1, bos_token_id=2,
    ),
    # DeepseekV3Config's; its rope_interleave (True) matches DeepSeek's own checkpoints,
    # whose config.json predates the field.
    "deepseek_v3": dict(
        vocab_size=129_280, hidden_size=7168, intermediate_size=18_432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
        max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        rope_interleave=True,
    ),
}


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
    hidden_act: str = "silu"  # gemma3's config.json calls it hidden_activation
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (qwen2 always has it)
    # Attention scores are scaled by query_pre_attn_scalar**-0.5 (gemma3); None: head_dim**-0.5.
    query_pre_attn_scalar: float | None = None
    # RoPE base of the "sliding_attention" layers (gemma3: 10000, rope_theta being the global
    # layers' base, with rope_scaling); None: rope_theta for every layer.
    rope_local_base_freq: float | None = None
    # logits = tanh(logits / cap) * cap; None: off. Attention-score softcapping (gemma2) is
    # not supported: a value there raises.
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    # Sliding-window attention: the window applies to the layers that `layer_types` marks
    # "sliding_attention" (mistral: all layers; qwen2: layers >= max_window_layers).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # gemma3 without layer_types: layer i slides iff (i + 1) % pattern != 0; None: 6 (HF's).
    sliding_window_pattern: int | None = None
    # Mixture of experts (mixtral: num_local_experts; qwen2_moe: num_experts).
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # None: intermediate_size
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # DeepSeek-V3's router, in its HF names (defaults: the softmax top-k gate above).
    # scoring_func "sigmoid": scores are sigmoid(logits); topk_method "noaux_tc": experts are
    # chosen on score + e_score_correction_bias among the topk_group best of n_group groups;
    # routed_scaling_factor multiplies the (renormalised) weights. n_routed_experts is
    # DeepSeek's num_local_experts; n_shared_experts an ungated shared expert of
    # n_shared_experts * moe_intermediate_size neurons.
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    # DeepSeek-V3: layers below first_k_dense_replace have a dense MLP (intermediate_size).
    first_k_dense_replace: int = 0
    # Multi-head latent attention (deepseek_v3, models/mla.py); kv_lora_rank 0: not MLA.
    # Per token the cache holds the normalised KV latent (kv_lora_rank) and one rope key
    # (qk_rope_head_dim) shared by all heads; q_lora_rank None: q is one projection.
    # head_dim is qk_rope_head_dim there (the rotary dim, as in DeepseekV3Config).
    # rope_interleave: the rope dims come as pairs (x0, x1), (x2, x3), ... (DeepSeek's layout).
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # docpipe's own: hard_gate weighs every chosen expert 1; shared_expert_gated False drops
    # qwen2_moe's sigmoid gate on the shared expert (always on, as DeepSeek's).
    hard_gate: bool = False
    shared_expert_gated: bool = True
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
        if self.kv_lora_rank:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name}={getattr(self, name)} must be positive with "
                                     f"kv_lora_rank={self.kv_lora_rank} (MLA)")
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                raise ValueError(f"q_lora_rank={self.q_lora_rank} must be positive (or None)")
            self.head_dim = self.qk_rope_head_dim  # the rotary dim, as DeepseekV3Config sets
        elif self.model_type == "deepseek_v3":
            raise ValueError("kv_lora_rank=0: deepseek_v3 needs its MLA fields "
                             "(kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.n_routed_experts is not None and not self.num_local_experts:
            self.num_local_experts = self.n_routed_experts
        if self.n_shared_experts:
            self.shared_expert_intermediate_size = self.n_shared_experts * self.moe_intermediate_size
            self.shared_expert_gated = False
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func={self.scoring_func!r} is not supported; "
                             f"use one of {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method={self.topk_method!r} is not supported; "
                             f"use one of {', '.join(TOPK_METHODS)}")
        if self.num_local_experts and self.n_group > 1:
            if self.num_local_experts % self.n_group or self.num_local_experts // self.n_group < 2:
                raise ValueError(f"n_group={self.n_group} must divide num_local_experts="
                                 f"{self.num_local_experts} into groups of at least 2")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
            if self.num_experts_per_tok > self.topk_group * (self.num_local_experts // self.n_group):
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                                 f"experts of topk_group={self.topk_group} groups")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; "
                             f"use one of {', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.attention_bias and self.model_type in QK_NORM_ARCHITECTURES:
            raise ValueError(f"attention_bias=True is not supported for {self.model_type} "
                             "(it adds an o_proj bias too); only checkpoints without it load")
        for name in ("query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be positive (or None: off)")
        if self.attn_logit_softcapping is not None:
            raise ValueError(f"attn_logit_softcapping={self.attn_logit_softcapping} is not "
                             "supported (the attention kernels do not cap scores); use None")
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None
        if self.layer_types is None and self.model_type == "gemma3_text":
            pattern = self.sliding_window_pattern or 6
            self.layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries; "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        for kind in self.layer_types:
            if kind not in ("full_attention", "sliding_attention"):
                raise ValueError(f"layer_types entry {kind!r} is not supported; "
                                 "use full_attention or sliding_attention")
        if self.is_mla and "sliding_attention" in self.layer_types:
            raise ValueError("sliding_attention layers are not supported with MLA "
                             f"(kv_lora_rank={self.kv_lora_rank}); use full_attention")
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"1..num_local_experts={self.num_local_experts}"
            )
        rope_types = ("default", "llama3", "linear") + (("yarn",) if self.is_mla else ())
        if self.rope_scaling and self.rope_scaling.get("rope_type", "default") not in rope_types:
            raise ValueError(
                f"rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported "
                f"for {self.model_type}; supported: {', '.join(rope_types)}"
            )

    # -- derived ---------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def kv_cache_entry(self) -> tuple[int, int, int]:
        """What the KV cache holds per token and layer: (tensors, heads, dim). K and V of
        every KV head, or for MLA one latent "head" (kv_lora_rank + qk_rope_head_dim)."""
        if self.is_mla:
            return 1, 1, self.kv_lora_rank + self.qk_rope_head_dim
        return 2, self.num_key_value_heads, self.head_dim

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_gemma(self) -> bool:
        """Gemma's layer: RMSNorm scales by (1 + w), computed in fp32; norms after attention
        and MLP too; embeddings times sqrt(hidden_size)."""
        return self.model_type == "gemma3_text"

    @property
    def has_qk_norm(self) -> bool:
        return self.model_type in QK_NORM_ARCHITECTURES

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: query_pre_attn_scalar**-0.5 when set, else head_dim**-0.5.
        Written as SDPA computes its default (1 / sqrt, in double: x**-0.5 differs in the
        last bit for many x), so passing it changes nothing for the other families; both
        forms round to the same fp32 value, which is what every kernel multiplies by."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

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
            and layer_id >= self.first_k_dense_replace
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
        if model_type == "gemma3" and isinstance(raw.get("text_config"), dict):
            # Gemma 3 with a vision tower: the language model is its text_config.
            raw = {**raw["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported; docpipe loads "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints"
            )
        raw = {**HF_DEFAULTS.get(model_type, {}), **raw}  # for absent keys only: null stays
        if raw.get("use_bidirectional_attention"):
            raise ModelLoadError(f"{source}: use_bidirectional_attention=true (an encoder) is "
                                 "not supported; docpipe runs causal decoders")
        kwargs: dict[str, Any] = {
            k: raw[k] for k in cls.__dataclass_fields__ if k in raw and raw[k] is not None
        }
        if "hidden_activation" in raw:
            kwargs["hidden_act"] = raw["hidden_activation"]
        if "sliding_window_pattern" not in raw and "_sliding_window_pattern" in raw:
            kwargs["sliding_window_pattern"] = raw["_sliding_window_pattern"]
        # transformers >= 5 nests rope settings in rope_parameters; per layer type where they
        # differ (gemma3: "full_attention" and "sliding_attention").
        rope = raw.get("rope_parameters") or {}
        if "full_attention" in rope or "sliding_attention" in rope:
            local = rope.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise ModelLoadError(
                    f"{source}: rope_parameters.sliding_attention.rope_type "
                    f"{local['rope_type']!r} is not supported; only 'default' on sliding layers"
                )
            if "rope_theta" in local:
                kwargs["rope_local_base_freq"] = local["rope_theta"]
            rope = rope.get("full_attention") or {}
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
        if model_type == "docpipe_moe":
            kwargs["attention_bias"] = raw.get("attention_bias", False)
        if model_type == "mixtral":
            kwargs["norm_topk_prob"] = True  # mixtral always renormalises the top-k weights
        if model_type == "deepseek_v3":
            quant = raw.get("quantization_config")
            if quant:  # DeepSeek's own weights are fp8 blocks with scales: refused, not misread
                raise ModelLoadError(
                    f"{source}: quantization_config {quant.get('quant_method', quant)!r} is not "
                    "supported; docpipe loads deepseek_v3 safetensors in F32/F16/BF16 "
                    "(convert fp8 weights to bf16 first)")
            # DeepseekV3's gate is always this one, whatever the config says
            kwargs.update(scoring_func="sigmoid", topk_method="noaux_tc")
        if model_type == "qwen3_moe" and "num_local_experts" not in raw:
            kwargs["num_local_experts"] = raw.get("num_experts", 0)
        if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
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
    if model_type == "qwen3":
        base.update(head_dim=32)
    if model_type == "qwen3_moe":
        base.update(head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=32, norm_topk_prob=True)
    if model_type == "deepseek_v3":
        base.update(
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            q_lora_rank=48, rope_interleave=True, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
            topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc",
        )
    if model_type == "gemma3_text":
        base.update(
            head_dim=32, hidden_act="gelu_pytorch_tanh", sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, tie_word_embeddings=True,
        )
    base.update(overrides)
    return ModelConfig(**base)
