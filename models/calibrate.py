"""Router statistics of a MoE model on calibration windows, and DeepSeek-V3's aux-loss-free
balancing of its expert choice.

The model runs layer by layer over all windows (hidden states of every window kept, [T, H]
per step), so layer l's router sees the hidden states that layers < l produce with their
final biases, and a layer's bias can be fitted on its own router logits without rerunning
the model:

    for each MoE layer l, in order:
        logits_l = gate(post_attention_layernorm(x + attn(x)))   (fixed: the bias only
                                                                  changes the choice)
        fit:  for each pass, for each calibration batch:
                  load_i = tokens choosing expert i (top-k of score + b)
                  b_i <- b_i + gamma * sign(mean load - load_i)
              (gamma decays geometrically over the passes so b settles)
        x = layer output with the fitted b

Experts are chosen on score + b; gate weights use the unbiased score (`models.moe.route`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.attention import AttentionMetadata
from models.moe import route, squared_deviation_loss, switch_load_balancing_loss


@dataclass(slots=True)
class LayerLoad:
    layer: int
    counts: list[int]  # (token, choice) assignments per expert (sum = tokens * K)
    load_fraction: list[float]  # counts / sum
    max_over_mean: float
    cv: float  # coefficient of variation of the counts (population std / mean)
    entropy: float  # mean over tokens of the router distribution's entropy (nats)
    switch_loss: float  # alpha * E * sum_i f_i * P_i (transformers' load_balancing_loss_func)
    variance_loss: float  # alpha * sum_i (p_i - 1/E)^2

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def layer_load(layer: int, logits: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
               top_k: int, alpha: float) -> LayerLoad:
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).double()
    mean = counts.mean()
    probs = torch.softmax(logits.float(), dim=-1)
    entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
    return LayerLoad(
        layer, [int(c) for c in counts], (counts / counts.sum()).tolist(),
        float(counts.max() / mean), float(counts.std(unbiased=False) / mean), entropy,
        float(switch_load_balancing_loss([logits], num_experts, top_k, alpha)),
        float(squared_deviation_loss([logits], alpha)),
    )


def _choose(mlp, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return route(logits, mlp.top_k, scoring_func=mlp.scoring_func, selection_bias=bias,
                 n_group=mlp.n_group, topk_group=mlp.topk_group, normalize=mlp.normalize,
                 hard=True)[1]


def fit_bias(mlp, logits: torch.Tensor, batch_tokens: int, gamma: float, num_passes: int,
             start: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free update over batches of `batch_tokens` rows of `logits`."""
    E = logits.shape[1]
    bias = torch.zeros(E) if start is None else start.float().clone()
    decay = 0.01 ** (1.0 / max(num_passes - 1, 1))  # gamma ends at gamma / 100
    step = gamma
    for _ in range(num_passes):
        for lo in range(0, logits.shape[0], batch_tokens):
            ids = _choose(mlp, logits[lo : lo + batch_tokens], bias)
            load = torch.bincount(ids.reshape(-1), minlength=E).float()
            bias += step * torch.sign(load.mean() - load)
        step *= decay
    return bias


@torch.inference_mode()
def router_loads(model, windows: list[list[int]], *, balance: bool = False, gamma: float = 1e-2,
                 num_passes: int = 40, batch_windows: int = 8, alpha: float = 1.0,
                 ) -> tuple[list[LayerLoad], dict[int, torch.Tensor]]:
    """Per-MoE-layer loads with the model's current selection biases; with `balance`, fit a
    bias per layer first (returned {layer: bias [E]}, not applied to the model)."""
    cfg = model.config
    dtype = model.dtype
    batches = [windows[i : i + batch_windows] for i in range(0, len(windows), batch_windows)]
    metas = [AttentionMetadata.for_dense([len(w) for w in b]) for b in batches]
    positions = [torch.cat([torch.arange(len(w)) for w in b]) for b in batches]
    xs = [model.embed_tokens[torch.tensor([t for w in b for t in w])] for b in batches]
    if cfg.is_gemma:
        raise ValueError("gemma3 has no MoE layers")
    ropes = [model.rotary.cos_sin(p, dtype) for p in positions]
    loads, biases = [], {}
    batch_tokens = sum(len(w) for w in batches[0])
    for i, layer in enumerate(model.layers):
        if not layer.is_moe:
            xs = [layer(x, *rope, meta, None, None, False) for x, rope, meta in zip(xs, ropes, metas)]
            continue
        mlp = layer.mlp
        hs, logits = [], []
        for x, (cos, sin), meta in zip(xs, ropes, metas):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, meta, None)
            h = layer.post_attention_layernorm(x)
            hs.append((x, h))
            logits.append(mlp.router_logits(h).float())
        all_logits = torch.cat(logits)
        if balance:
            start = mlp.e_score_correction_bias if mlp.has_selection_bias else None
            biases[i] = fit_bias(mlp, all_logits, batch_tokens, gamma, num_passes, start)
            mlp.set_selection_bias(biases[i])
        bias = mlp.e_score_correction_bias if mlp.has_selection_bias else None
        ids = _choose(mlp, all_logits, bias)
        loads.append(layer_load(i, all_logits, ids, mlp.num_experts, mlp.top_k, alpha))
        xs = [x + mlp(h) for x, h in hs]
    return loads, biases


def heatmap(loads: list[LayerLoad], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = torch.tensor([l.load_fraction for l in loads]) * len(loads[0].counts)  # x mean
    fig, ax = plt.subplots(figsize=(1 + 0.35 * data.shape[1], 1 + 0.25 * data.shape[0]))
    im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(loads)), [str(l.layer) for l in loads])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / mean load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(loads: list[LayerLoad]) -> dict:
    return {"max_over_mean": max(l.max_over_mean for l in loads),
            "mean_cv": sum(l.cv for l in loads) / len(loads),
            "mean_entropy": sum(l.entropy for l in loads) / len(loads),
            "max_entropy": math.log(len(loads[0].counts))}
