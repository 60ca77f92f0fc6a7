"""Turn a dense SwiGLU model (llama / qwen2 / mistral) into a mixture of experts.

Each layer's FFN  down(silu(gate x) * up x)  is a sum over its I intermediate neurons, so any
partition of the neurons into E sets gives E experts whose outputs sum to the dense FFN
exactly; a router then picks K of them per token. Steps, per layer, from one pass of the
dense model over the calibration windows:

1. Activation mass of neuron j on token t: m_tj = |a_tj| * ||down[:, j]||, a = silu(g) * u
   (how much the neuron moves the residual stream). Accumulated: sum_t m, M^T M (neuron
   co-activation), X^T M and X^T X (X: the FFN's input, the post-attention RMSNorm output).
2. Shared expert: the S neurons of largest total mass, always on.
3. Partition of the other R = I - S neurons into E experts of exactly R / E: balanced
   spherical k-means over their co-activation profiles (row j of M^T M, L2-normalised).
   Why: neurons that fire on the same tokens belong in one expert, so the K experts a token
   picks hold most of its mass; rows of M^T M summarise a neuron's firing pattern over all
   calibration tokens in R numbers, whatever the token count (summed over a subsample of
   about 16k tokens: it costs I / H times the router's sums). Sizes are forced equal
   (greedy capacity-constrained assignment, most similar (neuron, centroid) pairs first)
   so every expert costs the same GEMM and the FLOPs per token are exactly K / E of the
   routed part. Initialised by k-means++ from a seeded generator: deterministic for a seed.
4. Router: least squares (ridge, closed form from the accumulated X^T X and X^T M) from X
   to each expert's mass, divided by the mean expert mass (so logits are relative masses,
   about 1 on average). The fit's residual (1 - R^2 of the expert masses, on the profile
   subsample) is reported.

Gates (`write_checkpoint`):
- "hard": docpipe_moe (docpipe only): chosen experts weigh 1; at K = E the dense model.
- "standard": qwen2_moe, loaded by transformers too: weights are the renormalised softmax of
  the router logits over the K chosen; each routed expert's down projection is multiplied
  by K (so K equal weights give the dense sum); the shared expert's sigmoid gate has a zero
  weight (sigmoid(0) = 0.5 exactly) and its down projection is doubled: exactly always on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.attention import AttentionMetadata
from models.config import ModelConfig

logger = logging.getLogger(__name__)

GATES = ("hard", "standard")
METHOD = ("balanced spherical k-means (greedy capacity-constrained assignment, k-means++ "
          "init) on L2-normalised neuron co-activation profiles of activation mass "
          "|silu(g)*u| * ||down column||; router: ridge least squares from the FFN input to "
          "each expert's activation mass")


@dataclass(slots=True)
class LayerStats:
    """Running sums over calibration tokens for one dense FFN layer (fp64)."""

    xtx: torch.Tensor  # [H, H]   X^T X
    xtm: torch.Tensor  # [H, I]   X^T M   (M: per-token activation mass, [T, I])
    mass: torch.Tensor  # [I]     sum_t M
    num_tokens: int = 0
    # On the profile subsample (every `profile_every`-th batch, its own sums): M^T M costs
    # I / H times X^T M, so it is summed over fewer tokens; the fit residual is measured there.
    mtm: torch.Tensor | None = None  # [I, I]   M^T M
    sub_xtx: torch.Tensor | None = None
    sub_xtm: torch.Tensor | None = None
    sub_mass: torch.Tensor | None = None
    sub_tokens: int = 0


@dataclass(slots=True)
class LayerPlan:
    shared: list[int]  # neuron ids of the shared expert (S)
    experts: list[list[int]]  # E lists of R / E neuron ids, each sorted
    router: torch.Tensor  # [E, H] fp32 logits weight
    residual: float  # 1 - R^2 of the expert-mass fit (on the profile subsample)
    kmeans_iters: int


def calibration_windows(token_ids: list[list[int]], num_samples: int, sample_tokens: int,
                        seed: int) -> list[list[int]]:
    """`num_samples` windows of `sample_tokens` ids drawn (seeded, without replacement) from
    the non-overlapping windows of each document; all of them when there are fewer."""
    pool = [ids[i : i + sample_tokens] for ids in token_ids
            for i in range(0, len(ids) - sample_tokens + 1, sample_tokens)]
    if not pool:
        raise ValueError(f"no calibration window of {sample_tokens} tokens: the calibration "
                         "text is too short")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=gen)[:num_samples].tolist()
    return [pool[i] for i in sorted(order)]


@torch.inference_mode()
def collect_stats(model, windows: list[list[int]], batch_size: int = 8,
                  profile_tokens: int = 16384) -> list[LayerStats]:
    """One dense forward over the windows; every FFN, wrapped, accumulates `LayerStats`."""
    cfg: ModelConfig = model.config
    H, I = cfg.hidden_size, cfg.intermediate_size
    stats, hooks = [], []
    num_batches = -(-len(windows) // batch_size)
    tokens_per_batch = sum(map(len, windows)) / max(num_batches, 1)
    profile_every = max(1, int(num_batches * tokens_per_batch // profile_tokens))
    state = {"profile": True}
    for layer in model.layers:
        mlp = layer.mlp
        if layer.is_moe or not hasattr(mlp, "gate_up_proj"):
            raise ValueError("moefy needs a dense gated-MLP model (llama, mistral, qwen2)")
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        s = LayerStats(z(H, H), z(H, I), z(I), mtm=z(I, I), sub_xtx=z(H, H), sub_xtm=z(H, I),
                       sub_mass=z(I))
        stats.append(s)
        down_norm = mlp.down_proj.weight.float().norm(dim=0)  # [I]

        def forward(x, fixed_k=False, mlp=mlp, s=s, down_norm=down_norm):
            a = mlp.act_mul(mlp.gate_up_proj(x, fixed_k))  # computed once, for both uses
            xf, m = x.float(), a.float().abs() * down_norm
            xtx, xtm, mass = (xf.T @ xf).double(), (xf.T @ m).double(), m.sum(0).double()
            s.xtx += xtx
            s.xtm += xtm
            s.mass += mass
            s.num_tokens += x.shape[0]
            if state["profile"]:
                s.mtm += (m.T @ m).double()
                s.sub_xtx += xtx
                s.sub_xtm += xtm
                s.sub_mass += mass
                s.sub_tokens += x.shape[0]
            return mlp.down_proj(a, fixed_k)

        mlp.forward = forward  # an instance attribute: removed in `finally`
        hooks.append(mlp)
    start, step = time.perf_counter(), max(len(windows) // 10, batch_size)
    try:
        for lo in range(0, len(windows), batch_size):
            if lo and lo % step < batch_size:
                logger.info("calibration: %d of %d windows (%.0f s)", lo, len(windows),
                            time.perf_counter() - start)
            batch = windows[lo : lo + batch_size]
            state["profile"] = (lo // batch_size) % profile_every == 0
            ids = torch.tensor([t for w in batch for t in w], device=model.device)
            positions = torch.cat([torch.arange(len(w)) for w in batch]).to(model.device)
            model(ids, positions, AttentionMetadata.for_dense([len(w) for w in batch]))
    finally:
        for mlp in hooks:
            del mlp.forward
    return stats


def balanced_kmeans(features: torch.Tensor, num_clusters: int, seed: int,
                    max_iters: int = 30) -> tuple[torch.Tensor, int]:
    """Cluster ids [n] with exactly n / num_clusters members each (cosine similarity on rows
    of `features`, which are L2-normalised here). Returns (ids, iterations run)."""
    n = features.shape[0]
    assert n % num_clusters == 0, "balanced clusters need n divisible by the cluster count"
    cap = n // num_clusters
    f = torch.nn.functional.normalize(features.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    # k-means++ on cosine distance
    centers = [int(torch.randint(n, (1,), generator=gen))]
    for _ in range(1, num_clusters):
        dist = (1 - f @ f[centers].T).clamp_min(0).min(dim=1).values
        probs = dist**2
        probs = probs / probs.sum() if probs.sum() > 0 else torch.full((n,), 1.0 / n)
        centers.append(int(torch.multinomial(probs, 1, generator=gen)))
    centroids = f[centers]
    assign = torch.full((n,), -1, dtype=torch.long)
    iters = 0
    for iters in range(1, max_iters + 1):  # noqa: B007 (returned: the iterations run)
        sim = f @ centroids.T  # [n, C]
        order = torch.argsort(sim.reshape(-1), descending=True, stable=True).tolist()
        new = [-1] * n
        room = [cap] * num_clusters
        left = n
        for flat in order:
            j, c = divmod(flat, num_clusters)
            if new[j] < 0 and room[c]:
                new[j], room[c] = c, room[c] - 1
                left -= 1
                if not left:
                    break
        new_t = torch.tensor(new)
        if torch.equal(new_t, assign):
            break
        assign = new_t
        # the members' sum points where their mean does (normalised next): one pass over f
        centroids = torch.zeros_like(centroids).index_add_(0, assign, f)
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    return assign, iters


def plan_layer(s: LayerStats, num_experts: int, shared_neurons: int, seed: int,
               ridge: float = 1e-4) -> LayerPlan:
    I = s.mass.numel()
    routed_count = I - shared_neurons
    if routed_count <= 0 or routed_count % num_experts:
        raise ValueError(f"intermediate_size {I} minus --shared-neurons {shared_neurons} = "
                         f"{routed_count} must be a positive multiple of --experts {num_experts}")
    by_mass = torch.argsort(s.mass, descending=True, stable=True)
    shared = sorted(by_mass[:shared_neurons].tolist())
    routed = torch.tensor(sorted(by_mass[shared_neurons:].tolist()))
    profile = s.mtm[routed][:, routed]
    assign, iters = balanced_kmeans(profile, num_experts, seed)
    experts = [routed[assign == e].tolist() for e in range(num_experts)]
    member = torch.zeros(I, num_experts, dtype=torch.float64)  # neuron -> expert indicator
    for e, ids in enumerate(experts):
        member[ids, e] = 1.0
    xty = s.xtm @ member  # [H, E]
    mean_mass = float((s.mass @ member).sum()) / (s.num_tokens * num_experts)
    H = s.xtx.shape[0]
    reg = ridge * float(torch.trace(s.xtx)) / H
    w = torch.linalg.solve(s.xtx + reg * torch.eye(H, dtype=torch.float64), xty)  # [H, E]
    # residual on the profile subsample, where M^T M (hence Y^T Y) is known
    n, sub_xty = s.sub_tokens, s.sub_xtm @ member
    yty = member.T @ s.mtm @ member  # [E, E]
    y_sum = s.sub_mass @ member  # [E]
    sse = float(torch.trace(yty) - 2 * torch.sum(w * sub_xty) + torch.sum(w * (s.sub_xtx @ w)))
    total = float(torch.trace(yty) - (y_sum**2).sum() / n)
    residual = sse / total if total > 0 else 0.0
    router = (w.T / mean_mass).float()
    return LayerPlan(shared, experts, router, residual, iters)


def plan_layers(stats: list[LayerStats], num_experts: int, shared_neurons: int,
                seed: int) -> list[LayerPlan]:
    plans = []
    for i, s in enumerate(stats):
        start = time.perf_counter()
        plans.append(plan_layer(s, num_experts, shared_neurons, seed + i))
        logger.info("layer %d: %d k-means iterations, fit residual %.3f (%.1f s)", i,
                    plans[-1].kmeans_iters, plans[-1].residual, time.perf_counter() - start)
    return plans


# -- checkpoint -------------------------------------------------------------------------
def moe_hf_config(cfg: ModelConfig, num_experts: int, top_k: int, shared_neurons: int,
                  gate: str) -> dict:
    """config.json of the moefied model (qwen2_moe for the standard gate, else docpipe_moe)."""
    routed = (cfg.intermediate_size - shared_neurons) // num_experts
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, hidden_act=cfg.hidden_act, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, moe_intermediate_size=routed,
        shared_expert_intermediate_size=shared_neurons, num_experts_per_tok=top_k,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
    )
    if any(kind == "sliding_attention" for kind in cfg.layer_types):
        raise ValueError("moefy writes full-attention models only (sliding windows: not yet)")
    if gate == "standard":
        rope = dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
        return dict(common, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                    num_experts=num_experts, qkv_bias=cfg.attention_bias,
                    use_sliding_window=False, rope_parameters=rope)
    return dict(common, model_type="docpipe_moe", num_local_experts=num_experts,
                hard_gate=True, shared_expert_gated=False, attention_bias=cfg.attention_bias)


def moe_tensors(model, plans: list[LayerPlan], top_k: int, gate: str) -> dict[str, torch.Tensor]:
    """HF-named tensors of the moefied model, from the dense docpipe model's parameters."""
    cfg: ModelConfig = model.config
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    I = cfg.intermediate_size
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed_tokens,
                                    "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight
    scale = float(top_k) if gate == "standard" else 1.0
    for i, (layer, plan) in enumerate(zip(model.layers, plans, strict=True)):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        attn = layer.self_attn
        for name, part in zip("qkv", attn.qkv_proj.weight.split([q, kv, kv])):
            out[p + f"self_attn.{name}_proj.weight"] = part
        if attn.qkv_proj.bias is not None:
            for name, part in zip("qkv", attn.qkv_proj.bias.split([q, kv, kv])):
                out[p + f"self_attn.{name}_proj.bias"] = part
        out[p + "self_attn.o_proj.weight"] = attn.o_proj.weight
        gate_w, up_w = layer.mlp.gate_up_proj.weight.split([I, I])
        down_w = layer.mlp.down_proj.weight
        out[p + "mlp.gate.weight"] = plan.router
        for e, ids in enumerate(plan.experts):
            out[p + f"mlp.experts.{e}.gate_proj.weight"] = gate_w[ids]
            out[p + f"mlp.experts.{e}.up_proj.weight"] = up_w[ids]
            out[p + f"mlp.experts.{e}.down_proj.weight"] = down_w[:, ids] * scale
        if plan.shared:
            out[p + "mlp.shared_expert.gate_proj.weight"] = gate_w[plan.shared]
            out[p + "mlp.shared_expert.up_proj.weight"] = up_w[plan.shared]
            shared_down = down_w[:, plan.shared]
            if gate == "standard":  # sigmoid(0) = 0.5 exactly: double the output, always on
                out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.hidden_size)
                shared_down = shared_down * 2.0
            out[p + "mlp.shared_expert.down_proj.weight"] = shared_down
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def write_checkpoint(out_dir: Path, model, tokenizer, plans: list[LayerPlan], top_k: int,
                     shared_neurons: int, gate: str, calibration: dict) -> None:
    from safetensors.torch import save_file

    if gate not in GATES:
        raise ValueError(f"gate={gate!r}; use one of {', '.join(GATES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config = moe_hf_config(cfg, len(plans[0].experts), top_k, shared_neurons, gate)
    tmp = out_dir / "model.safetensors.tmp"
    save_file(moe_tensors(model, plans, top_k, gate), str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer(out_dir, tokenizer)
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")


def write_tokenizer(out_dir: Path, tokenizer) -> None:
    """tokenizer.json + tokenizer_config.json (chat template, specials) of a docpipe Tokenizer."""
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    special = tokenizer.special_tokens
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tokenizer.chat_template, "bos_token": special.get("bos_token"),
        "eos_token": special.get("eos_token"), "pad_token": special.get("pad_token"),
        "unk_token": special.get("unk_token"), "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2) + "\n")


def _cached_stats(model, windows: list[list[int]], cache: Path | None) -> list[LayerStats]:
    import hashlib

    key = hashlib.sha256(json.dumps([model.config.name, windows]).encode()).hexdigest()
    if cache is not None and Path(cache).is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as f:  # tensors and JSON only
            meta = f.metadata() or {}
            if meta.get("key") == key:
                logger.info("calibration sums from %s", cache)
                out = []
                for i, counts in enumerate(json.loads(meta["counts"])):
                    tensors = {n: f.get_tensor(f"{i}.{n}") for n in LayerStats.__slots__
                               if f"{i}.{n}" in f.keys()}
                    out.append(LayerStats(**tensors, **counts))
                return out
    stats = collect_stats(model, windows)
    if cache is not None:
        from safetensors.torch import save_file

        tensors, counts = {}, []
        for i, st in enumerate(stats):
            counts.append({n: getattr(st, n) for n in LayerStats.__slots__
                           if isinstance(getattr(st, n), int)})
            tensors.update({f"{i}.{n}": getattr(st, n).contiguous() for n in LayerStats.__slots__
                            if isinstance(getattr(st, n), torch.Tensor)})
        save_file(tensors, str(cache), metadata={"key": key, "counts": json.dumps(counts)})
    return stats


def moefy(model, tokenizer, token_ids: list[list[int]], out_dir: Path, *, num_experts: int,
          top_k: int, shared_neurons: int = 0, gate: str = "hard", num_samples: int = 1000,
          sample_tokens: int = 128, seed: int = 0, stats_cache: Path | None = None) -> dict:
    """The whole conversion; returns what calibration.json holds. `stats_cache`: a file
    for the calibration sums (they do not depend on E, K, S or the gate): read when it
    exists and was made from the same windows, else written."""
    cfg: ModelConfig = model.config
    if cfg.is_moe:
        raise ValueError(f"{cfg.name}: already a mixture of experts")
    if cfg.hidden_act != "silu" or cfg.is_gemma:
        raise ValueError(f"{cfg.name}: moefy splits SwiGLU FFNs (llama, mistral, qwen2); "
                         f"this is {cfg.model_type} with {cfg.hidden_act}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"--top-k {top_k} must be in 1..--experts {num_experts}")
    if gate not in GATES:
        raise ValueError(f"--gate {gate!r}: use one of {', '.join(GATES)}")
    start = time.perf_counter()
    windows = calibration_windows(token_ids, num_samples, sample_tokens, seed)
    stats = _cached_stats(model, windows, stats_cache)
    collect_s = time.perf_counter() - start
    plans = plan_layers(stats, num_experts, shared_neurons, seed)
    calibration = {
        "samples": len(windows), "sample_tokens": sample_tokens,
        "tokens": sum(len(w) for w in windows),
        "profile_tokens": stats[0].sub_tokens, "seed": seed, "method": METHOD,
        "experts": num_experts, "top_k": top_k, "shared_neurons": shared_neurons, "gate": gate,
        "source_model": cfg.name, "collect_s": round(collect_s, 1),
        "plan_s": round(time.perf_counter() - start - collect_s, 1),
        "layers": [{"layer": i, "fit_residual": round(p.residual, 4),
                    "kmeans_iterations": p.kmeans_iters} for i, p in enumerate(plans)],
    }
    write_checkpoint(out_dir, model, tokenizer, plans, top_k, shared_neurons, gate, calibration)
    return calibration
